#!/usr/bin/env bash
# Runs every check and test of the workspace. This is the README's test command.
#
#   bash scripts/test.sh
#
# It installs what the tests need when it is missing (FFmpeg, Chromium, Firefox ESR and
# GStreamer with its Python bindings from Debian's packages, with apt-get as root or through
# sudo; aiortc from PyPI in a virtual environment at $HOME/.cache/whep-venv), then: rustfmt
# check, the core's purity check (no async runtime, socket or process crate in whep-core's normal
# dependencies), clippy with warnings denied, rustdoc with warnings denied, and every test (unit,
# simulation, property, doc, and the end-to-end suite with real FFmpeg, real sockets, str0m
# viewers, headless Chromium and Firefox, GStreamer and aiortc players), and finally every fuzz
# target for a short bounded time (cargo-fuzz on stable via RUSTC_BOOTSTRAP=1, see
# scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/whep-target}"

step() { printf '\n==> %s\n' "$*"; }

step "system packages the end-to-end tests need"
missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)
[ -x "${FIREFOX:-/usr/bin/firefox-esr}" ] || missing+=(firefox-esr)
# GStreamer's webrtcbin through Python GObject (tests/clients/gst_whep.py), openssl for its
# ECDSA certificate, the venv module for aiortc, ip for the players' network namespaces;
# libssl-dev and pkg-config to build `--dtls openssl` (whep-server's openssl-dtls feature links
# the system OpenSSL); coturn: the TURN server of tests/tests/turn.rs; nginx and haproxy: the
# load balancers in front of the fleet of tests/tests/fleet.rs.
for p in libssl-dev pkg-config gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
    gstreamer1.0-plugins-bad gstreamer1.0-nice gstreamer1.0-libav python3-gi \
    gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0 openssl \
    python3-venv iproute2 coturn nginx haproxy; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# tests/tests/tcp.rs drops a namespace's UDP with an nftables rule (Netns::drop_udp_to);
# tests/tests/nat.rs builds a masquerading router with nftables (nat::NatLab).
command -v nft >/dev/null 2>&1 || missing+=(nftables)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
ffmpeg -hide_banner -version | head -n 1
"${CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null | head -n 1 || true
"${FIREFOX:-/usr/bin/firefox-esr}" --version 2>/dev/null | head -n 1 || true
gst-launch-1.0 --version | sed -n 2p

step "aiortc and PyJWT in a virtual environment (tests/clients/requirements.txt)"
venv="${WHEP_VENV:-$HOME/.cache/whep-venv}"
if ! cmp -s tests/clients/requirements.txt "$venv/.whep-requirements"; then
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/clients/requirements.txt
    cp tests/clients/requirements.txt "$venv/.whep-requirements"
fi
"$venv/bin/python" -c 'import aiortc, jwt; print("aiortc", aiortc.__version__, "PyJWT", jwt.__version__)'

step "rustfmt"
cargo fmt --all -- --check

step "purity: whep-core must not depend on IO crates"
bash scripts/check-core-purity.sh

step "clippy (warnings are errors)"
cargo clippy --locked --workspace --all-targets --all-features -- -D warnings

step "rustdoc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps -p whep-core -p whep-server -p whep-tokio -p whep-smol --all-features

step "tests"
cargo test --locked --workspace --all-features

step "fuzz: every target of fuzz/ for ${WHEP_FUZZ_SECONDS:-10} s (bash scripts/fuzz.sh N for longer)"
bash scripts/fuzz.sh "${WHEP_FUZZ_SECONDS:-10}"

#!/usr/bin/env bash
# Starts whepd with the demo stream (an FFmpeg test pattern with a 440 Hz tone) and prints the URL
# of its player page. This is the README's demo command:
#
#   bash scripts/demo.sh            # then open the printed http://127.0.0.1:8080/?stream=demo
#   bash scripts/demo.sh --help     # every whepd flag; extra arguments are passed to whepd
#
# It installs FFmpeg, and libssl-dev and pkg-config for whepd's `--dtls openssl`, from Debian's
# packages when they are missing (apt-get, as root or via sudo) and builds whepd in release mode (the first build compiles str0m's crypto backend: a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/whep-target}"

missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
for p in libssl-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --locked --release -p whep-tokio --bin whepd
exec "$CARGO_TARGET_DIR/release/whepd" "$@"

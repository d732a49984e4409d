#!/usr/bin/env bash
# Time to the first frame in headless Chromium, headless Firefox ESR, GStreamer webrtcbin and/or
# aiortc, joining a running whepd's demo stream N times at random points of its GOP: POST to the
# first decoded frame (the player page's `firstFrameMs`, stats polled every 10 ms; the
# `first_frame_ms` of tests/clients/gst_whep.py and aiortc_whep.py, counted when the decoder
# hands out the frame) and, in Chromium, to the first frame on screen (`firstPresentedMs`,
# requestVideoFrameCallback). Chromium, GStreamer and aiortc get the H264 rendition, Debian's
# Firefox (no OpenH264) and aiortc-vp8 the VP8 one. With several players each run starts them
# in turn, so that all see the same machine load.
#
#   bash scripts/first-frame.sh [--browser LIST] [N] [whepd flags...]
#   # LIST: comma-separated chromium, firefox, gst-max-bundle, gst-max-compat, gst-rsa,
#   # aiortc, aiortc-vp8 (both = chromium,firefox); e.g. 10, or 6 --no-gop-cache, or
#   # --browser both 5, or --browser gst-max-bundle,gst-max-compat,aiortc 5, or
#   # --browser gst-rsa 5 --dtls openssl (stock GStreamer: max-bundle with its own RSA
#   # certificate, which plays against --dtls openssl only)
#
# Needs root, the release binaries (cargo build --release -p whep-e2e --bins; WHEPD=path picks
# another whepd), chromium / firefox-esr, Debian's GStreamer with python3-gi, and for aiortc the
# virtual environment scripts/test.sh makes ($HOME/.cache/whep-venv, WHEP_VENV overrides). The
# players run in a network namespace the script makes (a veth pair in 10.78.0.0/16) and
# removes, the server on its host-side address: Firefox and libnice gather no loopback
# candidate, and traffic stays on the pair.
set -euo pipefail
browsers=chromium
if [[ ${1:-} == --browser ]]; then
    browsers=${2:-}
    [[ $browsers == both ]] && browsers=chromium,firefox
    browsers=${browsers//,/ }
    for b in $browsers; do
        case $b in
        chromium | firefox | gst-max-bundle | gst-max-compat | gst-rsa | aiortc | aiortc-vp8) ;;
        *)
            echo "--browser chromium|firefox|both|gst-max-bundle|gst-max-compat|gst-rsa|aiortc|aiortc-vp8[,...]" >&2
            exit 2
            ;;
        esac
    done
    shift 2
fi
n=${1:-10}
shift || true
whepd=${WHEPD:-${CARGO_TARGET_DIR:-$HOME/.cache/whep-target}/release/whepd-tokio}
work=$(mktemp -d)
port=$((18000 + RANDOM % 1000))
ns=wff-$$
server=
net=10.78.$(($$ % 250))
ip netns add "$ns"
trap 'kill $server 2>/dev/null; ip netns del "$ns" 2>/dev/null; rm -rf "$work"' EXIT
ip link add "wffh$$" type veth peer name "wffp$$" netns "$ns"
ip addr add "$net.1/30" dev "wffh$$"
ip link set "wffh$$" up
ip -n "$ns" addr add "$net.2/30" dev "wffp$$"
ip -n "$ns" link set "wffp$$" up
ip -n "$ns" link set lo up
"$whepd" --http "$net.1:$port" --udp "$net.1:0" "$@" >"$work/server.log" 2>&1 &
server=$!
sleep 3
url="http://$net.1:$port/?stream=demo&test=1&frames=30&timeout=30"

# Runs a browser command in a session of its own until the page prints its verdict (40 s at
# most), kills the whole session and prints the verdict line.
verdict_of() {
    local log=$work/browser.log
    setsid "$@" >"$log" 2>&1 </dev/null &
    local pid=$!
    for _ in $(seq 400); do
        grep -q '\[WHEP\] \(PASS\|FAIL\)' "$log" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    grep -m1 -o '\[WHEP\] \(PASS\|FAIL\).*' "$log" | tr -d '"' || true
}

chromium_verdict() {
    local chromium
    chromium=$(command -v chromium || command -v chromium-browser)
    verdict_of ip netns exec "$ns" "$chromium" --headless --no-sandbox --disable-gpu --disable-quic \
        --no-first-run --disable-background-networking --disable-component-update --disable-sync \
        --autoplay-policy=no-user-gesture-required --allow-loopback-in-peer-connection \
        --disable-features=WebRtcHideLocalIpsWithMdns --enable-logging=stderr --v=0 \
        --user-data-dir="$work/chromium-$1" "$url"
}

firefox_verdict() {
    local profile=$work/firefox-$1
    mkdir -p "$profile"
    # As tests/src/firefox.rs: loopback ICE, autoplay, the console on stdout, quiet offline.
    cat >"$profile/user.js" <<'EOF'
user_pref("media.peerconnection.ice.loopback", true);
user_pref("media.peerconnection.ice.obfuscate_host_addresses", false);
user_pref("media.autoplay.default", 0);
user_pref("media.autoplay.blocking_policy", 0);
user_pref("devtools.console.stdout.content", true);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("app.update.auto", false);
user_pref("app.normandy.enabled", false);
user_pref("browser.safebrowsing.update.enabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
EOF
    MOZ_CRASHREPORTER_DISABLE=1 verdict_of ip netns exec "$ns" "${FIREFOX:-firefox-esr}" \
        --headless --no-remote \
        --profile "$profile" "$url"
}

clients=$(cd "$(dirname "$0")/../tests/clients" && pwd)
venv=${WHEP_VENV:-$HOME/.cache/whep-venv}
whep="http://$net.1:$port/whep/demo"

# The Python players (tests/clients): they print a `[WHEP] PASS ... first_frame_ms=...` line.
player_verdict() {
    case $1 in
    gst-rsa) verdict_of ip netns exec "$ns" /usr/bin/python3 "$clients/gst_whep.py" "$whep" \
        --bundle max-bundle --cert stock --timeout 30 ;;
    gst-*) verdict_of ip netns exec "$ns" /usr/bin/python3 "$clients/gst_whep.py" "$whep" \
        --bundle "${1#gst-}" --timeout 30 ;;
    aiortc) verdict_of ip netns exec "$ns" "$venv/bin/python" "$clients/aiortc_whep.py" "$whep" \
        --codec h264 --timeout 30 ;;
    aiortc-vp8) verdict_of ip netns exec "$ns" "$venv/bin/python" "$clients/aiortc_whep.py" \
        "$whep" --codec vp8 --timeout 30 ;;
    esac
}

verdict_for() {
    case $1 in
    chromium) chromium_verdict "$2" ;;
    firefox) firefox_verdict "$2" ;;
    *) player_verdict "$1" ;;
    esac
}

declare -A decoded presented
for i in $(seq 1 "$n"); do
    for b in $browsers; do
        sleep "$((RANDOM % 2)).$((RANDOM % 10))" # somewhere in the 2 s GOP
        verdict=$(verdict_for "$b" "$i")
        d=$(sed -nE 's/.*(firstFrameMs|first_frame_ms)=([0-9]+).*/\2/p' <<<"$verdict")
        p=$(sed -nE 's/.*firstPresentedMs=([0-9?]+).*/\1/p' <<<"$verdict")
        c=$(sed -nE 's/.*codec=([^ ,]+).*/\1/p' <<<"$verdict")
        echo "run $i $b: decoded ${d:-?} ms, on screen ${p:-?} ms, codec ${c:-?}"
        [[ -n $d ]] && decoded[$b]+="$d "
        [[ $p =~ ^[0-9]+$ ]] && presented[$b]+="$p "
    done
done
summary() {
    local name=$1; shift
    (($# == 0)) && { echo "$name: no runs"; return; }
    sorted=($(printf '%s\n' "$@" | sort -n))
    echo "$name: ${#sorted[@]} runs, min ${sorted[0]} ms, median ${sorted[$((${#sorted[@]} / 2))]} ms, max ${sorted[-1]} ms"
}
for b in $browsers; do
    summary "$b: POST to first decoded frame" ${decoded[$b]:-}
    # Only the player page in Chromium reports when the frame reached the screen.
    if [[ $b == chromium ]]; then
        summary "$b: POST to first frame on screen" ${presented[$b]:-}
    fi
done

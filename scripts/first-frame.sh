#!/usr/bin/env bash
# Time to the first frame in headless Chromium, joining a running whepd's demo stream N times
# at random points of its GOP: POST to the first decoded frame (the player page's
# `firstFrameMs`, stats polled every 10 ms) and to the first frame on screen
# (`firstPresentedMs`, requestVideoFrameCallback).
#
#   bash scripts/first-frame.sh [N] [whepd flags...]     # e.g. 10, or 6 --no-gop-cache
#
# Needs the release binaries (cargo build --release -p whep-e2e --bins) and chromium.
set -euo pipefail
n=${1:-10}
shift || true
target=${CARGO_TARGET_DIR:-$HOME/.cache/whep-target}/release
chromium=$(command -v chromium || command -v chromium-browser)
work=$(mktemp -d)
port=$((18000 + RANDOM % 1000))
"$target/whepd-tokio" --http "127.0.0.1:$port" "$@" >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
sleep 3
decoded=() presented=()
for i in $(seq 1 "$n"); do
    sleep "$((RANDOM % 2)).$((RANDOM % 10))" # somewhere in the 2 s GOP
    verdict=$(timeout 40 setsid "$chromium" --headless --no-sandbox --disable-gpu --disable-quic \
        --no-first-run --disable-background-networking --disable-component-update --disable-sync \
        --autoplay-policy=no-user-gesture-required --allow-loopback-in-peer-connection \
        --disable-features=WebRtcHideLocalIpsWithMdns --enable-logging=stderr --v=0 \
        --user-data-dir="$work/profile-$i" \
        "http://127.0.0.1:$port/?stream=demo&test=1&frames=30&timeout=30" 2>&1 |
        grep -m1 -o 'PASS.*firstPresentedMs=[0-9?]*' || true)
    pkill -f "user-data-dir=$work/profile-$i" 2>/dev/null || true
    d=$(sed -nE 's/.*firstFrameMs=([0-9]+).*/\1/p' <<<"$verdict")
    p=$(sed -nE 's/.*firstPresentedMs=([0-9?]+).*/\1/p' <<<"$verdict")
    echo "run $i: decoded ${d:-?} ms, on screen ${p:-?} ms"
    [[ -n $d ]] && decoded+=("$d")
    [[ $p =~ ^[0-9]+$ ]] && presented+=("$p")
done
summary() {
    local name=$1; shift
    (($# == 0)) && { echo "$name: no runs"; return; }
    sorted=($(printf '%s\n' "$@" | sort -n))
    echo "$name: ${#sorted[@]} runs, min ${sorted[0]} ms, median ${sorted[$((${#sorted[@]} / 2))]} ms, max ${sorted[-1]} ms"
}
summary "POST to first decoded frame" "${decoded[@]}"
summary "POST to first frame on screen" "${presented[@]}"

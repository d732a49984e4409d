#!/usr/bin/env bash
# First frame per network path in headless Chromium: POST to the first decoded frame (the player
# page's `firstFrameMs`) on each path the end-to-end tests build, with whepd-tokio and the tests
# in release, N rounds with the paths in turn in each round (so that all see the same load):
#
#   udp       loopback (tests/tests/e2e.rs chromium_plays_demo)
#   tcp       ICE-TCP, the namespace's UDP to the server dropped by nftables (tcp.rs)
#   turn-udp  relay only, Chromium to coturn over UDP (turn.rs)
#   turn-tcp  relay only, Chromium to coturn over TCP (turn.rs)
#   ipv6      an IPv6-only namespace (ipv6.rs)
#   nat       the server behind a masquerading router, its address learned by STUN (nat.rs)
#   https     the player page and WHEP over TLS (https.rs)
#
#   bash scripts/paths.sh [N]        # default 3 rounds; needs root, chromium, coturn, nft
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/whep-target}"
rounds=${1:-3}
paths=(
    "udp e2e tokio::chromium_plays_demo"
    "tcp tcp tokio::chromium_plays_over_tcp_without_udp"
    "turn-udp turn tokio::chromium_plays_through_turn_udp"
    "turn-tcp turn tokio::chromium_plays_through_turn_tcp"
    "ipv6 ipv6 tokio::chromium_plays_over_ipv6"
    "nat nat tokio::chromium_plays_behind_nat"
    "https https tokio::chromium_plays_over_https"
)
tests=()
for p in "${paths[@]}"; do
    read -r _ file _ <<<"$p"
    tests+=(--test "$file")
done
cargo test --release -q -p whep-e2e "${tests[@]}" --no-run 2>/dev/null
declare -A got
for ((r = 1; r <= rounds; r++)); do
    for p in "${paths[@]}"; do
        read -r name file test <<<"$p"
        out=$(cargo test --release -q -p whep-e2e --test "$file" -- --exact "$test" --nocapture 2>&1 || true)
        ms=$(grep -o 'firstFrameMs=[0-9]*' <<<"$out" | head -1 | cut -d= -f2 || true)
        got[$name]="${got[$name]:-} ${ms:-fail}"
        echo "round $r $name: ${ms:-fail}" >&2
    done
done
printf '%-9s %s\n' path "firstFrameMs per round (median)"
for p in "${paths[@]}"; do
    read -r name _ <<<"$p"
    # shellcheck disable=SC2086
    median=$(printf '%s\n' ${got[$name]} | grep -v fail | sort -n | awk '{a[NR]=$1} END {print NR ? a[int((NR+1)/2)] : "-"}')
    printf '%-9s%s (%s)\n' "$name" "${got[$name]}" "$median"
done

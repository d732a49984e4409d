#!/usr/bin/env bash
# Fuzzes every untrusted input surface (the targets of `whep_server::fuzzing`: whep-core's and
# the application routes', built by the cargo-fuzz project in fuzz/) for a fixed time each.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]      # default 20
#
# It installs cargo-fuzz when it is missing, builds every target, then runs each one for the
# given time, starting from its committed seed corpus (fuzz/corpus/<target>/, read-only: new
# corpus entries go to a temporary directory that is deleted at the end) and prints how many
# inputs each target executed. Any crash, timeout or out-of-memory makes the script exit
# non-zero after all targets ran; libFuzzer leaves the input under fuzz/artifacts/<target>/,
# where `cargo test -p whep-server --all-features --test fuzz_corpus` replays it as a regression
# case (reproduce one with `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>`).
#
# Toolchain: only stable Rust is installed here and in CI. cargo-fuzz passes nightly-only
# compiler flags (-Zsanitizer=address and the sanitizer-coverage options libFuzzer needs), so
# the fuzz build runs the stable compiler with RUSTC_BOOTSTRAP=1, which makes it accept them.
# That is set for the cargo-fuzz commands below only; the workspace itself never needs it.
#
# libFuzzer options: -rss_limit_mb=2048 (a target that grows past it is a bug), -timeout=60 per
# input, -detect_leaks=0 (targets keep a simulated world in a thread-local across inputs, so
# LeakSanitizer would rescan the heap after nearly every input and cut throughput fivefold; a
# leak in safe Rust would not be a crash anyway).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-20}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
    exit 2
fi
# A separate directory: the sanitizer build shares nothing with the normal one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/whep-target}/fuzz"

step() { printf '\n==> %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
cargo fuzz --version

step "building the fuzz targets (stable toolchain, RUSTC_BOOTSTRAP=1)"
start=$(date +%s)
RUSTC_BOOTSTRAP=1 cargo fuzz build
echo "built in $(($(date +%s) - start)) s"

mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
[ "${#targets[@]}" -gt 0 ] || { echo "no fuzz targets found" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=()
summary=()
for t in "${targets[@]}"; do
    step "fuzzing $t for ${seconds} s"
    seeds="fuzz/corpus/$t"
    if [ -z "$(ls -A "$seeds" 2>/dev/null)" ]; then
        echo "$seeds is missing or empty" >&2
        failed+=("$t")
        summary+=("$(printf '%-16s %-8s %12s' "$t" "NOSEEDS" "-")")
        continue
    fi
    mkdir -p "$work/corpus/$t"
    log="$work/$t.log"
    status=ok
    # The first directory receives new corpus entries; the committed seeds are only read.
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "$work/corpus/$t" "$seeds" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=60 -detect_leaks=0 \
        -print_final_stats=1 >"$log" 2>&1; then
        status=CRASH
        failed+=("$t")
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    if [ -z "$execs" ]; then
        # No final stats after a crash: the last progress line has the count.
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)
    fi
    rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -n 1 | grep -oE '[0-9]+$' || true)
    new=$(find "$work/corpus/$t" -type f | wc -l)
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$log" || true
    line=$(printf '%-16s %-8s %12s executions  %6s exec/s  %5s new corpus entries' \
        "$t" "$status" "${execs:-?}" "${rate:-?}" "$new")
    echo "$line"
    summary+=("$line")
    if [ "$status" != ok ]; then
        echo "---- end of the libFuzzer log of $t ----"
        tail -n 80 "$log"
        echo "---- artifacts (fuzz/artifacts/$t/) ----"
        ls -l "fuzz/artifacts/$t/" 2>/dev/null || true
    fi
done

step "summary (${seconds} s per target)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi

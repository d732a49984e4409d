#!/usr/bin/env bash
# Runs every check and test of the workspace. This is the README's test command.
#
#   bash scripts/test.sh
#
# It installs what the tests need when it is missing, then: rustfmt check, the core's purity check
# (no async runtime, socket or process crate in whep-core's normal dependencies), clippy with
# warnings denied, rustdoc with warnings denied, and every test (unit, simulation, property, doc).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/whep-target}"

step() { printf '\n==> %s\n' "$*"; }

step "rustfmt"
cargo fmt --all -- --check

step "purity: whep-core must not depend on IO crates"
bash scripts/check-core-purity.sh

step "clippy (warnings are errors)"
cargo clippy --locked --workspace --all-targets --all-features -- -D warnings

step "rustdoc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps -p whep-core --all-features

step "tests"
cargo test --locked --workspace --all-features

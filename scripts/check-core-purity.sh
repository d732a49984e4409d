#!/usr/bin/env bash
# Fails when whep-core's normal (non-dev) dependency tree contains an async runtime, a socket
# crate or a process crate. The core is a pure state machine; the runtimes own all IO.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(cargo tree --locked -p whep-core -e normal --prefix none)
banned='^(tokio|smol|async-io|async-net|async-process|async-std|mio|socket2|hyper|polling) '
if bad=$(grep -E "$banned" <<<"$tree" | sort -u) && [ -n "$bad" ]; then
  echo "whep-core pulls IO crates into its normal dependencies:" >&2
  echo "$bad" >&2
  exit 1
fi
echo "whep-core normal dependencies: $(wc -l <<<"$tree") entries, none of them IO crates"

#!/usr/bin/env bash
# Fails when whep-core's normal (non-dev) dependency tree contains an async runtime, a socket
# crate or a process crate. The core is a pure state machine; the server shell (whep-server, in
# core/server/: driver, application routes, command line, shard set, OS helpers) and the
# runtimes own all IO.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every feature counts: the simulation harness, the `http` conversions and the fuzz targets must
# stay as free of runtimes, sockets and processes as the state machine.
tree=$(cargo tree --locked -p whep-core --all-features -e normal --prefix none)
banned='^(tokio|smol|async-io|async-net|async-process|async-std|async-executor|mio|socket2|hyper|polling|nix) '
if bad=$(grep -E "$banned" <<<"$tree" | sort -u) && [ -n "$bad" ]; then
  echo "whep-core pulls IO crates into its normal dependencies:" >&2
  echo "$bad" >&2
  exit 1
fi
echo "whep-core normal dependencies: $(wc -l <<<"$tree") entries, none of them IO crates"

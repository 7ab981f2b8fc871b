#!/usr/bin/env bash
# Builds Spool and its load generator in release mode, then runs the publish benchmark.
#
#   scripts/bench.sh                         # defaults: 1,16,64 clients, 256 B, 20k msgs/run
#   scripts/bench.sh --clients 1,8 --size 1024 --json /tmp/bench.json
#   scripts/bench.sh --server-arg=--dedup-window=1m
#
# Every argument goes to `spool-bench publish` (see `spool-bench publish --help`); the
# defaults are its own. Servers are started on free 127.0.0.1 ports and stopped at the end.
set -euo pipefail

cd "$(dirname "$0")/.."

cargo build --release -p spool -p spool-bench
exec target/release/spool-bench publish "$@"

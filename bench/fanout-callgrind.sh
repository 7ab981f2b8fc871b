#!/bin/bash
# Instructions per delivery of a fan-out, counted by callgrind (repeatable on a busy machine).
#
#   bench/fanout-callgrind.sh BIN N_WS N_SSE K [STREAMS]
#
# Runs `BIN serve` (memory engine, anonymous) under callgrind twice: N_WS WebSocket and N_SSE
# SSE (`format=json`) subscribers on one stream (or on STREAMS streams, subscriber i on stream
# i % STREAMS), once with K messages per stream published over HTTP, one at a time, and once
# with none. The difference of the two totals, divided by (N_WS + N_SSE) × K, is the server's
# instructions per delivery (publishing the messages included).
set -euo pipefail
. "$(dirname "$0")/fanout-run.sh"
total() {
    fanout_run "$1" valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1"
    grep -h '^summary:\|^totals:' "$dir/out.$1" | head -1 | awk '{print $2}'
}
base=$(total 0)
with=$(total "$k")
echo "$bin: $(( (with - base) / ((nws + nsse) * k) )) instructions per delivery ($with - $base over $(( (nws + nsse) * k )) deliveries); callgrind files in $dir"

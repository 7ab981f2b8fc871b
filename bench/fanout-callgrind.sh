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
bin=$1; nws=$2; nsse=$3; k=$4; streams=${5:-1}
dir=$(mktemp -d)
here=$(cd "$(dirname "$0")" && pwd)
total() {
    local port=$((20000 + RANDOM % 20000))
    valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1" "$bin" serve \
        --listen 127.0.0.1:$port --engine memory --allow-anonymous >"$dir/log.$1" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 1; done
    timeout 1500 python3 "$here/fanout-callgrind.py" "$port" "$pid" "$nws" "$nsse" "$1" "$streams" >&2
    kill -TERM "$pid"; wait "$pid" || true
    grep -h '^summary:\|^totals:' "$dir/out.$1" | head -1 | awk '{print $2}'
}
base=$(total 0)
with=$(total "$k")
echo "$bin: $(( (with - base) / ((nws + nsse) * k) )) instructions per delivery ($with - $base over $(( (nws + nsse) * k )) deliveries); callgrind files in $dir"

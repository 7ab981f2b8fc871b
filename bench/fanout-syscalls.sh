#!/bin/bash
# Socket writes per delivery of a fan-out, counted by strace — how many system calls the server
# spends sending what it delivers (issue 14: a connection's pending frames in one write per wake).
#
#   bench/fanout-syscalls.sh BIN N_WS N_SSE K [STREAMS]
#
# The same load as fanout-callgrind.sh (N_WS WebSocket and N_SSE SSE subscribers, K messages per
# stream published over HTTP one at a time, subscriber i on stream i % STREAMS), with the server
# under `strace -f -c` instead of callgrind, once with K messages and once with none; prints the
# write-side calls (write, writev, sendto, sendmsg) per delivery, the difference of the two runs.
set -euo pipefail
bin=$1; nws=$2; nsse=$3; k=$4; streams=${5:-1}
dir=$(mktemp -d)
here=$(cd "$(dirname "$0")" && pwd)
writes() {
    local port=$((20000 + RANDOM % 20000))
    strace -f -c -o "$dir/strace.$1" -e trace=write,writev,sendto,sendmsg "$bin" serve \
        --listen 127.0.0.1:$port --engine memory --allow-anonymous >"$dir/log.$1" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 1; done
    local server
    server=$(pgrep -P "$pid" -n || echo "$pid")
    timeout 1500 python3 "$here/fanout-callgrind.py" "$port" "$server" "$nws" "$nsse" "$1" "$streams" >&2
    kill -TERM "$server"; wait "$pid" || true
    awk '$NF ~ /^(write|writev|sendto|sendmsg)$/ { n += $4 } END { print n + 0 }' "$dir/strace.$1"
}
base=$(writes 0)
with=$(writes "$k")
deliveries=$(( (nws + nsse) * k ))
echo "$bin: $(python3 -c "print(f'{($with - $base) / $deliveries:.3f}')") socket writes per delivery ($with - $base over $deliveries deliveries); strace summaries in $dir"

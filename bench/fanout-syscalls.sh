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
. "$(dirname "$0")/fanout-run.sh"
writes() {
    fanout_run "$1" strace -f -c -o "$dir/strace.$1" -e trace=write,writev,sendto,sendmsg
    awk '$NF ~ /^(write|writev|sendto|sendmsg)$/ { n += $4 } END { print n + 0 }' "$dir/strace.$1"
}
base=$(writes 0)
with=$(writes "$k")
deliveries=$(( (nws + nsse) * k ))
echo "$bin: $(python3 -c "print(f'{($with - $base) / $deliveries:.3f}')") socket writes per delivery ($with - $base over $deliveries deliveries); strace summaries in $dir"

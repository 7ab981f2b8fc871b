#!/bin/bash
# Instructions per Redis XADD, counted by callgrind — the peer of ws-publish-callgrind.sh.
#
#   bench/redis-publish-callgrind.sh N [WINDOW] [FSYNC]
#
# Runs `redis-server` (AOF on, `appendfsync` FSYNC, default always, as in `spool-bench
# ws-publish`'s redis target) under callgrind twice: once with one connection that sends N
# `XADD bench * d PAYLOAD` (256 B) pipelined, at most WINDOW (default 16) unanswered, and waits
# for every reply; once with the same connection and no XADD. The difference of the two totals
# divided by N is the server's instructions per acked XADD.
set -euo pipefail
. "$(dirname "$0")/servers.sh"
n=$1; window=${2:-16}; fsync=${3:-always}
dir=$(mktemp -d)
total() {
    local port
    port=$(free_port)
    mkdir -p "$dir/data.$1"
    valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1" redis-server --port "$port" \
        --bind 127.0.0.1 --save '' --appendonly yes --appendfsync "$fsync" \
        --dir "$dir/data.$1" >"$dir/log.$1" 2>&1 &
    local pid=$!
    await_server "$pid" "$dir/log.$1" redis-cli -p "$port" ping
    timeout 1500 python3 - "$port" "$1" "$window" <<'PY'
import asyncio, sys
port, n, window = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def command(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)

async def reply(r):
    line = await r.readline()
    if line.startswith(b"-"):
        raise SystemExit(f"refused: {line!r}")
    if line.startswith(b"$"):
        ln = int(line[1:])
        if ln >= 0:
            await r.readexactly(ln + 2)
    return line

async def main():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(command("PING"))
    await reply(r)
    payload = b"x" * 256
    xadd = command("XADD", "bench", "*", "d", payload)
    sent = acked = 0
    while acked < n:
        while sent < n and sent - acked < window:
            sent += 1
            w.write(xadd)
        await w.drain()
        await reply(r)
        acked += 1
    w.close()
    print(f"acked {acked}", file=sys.stderr)

asyncio.run(main())
PY
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || kill -TERM "$pid"
    wait "$pid" || true
    grep -h '^summary:\|^totals:' "$dir/out.$1" | head -1 | awk '{print $2}'
}
base=$(total 0)
with=$(total "$n")
echo "redis-server (appendfsync $fsync): $(( (with - base) / n )) instructions per XADD ($with - $base over $n); callgrind files in $dir"

#!/bin/bash
# Instructions per WebSocket publish, counted by callgrind (repeatable on a busy machine).
#
#   bench/ws-publish-callgrind.sh BIN N [WINDOW] [ENGINE]
#
# Runs `BIN serve` (ENGINE, default memory; anonymous allowed) under callgrind twice: once
# with one `/v1/ws` connection (`spool.v1.json`) that sends N `publish` frames of 256 B, at
# most WINDOW (default 16) unanswered, and waits for every `ack`; once with the same
# connection and no publish. The difference of the two totals divided by N is the server's
# instructions per WebSocket publish (decode, append, ack).
set -euo pipefail
. "$(dirname "$0")/servers.sh"
bin=$1; n=$2; window=${3:-16}; engine=${4:-memory}
dir=$(mktemp -d)
total() {
    local port
    port=$(free_port)
    valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1" "$bin" serve \
        --listen 127.0.0.1:$port --engine "$engine" --data-dir "$dir/data.$1" \
        --allow-anonymous >"$dir/log.$1" 2>&1 &
    local pid=$!
    await_server "$pid" "$dir/log.$1" curl -sf "http://127.0.0.1:$port/healthz"
    timeout 1500 python3 - "$port" "$1" "$window" <<'PY'
import asyncio, base64, os, sys
port, n, window = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def frame(text):
    data = text.encode(); mask = os.urandom(4)
    ln = len(data)
    hdr = bytes([0x81]) + (bytes([0x80 | ln]) if ln < 126 else bytes([0x80 | 126]) + ln.to_bytes(2, "big"))
    return hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

async def read_frame(r):
    h = await r.readexactly(2)
    op, ln = h[0] & 0x0F, h[1] & 0x7F
    if ln == 126: ln = int.from_bytes(await r.readexactly(2), "big")
    elif ln == 127: ln = int.from_bytes(await r.readexactly(8), "big")
    return op, await r.readexactly(ln)

async def main():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write((f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: spool.v1.json\r\n\r\n").encode())
    await r.readuntil(b"\r\n\r\n")
    w.write(frame('{"type":"connect"}'))
    while True:
        op, p = await read_frame(r)
        if p.startswith(b'{"type":"connected"'): break
    payload = "x" * 256
    sent = acked = 0
    while acked < n:
        while sent < n and sent - acked < window:
            sent += 1
            w.write(frame('{"type":"publish","id":%d,"stream":"bench","data":"%s"}' % (sent, payload)))
        await w.drain()
        op, p = await read_frame(r)
        if op == 0x9:
            mask = os.urandom(4)
            w.write(bytes([0x8A, 0x80 | len(p)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(p)))
        elif p.startswith(b'{"type":"ack"'):
            acked += 1
        elif p.startswith(b'{"type":"error"'):
            raise SystemExit(f"publish refused: {p!r}")
    w.close()
    print(f"acked {acked}", file=sys.stderr)

asyncio.run(main())
PY
    kill -TERM "$pid"; wait "$pid" || true
    grep -h '^summary:\|^totals:' "$dir/out.$1" | head -1 | awk '{print $2}'
}
base=$(total 0)
with=$(total "$n")
echo "$bin: $(( (with - base) / n )) instructions per WebSocket publish ($with - $base over $n publishes); callgrind files in $dir"

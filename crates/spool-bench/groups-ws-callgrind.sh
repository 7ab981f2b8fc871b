#!/bin/bash
# Instructions per consumer-group message received and acked over the WebSocket protocol,
# counted by callgrind: groups-callgrind.sh's method with a WebSocket member.
#
#   crates/spool-bench/groups-ws-callgrind.sh BIN N BATCH [DURABILITY]
#
# Runs `BIN serve --engine disk --durability DURABILITY` (default fsync; `memory` for the
# level of spool-bench's spool-ws-write) under callgrind twice, each time preloading N messages
# of 256 B (POST /v1/publish) and creating a group; the second run then drains the group with
# one member on /v1/ws (spool.v1.json): `consume` with credit = BATCH, and for each window of
# leases one `ack` frame per receipt, written together, then their `settled` answers — as
# spool-bench groups --targets spool-ws does. The difference of the two totals divided by N
# is the server's instructions per message; the callgrind file of the second run is kept.
set -euo pipefail
. "$(dirname "$0")/../../bench/servers.sh"
bin=$1; n=$2; batch=$3; durability=${4:-fsync}
dir=$(mktemp -d)
total() {
    local port
    port=$(free_port)
    valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1" "$bin" serve \
        --listen 127.0.0.1:$port --engine disk --data-dir "$dir/data.$1" \
        --durability "$durability" --api-key k >"$dir/log.$1" 2>&1 &
    local pid=$!
    await_server "$pid" "$dir/log.$1" curl -sf "http://127.0.0.1:$port/readyz"
    python3 - "$port" "$n" "$batch" "$1" <<'PY'
import base64, http.client, json, os, socket, struct, sys
port, n, batch, drain = (int(a) for a in sys.argv[1:5])
h = {"Authorization": "Bearer k", "Content-Type": "application/json"}
c = http.client.HTTPConnection("127.0.0.1", port)
def call(method, path, body, want):
    c.request(method, path, json.dumps(body), h)
    r = c.getresponse(); data = r.read()
    assert r.status == want, (r.status, data)
sent = 0
while sent < n:
    k = min(1000, n - sent)
    call("POST", "/v1/publish", {"messages": [{"stream": "bench", "data": "x" * 256}] * k}, 201)
    sent += k
call("PUT", "/v1/streams/bench/groups/g", {"start": "oldest", "max_in_flight": 100000}, 201)
if not drain:
    sys.exit(0)
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
           f"Sec-WebSocket-Protocol: spool.v1.json\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(65536)
head, buf = buf.split(b"\r\n\r\n", 1)
assert b" 101 " in head.split(b"\r\n")[0], head
def frame(text):
    data = text.encode(); mask = os.urandom(4)
    n = len(data)
    hdr = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    return hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))
def frames():
    global buf
    while True:
        while len(buf) >= 2:
            ln = buf[1] & 0x7F; off = 2
            if ln == 126:
                if len(buf) < 4: break
                ln = struct.unpack(">H", buf[2:4])[0]; off = 4
            elif ln == 127:
                if len(buf) < 10: break
                ln = struct.unpack(">Q", buf[2:10])[0]; off = 10
            if len(buf) < off + ln: break
            op = buf[0] & 0x0F; payload = buf[off:off + ln]; buf = buf[off + ln:]
            if op == 1:
                yield json.loads(payload)
        chunk = s.recv(1 << 20)
        assert chunk, "server closed"
        buf += chunk
rx = frames()
def until(kind):
    for f in rx:
        assert f["type"] != "error", f
        if f["type"] == kind:
            return f
        if f["type"] == "leased":
            leases.append(f["receipt"])
leases = []
s.sendall(frame(json.dumps({"type": "connect", "token": "k"}))); until("connected")
s.sendall(frame(json.dumps({"type": "consume", "id": 0, "stream": "bench", "group": "g",
                            "consumer": "m", "credit": batch}))); until("consuming")
acked = 0; next_id = 1
while acked < n:
    while len(leases) < min(batch, n - acked):
        f = next(rx)
        assert f["type"] != "error", f
        if f["type"] == "leased":
            leases.append(f["receipt"])
    window, leases = leases[:batch], leases[batch:]
    out = b""
    for r in window:
        out += frame(json.dumps({"type": "ack", "id": next_id, "stream": "bench", "group": "g", "receipts": [r]}, separators=(",", ":")))
        next_id += 1
    s.sendall(out)
    for _ in window:
        f = until("settled")
        assert all(r["result"] == "ok" for r in f["results"]), f
    acked += len(window)
assert acked == n, acked
PY
    kill -TERM "$pid"; wait "$pid" || true
    grep -h '^summary:\|^totals:' "$dir/out.$1" | head -1 | awk '{print $2}'
}
base=$(total 0)
with=$(total 1)
echo "$bin: $(( (with - base) / n )) instructions per message received and acked over WebSocket (batch $batch, --durability $durability; $with - $base over $n); callgrind file: $dir/out.1"

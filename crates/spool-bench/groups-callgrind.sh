#!/bin/bash
# Instructions per consumer-group message (receive + ack), counted by callgrind.
#
#   crates/spool-bench/groups-callgrind.sh BIN N BATCH [ENGINE]
#
# Runs `BIN serve` (ENGINE, default disk with --durability fsync) under callgrind twice, each
# time preloading N messages of 256 B in batches (POST /v1/publish) and creating a group; the
# second run then drains the group with one member: receive up to BATCH, ack them, until empty.
# The difference of the two totals divided by N is the server's instructions per message
# received and acked; the callgrind file of the second run is kept for callgrind_annotate.
set -euo pipefail
. "$(dirname "$0")/../../bench/servers.sh"
bin=$1; n=$2; batch=$3; engine=${4:-disk}
dir=$(mktemp -d)
total() {
    local port
    port=$(free_port)
    local flags=(--engine "$engine")
    [ "$engine" = disk ] && flags+=(--data-dir "$dir/data.$1" --durability fsync)
    valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1" "$bin" serve \
        --listen 127.0.0.1:$port "${flags[@]}" --api-key k >"$dir/log.$1" 2>&1 &
    local pid=$!
    await_server "$pid" "$dir/log.$1" curl -sf "http://127.0.0.1:$port/healthz"
    python3 - "$port" "$n" "$batch" "$1" <<'PY'
import http.client, json, sys
port, n, batch, drain = (int(a) for a in sys.argv[1:5])
h = {"Authorization": "Bearer k", "Content-Type": "application/json"}
c = http.client.HTTPConnection("127.0.0.1", port)
def call(method, path, body, want):
    c.request(method, path, json.dumps(body), h)
    r = c.getresponse(); data = r.read()
    assert r.status == want, (r.status, data)
    return json.loads(data) if data else None
sent = 0
while sent < n:
    k = min(1000, n - sent)
    call("POST", "/v1/publish", {"messages": [{"stream": "bench", "data": "x" * 256}] * k}, 201)
    sent += k
call("PUT", "/v1/streams/bench/groups/g", {"start": "oldest", "max_in_flight": 100000}, 201)
acked = 0
while drain:
    got = call("POST", "/v1/streams/bench/groups/g/receive", {"consumer": "m", "max": batch}, 200)
    receipts = [m["receipt"] for m in got["messages"]]
    if not receipts:
        break
    res = call("POST", "/v1/streams/bench/groups/g/ack", {"receipts": receipts}, 200)
    assert all(r["result"] == "ok" for r in res["results"]), res
    acked += len(receipts)
assert not drain or acked == n, acked
PY
    kill -TERM "$pid"; wait "$pid" || true
    grep -h '^summary:\|^totals:' "$dir/out.$1" | head -1 | awk '{print $2}'
}
base=$(total 0)
with=$(total 1)
echo "$bin: $(( (with - base) / n )) instructions per message received and acked (batch $batch; $with - $base over $n); callgrind file: $dir/out.1"

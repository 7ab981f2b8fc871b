#!/bin/bash
# Instructions per HTTP publish, counted by callgrind (repeatable on a busy machine).
#
#   bench/publish-callgrind.sh BIN N [ENGINE]
#
# Runs `BIN serve` (ENGINE, default memory; an API key) under callgrind twice: once with N
# publishes of 256 B over one kept-alive connection and N more over a new connection each,
# once with none. The difference of the two totals divided by 2N is the server's instructions
# per publish (accept, parse, auth, append, answer).
set -euo pipefail
. "$(dirname "$0")/servers.sh"
bin=$1; n=$2; engine=${3:-memory}
dir=$(mktemp -d)
total() {
    local port
    port=$(free_port)
    valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1" "$bin" serve \
        --listen 127.0.0.1:$port --engine "$engine" --data-dir "$dir/data.$1" \
        --api-key k >"$dir/log.$1" 2>&1 &
    local pid=$!
    await_server "$pid" "$dir/log.$1" curl -sf "http://127.0.0.1:$port/healthz"
    python3 - "$port" "$1" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
body = b"x" * 256
h = {"Authorization": "Bearer k", "Content-Type": "text/plain"}
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    c.request("POST", "/v1/streams/bench/messages", body, h)
    r = c.getresponse(); r.read()
    assert r.status == 201, r.status
c.close()
for i in range(n):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("POST", "/v1/streams/bench/messages", body, h)
    r = c.getresponse(); r.read()
    assert r.status == 201, r.status
    c.close()
PY
    kill -TERM "$pid"; wait "$pid" || true
    grep -h '^summary:\|^totals:' "$dir/out.$1" | head -1 | awk '{print $2}'
}
base=$(total 0)
with=$(total "$n")
echo "$bin: $(( (with - base) / (2 * n) )) instructions per publish ($with - $base over $(( 2 * n )) publishes); callgrind files in $dir"

# Sourced by fanout-callgrind.sh and fanout-syscalls.sh: their arguments (BIN N_WS N_SSE K
# [STREAMS]) and one run of their fan-out load with the server under a measuring tool.
bin=$1; nws=$2; nsse=$3; k=$4; streams=${5:-1}
dir=$(mktemp -d)
here=$(cd "$(dirname "$0")" && pwd)
. "$here/servers.sh"

# fanout_run K TOOL...: `BIN serve` (memory engine, anonymous) started under TOOL..., then
# fanout-callgrind.py's load with K messages per stream, then SIGTERM to the server and the wait
# for the tool. The server's log goes to $dir/log.K.
fanout_run() {
    local k=$1; shift
    local port
    port=$(free_port)
    "$@" "$bin" serve --listen 127.0.0.1:$port --engine memory --allow-anonymous \
        >"$dir/log.$k" 2>&1 &
    local pid=$!
    await_server "$pid" "$dir/log.$k" curl -sf "http://127.0.0.1:$port/healthz"
    # The server: the tool's child where the tool forks it (strace -f), else the tool's process.
    local server
    server=$(pgrep -P "$pid" -n || echo "$pid")
    timeout 1500 python3 "$here/fanout-callgrind.py" "$port" "$server" "$nws" "$nsse" "$k" "$streams" >&2
    kill -TERM "$server"; wait "$pid" || true
}

# Sourced by the bench scripts that start a server to measure (under callgrind or strace):
# picking its port and waiting for it.

# free_port: a port the kernel says is free now (a random one could be another server's).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# await_server PID LOG PROBE...: waits up to 120 s for PROBE... to succeed, then stops the
# script if the server PID exited meanwhile (the last lines of its LOG say why).
await_server() {
    local pid=$1 log=$2
    shift 2
    for _ in $(seq 1 120); do "$@" >/dev/null 2>&1 && break; sleep 1; done
    kill -0 "$pid" 2>/dev/null || { echo "$0: the server exited: $(tail -3 "$log")" >&2; exit 1; }
}

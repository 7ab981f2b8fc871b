#!/usr/bin/env bash
# Builds Spool and its load generator in release mode, then runs a benchmark.
#
#   scripts/bench.sh                         # publish (HTTP): 1,16,64 clients, 256 B, 20k msgs/run
#   scripts/bench.sh --clients 1,8 --size 1024 --json /tmp/bench.json
#   scripts/bench.sh --server-arg=--dedup-window=1m
#
#   scripts/bench.sh ws                      # every WebSocket benchmark (about 6–8 minutes)
#   scripts/bench.sh ws-fanout [ARGS…]       # one of them: ws-fanout, ws-idle, ws-resume, ws-publish
#   scripts/bench.sh ws --out DIR            # also keep each one's JSON in DIR (default target/bench-ws)
#
#   scripts/bench.sh cluster [ARGS…]         # cluster engines: disk ×1, redis ×1/×3, nats ×1/×3 (≈ 2 min)
#
#   bench/issue14.sh [OUT_DIR]               # every row of issue 14's table in one run, each against
#                                            # its peer, plus the callgrind counts (see its header)
#
# Without a ws* or cluster word, every argument goes to `spool-bench publish` (see `spool-bench
# publish --help`); after a ws-* or cluster word, to that subcommand (`spool-bench ws-fanout
# --help`, `spool-bench cluster --help`, …). Servers are started on free 127.0.0.1 ports and
# stopped at the end.
#
# `cluster` needs redis-server and nats-server on the PATH (it starts its own, on spare ports in
# temporary directories; never the machine's shared ones).
#
# The WebSocket benchmarks also need Node.js 20+ with npm (the socket.io peer in bench/, set up
# here with `npm ci`), nats-server and redis-server on the PATH, and about 11,000 open files per
# process: this script raises the soft limit (`ulimit -n`) as far as the hard limit allows.
set -euo pipefail

cd "$(dirname "$0")/.."

mode=publish
case "${1:-}" in
ws | ws-fanout | ws-idle | ws-resume | ws-publish | cluster)
    mode=$1
    shift
    ;;
esac

cargo build --release -p spool -p spool-bench

if [[ $mode == publish ]]; then
    exec target/release/spool-bench publish "$@"
fi

if [[ $mode == cluster ]]; then
    for tool in nats-server redis-server; do
        if ! command -v "$tool" >/dev/null; then
            echo "bench.sh: $tool is needed for the cluster benchmark but is not on the PATH" >&2
            exit 1
        fi
    done
    # 1,000 subscribers by default: a few thousand descriptors are plenty.
    ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    echo "bench.sh: machine: $(nproc) CPUs, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    exec target/release/spool-bench cluster "$@"
fi

# --- WebSocket benchmarks ---------------------------------------------------------------------

for tool in node npm nats-server redis-server; do
    if ! command -v "$tool" >/dev/null; then
        echo "bench.sh: $tool is needed for the WebSocket benchmarks but is not on the PATH" >&2
        exit 1
    fi
done
if [[ ! -d bench/node_modules/socket.io ]]; then
    echo "bench.sh: installing the socket.io peer (npm ci --prefix bench)" >&2
    npm ci --prefix bench --no-audit --no-fund >&2
fi

# 10,000 connections need 10,000 descriptors in the load generator and as many in each server.
wanted=65536
if ! ulimit -n "$wanted" 2>/dev/null; then
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi
limit=$(ulimit -n)
echo "bench.sh: open-files limit is $limit (hard limit $(ulimit -Hn)); wanted $wanted" >&2
if [[ $limit != unlimited && $limit -lt 11000 ]]; then
    echo "bench.sh: WARNING: $limit open files are too few for 10,000 connections; raise the hard" \
        "limit (e.g. /etc/security/limits.conf, or run as root) or pass fewer connections" >&2
fi

if [[ $mode != ws ]]; then
    exec target/release/spool-bench "$mode" "$@"
fi

out=target/bench-ws
if [[ ${1:-} == --out ]]; then
    out=$2
    shift 2
fi
if [[ $# -gt 0 ]]; then
    echo "bench.sh: 'ws' runs every WebSocket benchmark with its defaults; pass options to one" \
        "of them instead (scripts/bench.sh ws-fanout --subscribers 2000 …)" >&2
    exit 2
fi
mkdir -p "$out"
echo "bench.sh: machine: $(nproc) CPUs, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
status=0
for bench in ws-fanout ws-idle ws-resume ws-publish; do
    echo "bench.sh: === $bench ===" >&2
    start=$SECONDS
    target/release/spool-bench "$bench" --json "$out/$bench.json" || status=1
    echo "bench.sh: $bench took $((SECONDS - start)) s" >&2
done
exit $status

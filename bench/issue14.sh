#!/usr/bin/env bash
# Every row of issue 14's table, re-measured in ONE run, each against its peer in the same run.
#
#   bench/issue14.sh [OUT_DIR]          # default OUT_DIR: target/bench-issue14/<UTC time>
#   ROWS="ws-idle http-publish" bench/issue14.sh /tmp/out   # only some rows (names below)
#   REV=abc1234 bench/issue14.sh        # another commit than HEAD
#
# Builds the release binaries once, of a commit (REV, default HEAD) and not of the working
# tree (which may hold others' uncommitted edits): `git archive REV` is synced (rsync -c, so
# unchanged files keep their times and the next build is incremental) into
# target/issue14-build/src and built there with its own target dir, target/issue14-build/target
# (`cargo build --release -p spool -p spool-bench`; no wait on target/'s lock). The binaries
# are copied into OUT_DIR/bin, then each row's existing benchmark runs, back to back:
#
#   row            command (SB = OUT_DIR/bin/spool-bench, BIN = OUT_DIR/bin/spool)
#   ws-idle        SB ws-idle    --targets spool,socketio,nats --connections 10000
#   sse-idle       SB sse-idle   --connections 10000                      (no peer exists)
#   ws-publish     SB ws-publish --targets spool-fsync,redis --clients 8,32   (16 in flight)
#   http-publish   SB publish    --targets spool-fsync,redis --clients 64 --messages 60000
#                  (one keep-alive HTTP/1.1 connection per client vs one XADD per message,
#                  appendfsync always; the "Durable publish" section of docs/benchmarks.md)
#   ws-fanout      SB ws-fanout  --targets spool,socketio,nats --streams 1000,1
#                                --rates 100000,20000    (max phase + two fixed rates)
#   retained       SB retained   (1 GiB over 1,000 streams, live and restarted; resume 100k
#                  behind against JetStream file storage; markdown only, no JSON)
#   callgrind      bench/ws-publish-callgrind.sh BIN 2000 16 disk     (durable WS publish)
#                  bench/redis-publish-callgrind.sh 2000 16           (its peer: XADD, always)
#                  bench/publish-callgrind.sh BIN 500 disk            (HTTP publish, fsync)
#                  bench/redis-publish-callgrind.sh 1000 1            (its peer: one XADD at a time)
#                  OUT_DIR/http-keepalive-callgrind.sh BIN 1000       (HTTP publish, one kept-alive
#                                          connection only; written by this script)
#                  bench/fanout-callgrind.sh BIN 1000 0 20 100        (100 streams × 10 WS subs)
#   (strace)       the WS publish, XADD and kept-alive HTTP publish loads again, the server under
#                  `strace -f -c` instead (copies of those scripts made in OUT_DIR): system calls
#                  per publish, the kernel side that callgrind does not count
#
# Each row writes OUT_DIR/<row>.json (where the benchmark has --json), .md (its stdout) and .log
# (its stderr), and OUT_DIR/times.txt how long it took; at the end OUT_DIR/summary.md holds one
# table: measured / peer / ratio / goal / met? per row (printed too). Callgrind's output files
# are kept under OUT_DIR/callgrind-* for callgrind_annotate.
#
# Stops by itself: every row runs in its own process group under a time limit (SIGINT, then
# SIGKILL to the group), and an interrupted script stops the row it is in. Every server is
# started by the benchmarks on 127.0.0.1 (never the machine's shared Redis or NATS).
# Needs redis-server, nats-server, node + npm (the socket.io peer, `npm ci --prefix bench`),
# valgrind, python3, curl, and ~11,000 open files (the soft limit is raised to the hard one).
# About 10 minutes on the shared 2-core machine with ROUNDS=3, plus the build (3–7 minutes
# incremental, 24 from nothing at load 7): 13 minutes in all for docs/benchmarks.md's
# "All rows in one run". Memory and instruction counts are robust to
# a noisy machine; the wall-clock rows (publish throughput, fan-out rates and latencies) are
# not, so those rows (ws-publish, http-publish, ws-fanout) run ROUNDS times (default 3), in
# turn, each round's JSON as <row>.<round>.json.
set -uo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
out=${1:-target/bench-issue14/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rows=${ROWS:-"ws-idle sse-idle ws-publish http-publish ws-fanout retained callgrind"}

say() { echo "issue14.sh: $*" >&2; }

for tool in cargo redis-server redis-cli nats-server node npm valgrind python3 curl setsid; do
    command -v "$tool" >/dev/null || { say "$tool is needed but not on the PATH"; exit 1; }
done
if [[ ! -d bench/node_modules/socket.io ]]; then
    say "installing the socket.io peer (npm ci --prefix bench)"
    npm ci --prefix bench --no-audit --no-fund >&2 || exit 1
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt 11000 ]]; then
    say "WARNING: open-files limit $(ulimit -n) is too low for 10,000 connections"
fi

# --- build once ------------------------------------------------------------------------------
start_all=$SECONDS
rev=$(git rev-parse --short "${REV:-HEAD}") || exit 1
build=$repo/target/issue14-build
mkdir -p "$build/src" "$build/export"
rm -rf "$build/export" && mkdir -p "$build/export"
git archive "$rev" | tar -x -C "$build/export" || { say "git archive $rev failed"; exit 1; }
rsync -rc --delete --exclude=/target "$build/export/" "$build/src/" || exit 1
say "building $rev (cargo build --release -p spool -p spool-bench in $build/src)"
(cd "$build/src" && CARGO_TARGET_DIR=$build/target cargo build --release -p spool -p spool-bench) >&2 \
    || { say "build failed"; exit 1; }
mkdir -p "$out/bin"
cp "$build/target/release/spool" "$build/target/release/spool-bench" "$out/bin/"
bin=$out/bin/spool
sb=$out/bin/spool-bench
{
    echo "commit: $rev ($(git log -1 --format='%cd: %s' --date=format:'%H:%M' "$rev" | cut -c1-110))"
    echo "started: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) CPUs, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "build: $((SECONDS - start_all)) s"
} | tee "$out/run.txt" >&2
: >"$out/times.txt"

# --- running one row, bounded ------------------------------------------------------------------
current=
stop_current() {
    if [[ -n $current ]] && kill -0 "$current" 2>/dev/null; then
        kill -INT -- "-$current" 2>/dev/null
        sleep 5
        kill -KILL -- "-$current" 2>/dev/null
    fi
}
trap 'say "interrupted"; stop_current; exit 130' INT TERM

# bounded NAME LIMIT_S CMD…: runs CMD in its own process group, stdout to NAME.md, stderr to
# NAME.log; past LIMIT_S, SIGINT to the group (spool-bench stops its servers on it), SIGKILL
# 30 s later.
bounded() {
    local name=$1 limit=$2
    shift 2
    say "=== $name: $* (limit ${limit}s; load $(cut -d' ' -f1-3 /proc/loadavg))"
    local t0=$SECONDS status
    setsid "$@" >"$out/$name.md" 2>"$out/$name.log" &
    current=$!
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        sleep "$limit" &
        nap=$!
        wait "$nap"
        kill -INT -- "-$current" 2>/dev/null && echo "TIMED OUT after ${limit}s" >>"$out/$name.log"
        sleep 30 &
        nap=$!
        wait "$nap"
        kill -KILL -- "-$current" 2>/dev/null
    ) &
    local watchdog=$!
    wait "$current"
    status=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    # Whatever the row left in its group (valgrind'd servers of a failed callgrind script).
    kill -KILL -- "-$current" 2>/dev/null
    current=
    echo "$name $((SECONDS - t0)) s exit $status load $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/times.txt"
    say "$name took $((SECONDS - t0)) s (exit $status)"
    return 0
}

# callgrind NAME LIMIT_S SCRIPT ARGS…: a callgrind script, once more if it printed no count;
# its callgrind files (the directory it prints) are moved to OUT_DIR/callgrind-NAME.
callgrind() {
    local name=$1 limit=$2 dir
    shift 2
    bounded "$name" "$limit" "$@"
    if ! grep -q 'instructions per\|system calls per' "$out/$name.md"; then
        mv "$out/$name.log" "$out/$name.1.log"
        bounded "$name" "$limit" "$@"
    fi
    dir=$(grep -o '\(callgrind files\|strace summaries\) in [^ ]*' "$out/$name.md" | awk '{print $NF}')
    if [[ -n $dir && -d $dir ]]; then
        mv "$dir" "$out/files-$name"
    fi
}

want() { [[ " $rows " == *" $1 "* ]]; }

want ws-idle && bounded ws-idle 900 \
    "$sb" ws-idle --spool-bin "$bin" --targets spool,socketio,nats --connections 10000 \
    --json "$out/ws-idle.json"
want sse-idle && bounded sse-idle 600 \
    "$sb" sse-idle --spool-bin "$bin" --connections 10000 --json "$out/sse-idle.json"
# The wall-clock rows, ROUNDS times (default 3: a spread to read them by), in turn.
for r in $(seq 1 "${ROUNDS:-3}"); do
    want ws-publish && bounded "ws-publish.$r" 600 \
        "$sb" ws-publish --spool-bin "$bin" --targets spool-fsync,redis --clients 8,32 \
        --json "$out/ws-publish.$r.json"
    want http-publish && bounded "http-publish.$r" 900 \
        "$sb" publish --spool-bin "$bin" --targets spool-fsync,redis --clients 64 \
        --messages 60000 --baseline redis-aof-always --json "$out/http-publish.$r.json"
    want ws-fanout && bounded "ws-fanout.$r" 1500 \
        "$sb" ws-fanout --spool-bin "$bin" --targets spool,socketio,nats --streams 1000,1 \
        --rates 100000,20000 --json "$out/ws-fanout.$r.json"
done
want retained && bounded retained 1200 "$sb" retained --spool-bin "$bin"
if want callgrind; then
    callgrind cg-ws-publish 1200 "$build/src/bench/ws-publish-callgrind.sh" "$bin" 2000 16 disk
    callgrind cg-redis-16 900 "$build/src/bench/redis-publish-callgrind.sh" 2000 16
    callgrind cg-http-publish 1200 "$build/src/bench/publish-callgrind.sh" "$bin" 500 disk
    callgrind cg-redis-1 900 "$build/src/bench/redis-publish-callgrind.sh" 1000 1
    # publish-callgrind.sh counts half its publishes on a new connection each; the 64-connection
    # row keeps its connections, so count that alone too (same server, same requests).
    cat >"$out/http-keepalive-callgrind.sh" <<'SH'
#!/bin/bash
# Instructions per HTTP publish on one kept-alive connection (disk engine, fsync; an API key):
# publish-callgrind.sh without its new-connection half. Written by bench/issue14.sh.
#   http-keepalive-callgrind.sh BIN N
set -euo pipefail
bin=$1; n=$2
dir=$(mktemp -d)
total() {
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1" "$bin" serve \
        --listen 127.0.0.1:$port --engine disk --data-dir "$dir/data.$1" --api-key k \
        >"$dir/log.$1" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 1; done
    kill -0 "$pid" 2>/dev/null || { echo "$0: the server exited: $(tail -3 "$dir/log.$1")" >&2; exit 1; }
    timeout 1500 python3 - "$port" "$1" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
h = {"Authorization": "Bearer k", "Content-Type": "text/plain"}
c = http.client.HTTPConnection("127.0.0.1", port)
c.request("GET", "/healthz"); r = c.getresponse(); r.read()
for i in range(n):
    c.request("POST", "/v1/streams/bench/messages", b"x" * 256, h)
    r = c.getresponse(); r.read()
    assert r.status == 201, r.status
c.close()
PY
    kill -TERM "$pid"; wait "$pid" || true
    grep -h '^summary:\|^totals:' "$dir/out.$1" | head -1 | awk '{print $2}'
}
base=$(total 0)
with=$(total "$n")
echo "$bin: $(( (with - base) / n )) instructions per kept-alive publish ($with - $base over $n publishes); callgrind files in $dir"
SH
    chmod +x "$out/http-keepalive-callgrind.sh"
    callgrind cg-http-keepalive 1200 "$out/http-keepalive-callgrind.sh" "$bin" 1000
    callgrind cg-fanout 1500 "$build/src/bench/fanout-callgrind.sh" "$bin" 1000 0 20 100
    # The kernel's side, which callgrind does not count: system calls per publish, the same
    # loads with the server under `strace -f -c` (copies of the callgrind scripts, made here).
    cp "$build/src/bench/servers.sh" "$out/"
    for s in "$build/src/bench/ws-publish-callgrind.sh" "$build/src/bench/redis-publish-callgrind.sh" \
        "$out/http-keepalive-callgrind.sh"; do
        sed -e 's#valgrind --tool=callgrind --callgrind-out-file="$dir/out.$1"#strace -f -c -o "$dir/strace.$1"#' \
            -e 's#kill -TERM "$pid"#kill -TERM "$(pgrep -P "$pid" -n || echo "$pid")"#' \
            -e "s#grep -h '^summary:.*#awk '\$NF ~ /^[a-z_0-9]+\$/ \&\& \$NF != \"total\" \&\& \$4 ~ /^[0-9]+\$/ { n += \$4 } END { print n + 0 }' \"\$dir/strace.\$1\"#" \
            -e 's#\$(( (with - base) / n )) instructions#$(python3 -c "print(round(($with - $base) / $n, 2))") system calls#' \
            -e 's#callgrind files in#strace summaries in#' \
            "$s" >"$out/$(basename "$s" -callgrind.sh)-strace.sh"
        chmod +x "$out/$(basename "$s" -callgrind.sh)-strace.sh"
    done
    callgrind st-ws-publish 600 "$out/ws-publish-strace.sh" "$bin" 2000 16 disk
    callgrind st-redis-16 600 "$out/redis-publish-strace.sh" 2000 16
    callgrind st-http-keepalive 600 "$out/http-keepalive-strace.sh" "$bin" 1000
    callgrind st-redis-1 600 "$out/redis-publish-strace.sh" 1000 1
fi
trap - INT TERM

echo "total: $((SECONDS - start_all)) s (build included); ended $(date -u '+%H:%M:%S UTC')" \
    | tee -a "$out/run.txt" >&2

# --- summary -----------------------------------------------------------------------------------
python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, os, re, sys

out = sys.argv[1]

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def text(name):
    try:
        with open(os.path.join(out, name)) as f:
            return f.read()
    except OSError:
        return ""

rows = []  # (row, measured, peer, ratio, goal, met)

def rounds(bench):
    """(label suffix, parsed JSON) of each round's BENCH.R.json (BENCH.json: one, unlabelled)."""
    found = sorted((int(n.split(".")[1]), n) for n in os.listdir(out)
                   if re.fullmatch(re.escape(bench) + r"\.\d+\.json", n))
    if not found:
        d = load(bench + ".json")
        return [("", d)] if d else []
    return [(f" [round {r}]" if len(found) > 1 else "", load(n)) for r, n in found
            if load(n) is not None]

def f(x, spec=".2f"):
    return "—" if x is None else format(x, spec)

def ratio(a, b):
    return None if a is None or not b else a / b

# ws-idle
d = load("ws-idle.json")
if d:
    per = {t["target"]: t["kib_per_connection"]["total"] for t in d["targets"]}
    s, io, nats = per.get("spool"), per.get("socketio"), per.get("nats")
    rows.append(("idle WS conn, 10,000 conns (`ws-idle`), KiB/conn", f(s),
                 f"socket.io {f(io)}, NATS {f(nats)}", f"{f(ratio(s, io))}× socket.io, {f(ratio(s, nats))}× NATS",
                 "≤ 6 KiB", "yes" if s is not None and s <= 6 else "no"))
# sse-idle
d = load("sse-idle.json")
if d:
    s = d.get("kib_per_connection")
    rows.append(("idle SSE conn, 10,000 conns (`sse-idle`), KiB/conn", f(s), "— (no SSE peer)", "—",
                 "≤ 6 KiB", "yes" if s is not None and s <= 6 else "no"))
# ws-publish
for tag, d in rounds("ws-publish"):
    by = {(r["target"], r["clients"]): r for r in d["runs"]}
    for c in (8, 32):
        a, b = by.get(("spool-fsync", c)), by.get(("redis-aof-always", c))
        if not a or not b:
            continue
        r = ratio(a["msgs_per_sec"], b["msgs_per_sec"])
        rows.append((f"WS publish fsync, {c} conns × 16 (`ws-publish`), msgs/s{tag}",
                     f"{a['msgs_per_sec']:.0f} (p99 {f(a['latency']['p99_ms'], '.1f')} ms)",
                     f"Redis {b['msgs_per_sec']:.0f} (p99 {f(b['latency']['p99_ms'], '.1f')} ms)",
                     f"{f(r)}×", "≥ 1.5×", "yes" if r and r >= 1.5 else "no"))
        sa, sb_ = a.get("server_us_per_msg"), b.get("server_us_per_msg")
        rows.append((f"  server CPU per msg, {c} conns, µs{tag}", f(sa), f"Redis {f(sb_)}",
                     f"{f(ratio(sa, sb_))}×", "≤ Redis", "yes" if sa is not None and sb_ and sa <= sb_ else "no"))
# http publish
for tag, d in rounds("http-publish"):
    by = {r["target"]: r for r in d["runs"]}
    a, b = by.get("spool-fsync"), by.get("redis-aof-always")
    if a and b:
        r = ratio(a["msgs_per_sec"], b["msgs_per_sec"])
        p99 = a["latency"]["p99_ms"]
        rows.append((f"HTTP publish fsync, 64 conns (`publish`), msgs/s{tag}",
                     f"{a['msgs_per_sec']:.0f} (p99 {f(p99)} ms, {f(a.get('server_us_per_msg'), '.1f')} µs CPU/msg)",
                     f"Redis XADD {b['msgs_per_sec']:.0f} (p99 {f(b['latency']['p99_ms'])} ms, {f(b.get('server_us_per_msg'), '.1f')} µs)",
                     f"{f(r)}×", "≥ 1.5×, p99 ≤ 5 ms",
                     "yes" if r and r >= 1.5 and p99 is not None and p99 <= 5 else "no"))
    rb = d.get("read_back") or []
    if rb and not all(x.get("ok") for x in rb):
        rows.append(("  HTTP publish read-back", "PROBLEMS", "", "", "", "no"))
# ws-fanout
for tag, d in rounds("ws-fanout"):
    sc = {(s["target"], s["streams"]): s for s in d["scenarios"]}
    def phase(t, streams, mode):
        s = sc.get((t, streams))
        if not s:
            return None
        for p in s["phases"]:
            if p["mode"] == mode:
                return p
        return None
    for streams in (1000, 1):
        shape = "1,000 streams × 10" if streams == 1000 else "1 stream × 10,000"
        m = {t: phase(t, streams, "max") for t in ("spool", "socketio", "nats")}
        if m["spool"]:
            s = m["spool"]["deliveries_per_sec"]
            io = m["socketio"] and m["socketio"]["deliveries_per_sec"]
            na = m["nats"] and m["nats"]["deliveries_per_sec"]
            r = ratio(s, io)
            if streams == 1000:
                rows.append((f"fan-out {shape}, max phase (`ws-fanout`), deliveries/s{tag}", f(s, ".0f"),
                             f"socket.io {f(io, '.0f')}, NATS {f(na, '.0f')}",
                             f"{f(r)}× socket.io, {f(ratio(s, na))}× NATS", "≥ 5× socket.io",
                             "yes" if r and r >= 5 else "no"))
            cs = m["spool"].get("server_us_per_delivery")
            cn = m["nats"] and m["nats"].get("server_us_per_delivery")
            rows.append((f"  server CPU per delivery, {shape}, max phase, µs{tag}", f(cs),
                         f"NATS {f(cn)}", f"{f(ratio(cs, cn))}×", "≤ NATS",
                         "yes" if cs is not None and cn and cs <= cn else "no"))
        if streams != 1000:
            continue
        for rate in ("rate 100k/s", "rate 20k/s"):
            p = {t: phase(t, streams, rate) for t in ("spool", "socketio", "nats")}
            if not p["spool"]:
                continue
            def desc(x, who):
                if not x:
                    return f"{who} —"
                lat = x["latency"]
                fb = " (fell behind)" if x.get("fell_behind") else ""
                return (f"{who} {x['deliveries_per_sec']:.0f}/s p50 {f(lat['p50_ms'], '.1f')} "
                        f"p99 {f(lat['p99_ms'], '.1f')} ms, {f(x.get('server_us_per_delivery'))} µs{fb}")
            s, n = p["spool"], p["nats"]
            met = (n and s["latency"]["p50_ms"] is not None and n["latency"]["p50_ms"] is not None
                   and s["latency"]["p50_ms"] <= n["latency"]["p50_ms"]
                   and s["latency"]["p99_ms"] <= n["latency"]["p99_ms"])
            note = "" if not (s.get("fell_behind") or (n and n.get("fell_behind"))) else " (a target fell behind)"
            rows.append((f"fan-out latency {shape} at {rate[5:]} offered{tag}", desc(s, "spool"),
                         desc(n, "NATS") + "; " + desc(p["socketio"], "socket.io"),
                         f"p50 {f(ratio(s['latency']['p50_ms'], n and n['latency']['p50_ms']))}×, "
                         f"p99 {f(ratio(s['latency']['p99_ms'], n and n['latency']['p99_ms']))}× NATS",
                         "p50, p99 ≤ NATS", ("yes" if met else "no") + note))
# retained
t = text("retained.md")
if t:
    def num(pattern):
        m = re.search(pattern, t)
        return float(m.group(1)) if m else None
    live = num(r"\| live, everything loaded \| ([\d.]+) MiB")
    rest = num(r"\| restarted \(ready in [\d.]+s\) \| ([\d.]+) MiB")
    rl = num(r"\| spool, live \(long-poll\) \| (\d+)")
    rc = num(r"\| spool, after a restart \(long-poll, nothing cached\) \| (\d+)")
    js = num(r"\| JetStream file storage \(pull consumer, fetch \d+\) \| (\d+)")
    for label, v in (("live", live), ("after restart", rest)):
        rows.append((f"disk RSS, 1 GiB retained, {label} (`retained`), MiB", f(v, ".1f"), "—", "—",
                     "≤ 128 MiB (64 MiB cache + 64)", "yes" if v is not None and v <= 128 else "no"))
    rows.append(("resume 100k behind, msgs/s (live / restarted)", f"{f(rl, '.0f')} / {f(rc, '.0f')}",
                 f"JetStream {f(js, '.0f')}", f"{f(ratio(rl, js))}× / {f(ratio(rc, js))}×", "(reported)", "—"))
# callgrind
def per(name, word):
    m = re.search(r"(\d+) instructions per " + word, text(name + ".md"))
    return int(m.group(1)) if m else None
w, r16 = per("cg-ws-publish", "WebSocket publish"), per("cg-redis-16", "XADD")
h, r1 = per("cg-http-publish", "publish"), per("cg-redis-1", "XADD")
hk = per("cg-http-keepalive", "kept-alive publish")
fo = per("cg-fanout", "delivery")
if w or r16:
    rows.append(("instructions per durable WS publish, 1 × 16 (callgrind)", f(w, "d"), f"Redis XADD ×16 {f(r16, 'd')}",
                 f"{f(ratio(w, r16))}×", "below Redis", "yes" if w and r16 and w < r16 else "no"))
if h or r1:
    rows.append(("instructions per durable HTTP publish, half on new connections (callgrind)", f(h, "d"), f"Redis XADD ×1 {f(r1, 'd')}",
                 f"{f(ratio(h, r1))}×", "(profile)", "—"))
if hk:
    rows.append(("  of which on one kept-alive connection (callgrind)", f(hk, "d"), f"Redis XADD ×1 {f(r1, 'd')}",
                 f"{f(ratio(hk, r1))}×", "(profile)", "—"))
def calls(name):
    m = re.search(r"([\d.]+) system calls per", text(name + ".md"))
    return float(m.group(1)) if m else None
sw, s16, shk, s1 = calls("st-ws-publish"), calls("st-redis-16"), calls("st-http-keepalive"), calls("st-redis-1")
if sw or s16:
    rows.append(("system calls per durable WS publish, 1 × 16 (strace -f -c)", f(sw), f"Redis XADD ×16 {f(s16)}",
                 f"{f(ratio(sw, s16))}×", "(profile)", "—"))
if shk or s1:
    rows.append(("system calls per kept-alive HTTP publish (strace -f -c)", f(shk), f"Redis XADD ×1 {f(s1)}",
                 f"{f(ratio(shk, s1))}×", "(profile)", "—"))
if fo:
    rows.append(("instructions per delivery, 100 streams × 10 WS (callgrind)", f(fo, "d"), "—", "—", "lower", "—"))

print("| row | measured | peer in the same run | ratio | goal | met? |")
print("|---|--:|--:|--:|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
print(open(os.path.join(out, "times.txt")).read().rstrip())
PY
say "results in $out (summary.md, run.txt, times.txt)"

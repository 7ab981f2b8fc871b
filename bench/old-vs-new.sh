#!/bin/bash
# Two spool binaries, old and new, through the same spool-bench runs, alternated in one run so
# that machine noise hits both: `publish` (disk engine, fsync), `ws-publish` (fsync and no-sync)
# and `ws-fanout` (10,000 subscribers on one stream and on 1,000 streams × 10).
#
#   bench/old-vs-new.sh OLD_BIN NEW_BIN [ROUNDS] [OUT_DIR]
#
# Round r runs every benchmark twice in a row, old then new (odd r) or new then old (even r),
# each writing its JSON to OUT_DIR/BENCH.{old,new}.r.json; then bench/old-vs-new.py prints the
# ratios new ÷ old per row and round, and their median. SPOOL_BENCH picks the load generator
# (default target/release/spool-bench); FANOUT_SUBSCRIBERS (default 10000) the fan-out size;
# FIRST_ROUND (default 1) numbers the rounds from there, to add rounds to an earlier OUT_DIR.
# Needs about FANOUT_SUBSCRIBERS + 1000 open files (`ulimit -n`).
set -euo pipefail
old=$1; new=$2; rounds=${3:-3}; out=${4:-$(mktemp -d)}
bench=${SPOOL_BENCH:-target/release/spool-bench}
subs=${FANOUT_SUBSCRIBERS:-10000}
first=${FIRST_ROUND:-1}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
run() { # NAME WHICH ROUND BIN ARGS…
    local name=$1 which=$2 r=$3 bin=$4; shift 4
    echo "== round $r: $name $which ($bin)" >&2
    "$bench" "$name" --spool-bin "$bin" "$@" --json "$out/$name.$which.$r.json" \
        >"$out/$name.$which.$r.md" 2>"$out/$name.$which.$r.log" \
        || echo "   $name $which round $r exited non-zero: see $out/$name.$which.$r.log" >&2
}
for r in $(seq "$first" $((first + rounds - 1))); do
    if (( r % 2 )); then order="old new"; else order="new old"; fi
    for which in $order; do
        bin=$old; [ "$which" = new ] && bin=$new
        run publish "$which" "$r" "$bin" --targets spool-fsync --clients 1,16,64
    done
    for which in $order; do
        bin=$old; [ "$which" = new ] && bin=$new
        run ws-publish "$which" "$r" "$bin" --targets spool-fsync,spool-nosync
    done
    for which in $order; do
        bin=$old; [ "$which" = new ] && bin=$new
        run ws-fanout "$which" "$r" "$bin" --targets spool --subscribers "$subs" --streams 1,1000
    done
done
python3 "$here/old-vs-new.py" "$out"
echo "raw results in $out" >&2

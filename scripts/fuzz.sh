#!/usr/bin/env bash
# Fuzzes the WebSocket frame decoder with cargo fuzz (libFuzzer): the targets in fuzz/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (default: all of `cargo fuzz list`) for SECONDS (default 60, or
# $FUZZ_SECONDS) and exits non-zero if any of them crashed; the crashing input is left in
# fuzz/artifacts/TARGET/ (reproduce with `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET FILE`).
# Not part of CI or `cargo test`.
#
# Stable Rust only: cargo fuzz passes nightly-only flags (-Zsanitizer=address, ...) to rustc,
# so this script sets RUSTC_BOOTSTRAP=1 for its own cargo calls, which lets a stable rustc
# accept them (checked with rustc 1.95, cargo-fuzz 0.13.2, libfuzzer-sys 0.4). Without it,
# `cargo fuzz build` fails with "the option `Z` is only accepted on the nightly compiler".
# FUZZ_SANITIZER=none builds without AddressSanitizer (faster; the targets are safe Rust, so
# ASan mostly guards the C++ of libFuzzer and any unsafe in dependencies).
#
# The corpus grows in fuzz/corpus/TARGET (git-ignored), seeded from the committed
# fuzz/seeds/TARGET; fuzz/dict/frames.dict gives libFuzzer the protocol's keywords. Each
# run's libFuzzer output is kept in fuzz/target/fuzz-logs/TARGET.log.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz_dir=$root/fuzz
seconds=${1:-${FUZZ_SECONDS:-60}}
shift || true
sanitizer=${FUZZ_SANITIZER:-address}
CARGO_FUZZ_VERSION=0.13.2

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
fi

echo "== building ${targets[*]} (sanitizer: $sanitizer)"
cargo fuzz build --fuzz-dir "$fuzz_dir" --sanitizer "$sanitizer"

logs=$fuzz_dir/target/fuzz-logs
mkdir -p "$logs"
failed=()
for t in "${targets[@]}"; do
    corpus=$fuzz_dir/corpus/$t
    mkdir -p "$corpus"
    seeds=()
    [ -d "$fuzz_dir/seeds/$t" ] && seeds=("$fuzz_dir/seeds/$t")
    echo "== fuzzing $t for ${seconds}s"
    status=0
    cargo fuzz run --fuzz-dir "$fuzz_dir" --sanitizer "$sanitizer" "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" \
        -dict="$fuzz_dir/dict/frames.dict" \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -print_final_stats=1 \
        >"$logs/$t.log" 2>&1 || status=$?
    # The last progress line ("#N DONE cov: ... ft: ... corp: ... exec/s: ...") and the totals.
    grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE)' "$logs/$t.log" | tail -n 1 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$logs/$t.log" || true
    if [ "$status" -ne 0 ]; then
        echo "!! $t failed (exit $status); see $logs/$t.log and fuzz/artifacts/$t/"
        grep -E -A 2 'panicked at|^==[0-9]+==ERROR|ERROR: libFuzzer' "$logs/$t.log" | head -n 20 || true
        grep -E 'Test unit written to|^Base64:' "$logs/$t.log" || true
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "== crashed: ${failed[*]}"
    exit 1
fi
echo "== no crash in ${targets[*]} (${seconds}s each)"

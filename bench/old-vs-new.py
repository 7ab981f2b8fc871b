#!/usr/bin/env python3
"""bench/old-vs-new.sh drives this: reads OUT_DIR/BENCH.{old,new}.ROUND.json and prints, per
benchmark, one markdown table whose cells are new ÷ old: the median over the rounds, then each
round's ratio (each round's old and new ran back to back). For throughput above 1 is better,
for latency and CPU below 1."""
import glob, json, os, re, statistics, sys

out = sys.argv[1]

def load(bench):
    runs = {}
    for path in glob.glob(os.path.join(out, f"{bench}.*.json")):
        m = re.match(rf"{re.escape(bench)}\.(old|new)\.(\d+)\.json$", os.path.basename(path))
        if m:
            runs[(m.group(1), int(m.group(2)))] = json.load(open(path))
    return runs

def rows_publish(doc):
    for r in doc["runs"]:
        lat = r["latency"]
        yield (r["target"], f'{r["clients"]} clients'), {
            "msgs/s": r["msgs_per_sec"], "p50": lat["p50_ms"], "p99": lat["p99_ms"],
            "p999": lat["p999_ms"], "server µs/msg": r.get("server_us_per_msg")}

def rows_ws_publish(doc):
    for r in doc["runs"]:
        lat = r["latency"]
        yield (r["target"], f'{r["clients"]} × {doc["settings"]["window"]}'), {
            "msgs/s": r["msgs_per_sec"], "p50": lat["p50_ms"], "p99": lat["p99_ms"],
            "p999": lat["p999_ms"], "server µs/msg": r["server_us_per_msg"]}

def rows_fanout(doc):
    for s in doc["scenarios"]:
        for p in s["phases"]:
            lat = p["latency"]
            yield (f'{s["streams"]} × {s["subscribers"] // s["streams"]}', p["mode"]), {
                "deliveries/s": p["deliveries_per_sec"], "p50": lat["p50_ms"],
                "p99": lat["p99_ms"], "p999": lat["p999_ms"],
                "server µs/deliv": p["server_us_per_delivery"],
                "fell behind": p["fell_behind"], "missing": p["missing"]}

def table(bench, rows_of):
    runs = load(bench)
    rounds = sorted({r for (_, r) in runs if ("old", r) in runs and ("new", r) in runs})
    if not rounds:
        return
    per = {}  # key -> metric -> [(old, new)] per round
    order = []
    for r in rounds:
        old = dict(rows_of(runs[("old", r)]))
        for key, new_m in rows_of(runs[("new", r)]):
            if key not in old:
                continue
            if key not in per:
                per[key] = {}; order.append(key)
            for metric, v in new_m.items():
                per[key].setdefault(metric, []).append((old[key][metric], v))
    metrics = [m for m in per[order[0]] if m not in ("fell behind", "missing")]
    print(f"\n### {bench}: new ÷ old, median of {len(rounds)} rounds (each round's ratio)\n")
    head = ["row", "load"] + [f"{m} new÷old" for m in metrics] + [f"{metrics[0]} old → new", f"{metrics[-1]} old → new", "flags"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 2 + "--:|" * (len(metrics) + 2) + "---|")
    for key in order:
        cells = list(key)
        for m in metrics:
            pairs = [(a, b) for a, b in per[key][m] if a and b is not None]
            ratios = [b / a for a, b in pairs]
            cells.append("—" if not ratios else
                         f"**{statistics.median(ratios):.2f}** ({', '.join(f'{x:.2f}' for x in ratios)})")
        for m in (metrics[0], metrics[-1]):
            pairs = [(a, b) for a, b in per[key][m] if a is not None and b is not None]
            if pairs:
                o = statistics.median(a for a, _ in pairs); n = statistics.median(b for _, b in pairs)
                cells.append(f"{o:,.1f} → {n:,.1f}" if o < 100 else f"{o:,.0f} → {n:,.0f}")
            else:
                cells.append("—")
        flags = []
        for name in ("fell behind", "missing"):
            if name in per[key]:
                o = sum(1 for a, _ in per[key][name] if a); n = sum(1 for _, b in per[key][name] if b)
                if o or n:
                    flags.append(f"{name}: old {o}/{len(rounds)}, new {n}/{len(rounds)} rounds")
        cells.append("; ".join(flags))
        print("| " + " | ".join(cells) + " |")

table("publish", rows_publish)
table("ws-publish", rows_ws_publish)
table("ws-fanout", rows_fanout)

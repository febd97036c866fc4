#!/usr/bin/env python3
"""Backfill against run over the same range, dense and sparse, in one run (BENCHMARKS.md).

For each data set (the demo's documentInfo at two sizes, seeded by bench/bench.py into
PREFIX_<vizzes>; the window is bench.py's), alternating in every round: `tidemark run` over
the window into a fresh PostgreSQL database, then `tidemark backfill --from --to` with the
default flags into another; both copies are checked row by row against the source. Extra
variants (other --chunk-docs values, the old default --chunk 1d) run in the first round only.

    state/bench-venv/bin/python bench/backfill_bench.py --dense 200000 --sparse 20000 [--runs 3]
        [--variants "--chunk 1d;--chunk-docs 5000"] [--out FILE]
        [--alt-bin PATH --alt-label TEXT]

With --alt-bin, every round runs both binaries (run, then backfill; BENCH_TIDEMARK_BIN's
first, then the other's), so an A/B of two builds shares each round's conditions; each
backfill is divided by the `run` of its own binary in the same round.

Environment as bench/run.sh: BENCH_TIDEMARK_BIN (required here), BENCH_PREFIX, BENCH_PG,
TIDEMARK__SOURCE__URI. Prints a markdown table; ratios are medians from this run only.
Besides wall time it reports tidemark's CPU seconds (user + system) and the backfill's
planning time (from its log), since wall times on a shared machine are noisy.
"""
import json
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def planning_ms(stderr_path):
    """Milliseconds the backfill spent planning chunks by count, from its JSON log."""
    ms = 0
    for line in Path(stderr_path).read_text().splitlines():
        if "chunks planned by document count" in line:
            try:
                ms += json.loads(line).get("ms", 0)
            except ValueError:
                pass
    return ms


def one(ctx, name, args, binary):
    db = f"{bench.PREFIX}_{name}"
    bench.create_db(db)
    env = bench.tm_env(ctx, bench.pg_url(db), ctx.flat, ctx.lo)
    r = bench.timed(name, [binary, *args], env)
    r["plan_ms"] = planning_ms(r["stderr_path"])
    try:
        r.update(bench.compare(bench.pg_rows(db), ctx.exp, ctx.edge_ms))
        if args[0] == "backfill":
            with bench.psycopg.connect(bench.pg_url(db)) as c:
                r["chunks"] = c.execute("SELECT COUNT(*) FROM tidemark_backfill_chunks").fetchone()[0]
    except Exception as e:
        r.update(ok=False, note=f"verification failed: {e}")
    if r["rc"] != 0:
        r.update(ok=False, note=(r.get("note") or "") + f" exit {r['rc']}")
    bench.drop_db(db)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dense", type=int, default=200_000)
    p.add_argument("--sparse", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--variants", default="--chunk 1d",
                   help="extra backfill flag sets, ';'-separated, measured in round 1")
    p.add_argument("--out")
    p.add_argument("--alt-bin", help="a second tidemark binary, run in every round after the first")
    p.add_argument("--alt-label", default="alt")
    p.add_argument("--reuse-source", action="store_true",
                   help="keep source databases of the right size and seed even if the generator changed")
    a = p.parse_args()
    bench.REUSE_SOURCE = a.reuse_source
    bench.STATE.mkdir(parents=True, exist_ok=True)
    sets = []
    for label, vizzes in (("dense", a.dense), ("sparse", a.sparse)):
        ctx = bench.Ctx()
        ctx.db = f"{bench.PREFIX}_{vizzes}"
        bench.ensure_source(ctx.db, vizzes, 42, False)
        probe = bench.STATE / "flat_upvotes.toml"
        probe.write_text(bench.BENCH.joinpath("flat.toml").read_text().rstrip("\n") + "\n" + bench.UPVOTES_LINE)
        ctx.flat = probe
        ctx.lo, ctx.hi, ctx.edge = bench.pick_window(ctx.db)
        ctx.edge_ms = ctx.edge * 1000
        ctx.exp = bench.expected(ctx.db, ctx.lo, ctx.hi)
        ctx.label = label
        sets.append(ctx)
        bench.log(f"{label}: {ctx.db} [{bench.iso(ctx.lo)}, {bench.iso(ctx.hi)}): {ctx.exp['docs']} documents")
    variants = [v.split() for v in a.variants.split(";") if v.strip()]
    bins = [("", bench.BIN)] + ([(a.alt_label, Path(a.alt_bin))] if a.alt_bin else [])
    res = {}
    for rnd in range(a.runs):
        for ctx in sets:
            rng = ["--from", bench.iso(ctx.lo), "--to", bench.iso(ctx.hi)]
            for tag, binary in bins:
                todo = [("run", ["run", "--until", bench.iso(ctx.hi)]), ("backfill (defaults)", ["backfill", *rng])]
                if rnd == 0:
                    todo += [(f"backfill {' '.join(v)}", ["backfill", *rng, *v]) for v in variants]
                for kind, args in todo:
                    kind = f"{kind} [{tag}]" if tag else kind
                    name = f"bf_{ctx.label}_{kind.split()[0]}_{len(res)}_{rnd}{'_alt' if tag else ''}"
                    r = one(ctx, name, args, binary)
                    r["round"] = rnd
                    res.setdefault((ctx.label, tag, kind), []).append(r)
                    bench.log(f"round {rnd + 1} {ctx.label:<6} {kind:<34} {r['wall']:7.2f}s cpu {r['cpu']:6.2f}s "
                              f"plan {r['plan_ms'] / 1000:5.2f}s chunks {r.get('chunks', '-')} "
                              f"RSS {r['rss_mb']:.0f} MB {'ok' if r.get('ok') else 'WRONG ' + (r.get('note') or '')}")
    L = ["| data | what | runs | wall s (median) | each run s | ÷ run, each round | ÷ run (median) "
         "| tidemark CPU s (median) | planning s (median) | chunks | rows ok |",
         "|---|---|---:|---:|---|---|---:|---:|---:|---:|:--:|"]
    for ctx in sets:
        for tag, _ in bins:
            runs = res[(ctx.label, tag, f"run [{tag}]" if tag else "run")]
            base = {r["round"]: r["wall"] for r in runs}
            for (label, t, kind), rs in res.items():
                if label != ctx.label or t != tag:
                    continue
                m = statistics.median(r["wall"] for r in rs)
                per = [r["wall"] / base[r["round"]] for r in rs]
                L.append(f"| {label}: {ctx.exp['docs']:,} docs, {bench.iso(ctx.lo)[:10]}..{bench.iso(ctx.hi)[:10]} | "
                         f"`{kind}` | {len(rs)} | {m:.2f} | {' / '.join(format(r['wall'], '.2f') for r in rs)} | "
                         f"{' / '.join(format(x, '.2f') for x in per)} | {statistics.median(per):.2f} | "
                         f"{statistics.median(r['cpu'] for r in rs):.2f} | "
                         f"{statistics.median(r['plan_ms'] for r in rs) / 1000:.2f} | "
                         f"{rs[-1].get('chunks', '–')} | {'✔' if all(r.get('ok') for r in rs) else '✘'} |")
    text = "\n".join(L)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

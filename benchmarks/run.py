"""Every benchmark in one command; results in benchmarks/results/<suite>/ (JSON with the machine and every raw
timing, a markdown table and PNG plots each), and the headline table in summary.md, which the README quotes.

    pip install -e ".[bench]"                 # megabyte-pytorch for the side-by-side runs (torch first)
    python -m benchmarks.run --suite quick    # < 10 minutes on a 2-core CPU
    python -m benchmarks.run --suite full     # the README's table (about 30 minutes on a 2-core CPU)
    python -m benchmarks.run --suite smoke --out /tmp/x    # every benchmark on tiny shapes, seconds
    python -m benchmarks.run --suite full --only media      # images and audio (not run unless named: below)

Run it on a quiet machine: the ratios come from runs made back to back in one process, but a busy machine still
widens their spread.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from . import generation, long_context, long_training, media, quality, serving, suites, swarm, training
from .common import RESULTS, machine

BENCHMARKS = {"generation": generation, "training": training, "long_context": long_context,
              "long_training": long_training, "quality": quality, "serving": serving, "swarm": swarm}
# run only when named with --only: images and audio train four models through the CLI (about 30 minutes in `full`)
# on data from Debian packages (benchmarks/media.py); its results and pictures are its own, not summary.md's
EXTRA = {"media": media}


def summary(results: dict, suite: suites.Suite, out: Path) -> str:
    """The headline table: one row per claim, ours against the comparison, as a ratio. The machine facts are the
    ones the benchmarks recorded (threads, torch), not this process's."""
    m = next((r["machine"] for r in results.values() if isinstance(r, dict) and "machine" in r), None) or machine()
    rows = ["| measurement | bytelm MEGABYTE | compared with | ratio |", "|---|---|---|---|"]
    g = results.get("generation")
    if g:
        mb, tf = g["bytes_per_s"]["megabyte"], g["bytes_per_s"]["transformer"]
        if "peer" in g:
            rows.append(f"| generation, {g['bytes']:,} bytes, greedy, batch 1 (bytes/s) | {mb:,.0f} | megabyte-pytorch "
                        f"(same shape, no cache): {g['peer']['bytes_per_s_estimated']:,.1f} | "
                        f"**{g['megabyte_vs_peer']:.0f}x** |")
        rows.append(f"| generation vs. a {g['megabyte']['params'] / g['transformer']['params']:.1f}x smaller "
                    f"transformer (bytes/s; {g['megabyte']['params'] / 1e6:.1f}M vs. "
                    f"{g['transformer']['params'] / 1e6:.1f}M params) | {mb:,.0f} | ByteTransformer: {tf:,.0f} | "
                    f"**{g['megabyte_vs_transformer']:.2f}x** |")
    t = results.get("training")
    if t:
        b = t["bytes_per_s"]
        if "megabyte-pytorch" in b:
            rows.append(f"| training throughput, same shape (bytes/s) | {b['bytelm MEGABYTE']:,.0f} | "
                        f"megabyte-pytorch: {b['megabyte-pytorch']:,.0f} | **{t['megabyte_vs_peer']:.2f}x** |")
        if "mblm" in b:
            rows.append(f"| training throughput, same shape (bytes/s) | {b['bytelm MEGABYTE']:,.0f} | "
                        f"mblm: {b['mblm']:,.0f} | **{t['megabyte_vs_mblm']:.2f}x** |")
        ours16 = b.get("bytelm MEGABYTE, bf16 autocast")
        for other in ("megabyte-pytorch", "mblm"):
            if ours16 and f"{other}, bf16 autocast" in b:
                theirs = b[f"{other}, bf16 autocast"]
                rows.append(f"| training throughput, same shape, both bf16 autocast (bytes/s) | {ours16:,.0f} | "
                            f"{other}: {theirs:,.0f} | **{ours16 / theirs:.2f}x** |")
        rows.append(f"| training throughput, equal params (bytes/s) | {b['bytelm MEGABYTE']:,.0f} | ByteTransformer: "
                    f"{b['bytelm ByteTransformer']:,.0f} | **{t['megabyte_vs_transformer']:.2f}x** |")
    lc = results.get("long_context")
    if lc:
        mods = lc["models"]
        a, b = mods["bytelm MEGABYTE"], mods["bytelm ByteTransformer"]

        def longest(mm):
            ok = [int(L) for L, r in mm["runs"].items() if r["status"] == "ok"]
            return max(ok) if ok else 0

        def cost(mm):
            e = mm["time_exponent_last_two"]
            return f"~T^{e:.2f}, up to {longest(mm):,} bytes" if e is not None else f"up to {longest(mm):,} bytes"

        rows.append(f"| one forward over long inputs: time growth (equal params) | {cost(a)} | ByteTransformer: "
                    f"{cost(b)} | see long_context.md |")
    lt = results.get("long_training")
    if lt:
        ok = [(int(L), r, n) for n, mm in lt["models"].items() if mm["checkpointing"] and "MEGABYTE" in n
              for L, r in mm["runs"].items() if r["status"] == "ok"]
        if ok:
            L, r, n = max(ok, key=lambda t: t[0])
            rows.append(f"| one training step on {L:,} bytes (batch 1, fp32, activation checkpointing) | "
                        f"{r['seconds']:,.0f} s, peak {r['process_peak_mb'] / 1024:,.1f} GiB | {n} | see "
                        "long_training.md |")
    q = results.get("quality")
    if q:
        r = q["results"]
        seeds = q.get("seeds", [0])
        default = r.get("bytelm MEGABYTE, default precision")
        ours = f"{r['bytelm MEGABYTE']['val_bpb']:.3f}" + (
            f" (fp32); {default['val_bpb']:.3f} (bf16 autocast, its default here)" if default else "")
        ours_rows = ("bytelm MEGABYTE", "bytelm MEGABYTE, default precision")
        others = "; ".join(f"{n}: {v['val_bpb']:.3f}" for n, v in r.items() if n not in ours_rows)
        mean = f", mean of {len(seeds)} seeds" if len(seeds) > 1 else ""
        every = ", every model in bf16 autocast" if q.get("precision") == "bf16" else ""
        rows.append(f"| val bits/byte after {q['seconds_each']:,.0f} s of training each (stdlib{mean}{every}) | "
                    f"{ours} | {others} | lower is better |")
    sv = results.get("serving")
    if sv:
        mb, tf = sv["models"]["megabyte"], sv["models"]["transformer"]
        top = str(16 if "16" in mb["speedup_vs_1_stream"] else max(map(int, mb["speedup_vs_1_stream"])))
        rate = {r["streams"]: r["bytes_per_s"] for r in mb["runs"]}
        rows.append(f"| serving: aggregate bytes/s at {top} streams vs. 1 (continuous batching, greedy) | "
                    f"{rate[int(top)]:,.0f} | 1 stream: {rate[1]:,.0f}; ByteTransformer at {top}: "
                    f"{tf['speedup_vs_1_stream'][top]:.1f}x its 1 | **{mb['speedup_vs_1_stream'][top]:.1f}x** |")
        tr = {n: m["by_mode"]["eager"]["traffic"] for n, m in sv["models"].items() if "by_mode" in m}
        if tr:  # random traffic (open loop) against one stream decoding back to back
            runs = {n: {r["clients"]: r for r in t["runs"]} for n, t in tr.items()}
            c = 16 if 16 in runs["megabyte"] else max(runs["megabyte"])
            r, t = runs["megabyte"][c], runs["transformer"][c]
            rows.append(f"| serving under random traffic: aggregate bytes/s at {c} clients vs. one stream back to back "
                        f"(temperature {sv['traffic']['temperature']}, eager) | {r['bytes_per_s']:,.0f} | back to "
                        f"back: {tr['megabyte']['back_to_back']['bytes_per_s']:,.0f}; ByteTransformer at {c}: "
                        f"{t['x_back_to_back']:.1f}x its own | **{r['x_back_to_back']:.1f}x** |")
    sw = results.get("swarm")
    if sw:
        gen = {r["servers"]: r["bytes_per_s"] for r in sw["generation"]}
        tr = {r["model"]: r["messages"] for r in sw["traffic"]}
        rows.append(f"| swarm on loopback: bytes/s with the global model on 1 server vs. local; messages per byte | "
                    f"{gen[1]:,.0f} ({gen[1] / gen[0]:.2f}x local); {tr['MEGABYTE']:.3f} msg/byte | ByteTransformer "
                    f"served the same way: {tr['byte transformer']:.3f} msg/byte | "
                    f"**{tr['byte transformer'] / tr['MEGABYTE']:.1f}x fewer messages** |")
    threads = f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}"
    head = (f"Suite `{suite.name}`, {time.strftime('%Y-%m-%d')}: torch {m['torch']}, {threads}, "
            f"{m['cpu_count']} CPUs, {m['cuda'] or 'no GPU'}. Details and raw timings: "
            f"{_shown(out)}/*.md, *.json, *.png.")
    return "\n".join([head, "", *rows]) + "\n"


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        return str(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="quick", choices=["quick", "full", "smoke"])
    ap.add_argument("--only", nargs="+", choices=[*BENCHMARKS, *EXTRA],
                    help=f"run just these benchmarks ({', '.join(EXTRA)} runs only when named here)")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<suite>)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPUs this process may use)")
    ap.add_argument("--summary-only", action="store_true",
                    help="rebuild summary.md from the results folder's saved JSON (after rerunning one benchmark)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    suite = suites.get(args.suite)
    out = args.out or RESULTS / suite.name
    out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        results = {name: json.loads((out / f"{name}.json").read_text()) for name in BENCHMARKS}
        (out / "summary.md").write_text(summary(results, suite, out))
        print((out / "summary.md").read_text())
        return results
    results = {}
    for name in args.only or BENCHMARKS:
        t0 = time.perf_counter()
        print(f"== {name} ({suite.name})", flush=True)
        results[name] = {**BENCHMARKS, **EXTRA}[name].run(suite, out)
        print((out / f"{name}.md").read_text(), f"({time.perf_counter() - t0:.0f} s)\n", flush=True)
    if not args.only:  # the headline table needs every benchmark of the same run
        (out / "summary.md").write_text(summary(results, suite, out))
        (out / "summary.json").write_text(json.dumps({"machine": machine(), "suite": suite.name}, indent=2) + "\n")
        print((out / "summary.md").read_text())
    return results


if __name__ == "__main__":
    main()

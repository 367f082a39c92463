"""Long sequences: time and peak memory of one forward pass (no grad, batch 1) over 8K .. 1,048,576 bytes, a small
MEGABYTE vs. the byte transformer with the same parameter count; and how the cost grows with length (fitted exponent).

    python -m benchmarks.long_context --suite quick|full|smoke

Every (model, length) runs in a fresh process so that its peak memory is its own: the peak resident set during the
forward (Linux VmHWM, reset just before) minus the resident set before it. A run whose time, predicted from the
model's measured lengths, would exceed `long_time_limit` is skipped and recorded as such; one that runs out of memory
or time is recorded too.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bytelm import build
from bytelm.models import config_from_dict

from . import suites
from .common import RESULTS, fit_exponent, fmt_params, main_for, pyplot, write

REPO = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Return freed heap to the OS, reset the peak-RSS mark (Linux: VmHWM), and return the resident KB now."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def one(config: dict, length: int) -> dict:
    """In this process: build the model, one forward over `length` random bytes; seconds and peak-memory growth
    (the peak resident set during the forward minus the resident set before it)."""
    torch.manual_seed(0)
    model = build(config_from_dict(config)).eval()
    x = torch.randint(0, 256, (1, length))
    with torch.inference_mode():
        model(x[:, :64])  # warm-up: first-call allocations and kernel selection
        rss0 = _reset_peak()
        t0 = time.perf_counter()
        model(x)
        dt = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
    return {"seconds": dt, "peak_mem_mb": (peak - rss0) / 1024, "params": model.num_params()}


def measure(config: dict, length: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.long_context", "--one", json.dumps(config), str(length)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the parent's thread setting
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    if r.returncode != 0:
        oom = r.returncode in (-9, 137) or "MemoryError" in r.stderr or "out of memory" in r.stderr.lower()
        tail = r.stderr.strip().splitlines()[-1:] or [""]
        return {"status": "out of memory" if oom else f"failed: {tail[0]}"}
    return {"status": "ok", **json.loads(r.stdout.strip().splitlines()[-1])}


def run(suite: suites.Suite, out_dir=RESULTS) -> dict:
    models = {"bytelm MEGABYTE": suite.long_megabyte, "bytelm ByteTransformer": suite.long_transformer}
    results: dict[str, dict] = {}
    for name, cfg in models.items():
        rows, done = {}, []
        for L in suite.long_lengths:
            if L > cfg.max_seq_len:
                rows[L] = {"status": f"longer than max_seq_len {cfg.max_seq_len}"}
                continue
            if len(done) >= 2:  # predict from the last two measured lengths
                (l1, t1), (l2, t2) = done[-2:]
                k = fit_exponent([l1, l2], [t1, t2])
                predicted = t2 * (L / l2) ** k
                if predicted > suite.long_time_limit:
                    rows[L] = {"status": f"skipped: predicted {predicted:,.0f} s > limit {suite.long_time_limit:.0f} s",
                               "predicted_seconds": predicted}
                    continue
            r = measure(cfg.to_dict(), L, timeout=suite.long_time_limit * 1.5 + 30)
            rows[L] = r
            if r["status"] == "ok":
                done.append((L, r["seconds"]))
        ok = [(L, r) for L, r in rows.items() if r["status"] == "ok"]
        results[name] = {
            "config": cfg.to_dict(),
            "params": next((r["params"] for _, r in ok), None),
            "runs": {str(L): r for L, r in rows.items()},
            "time_exponent": fit_exponent([L for L, _ in ok], [r["seconds"] for _, r in ok]),
            "time_exponent_last_two": fit_exponent([L for L, _ in ok[-2:]], [r["seconds"] for _, r in ok[-2:]]),
            "memory_exponent": fit_exponent([L for L, _ in ok], [max(r["peak_mem_mb"], 1e-3) for _, r in ok]),
        }
        print(f"{name}: {json.dumps(results[name]['runs'])}", flush=True)
    payload = {"suite": suite.name, "lengths": suite.long_lengths, "time_limit_s": suite.long_time_limit,
               "models": results}
    write("long_context", payload, markdown(payload), out_dir)
    plot(payload, out_dir)
    return payload


def markdown(p: dict) -> str:
    names = list(p["models"])
    lines = [f"# One forward pass (no grad, batch 1) over long sequences (limit {p['time_limit_s']:.0f} s a run)", "",
             "| bytes | " + " | ".join(f"{n}: seconds | {n}: peak MB" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for L in p["lengths"]:
        cells = []
        for n in names:
            r = p["models"][n]["runs"][str(L)]
            cells += [f"{r['seconds']:,.2f}", f"{r['peak_mem_mb']:,.0f}"] if r["status"] == "ok" else [r["status"], ""]
        lines.append(f"| {L:,} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        m = p["models"][n]
        e, e2, em = m["time_exponent"], m["time_exponent_last_two"], m["memory_exponent"]
        params = fmt_params(m["params"]) if m["params"] else "?"
        if e is None:
            lines.append(f"- {n}: fewer than two lengths measured.")
            continue
        lines.append(f"- {n} ({params}): time ~ length^{e:.2f} over all measured lengths (^{e2:.2f} over the last "
                     f"two), memory ~ length^{em:.2f}.")
    return "\n".join(lines) + "\n"


def plot(p: dict, out_dir) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for n, m in p["models"].items():
        ok = [(int(L), r) for L, r in m["runs"].items() if r["status"] == "ok"]
        if not ok:
            continue
        xs = [L for L, _ in ok]
        axes[0].plot(xs, [r["seconds"] for _, r in ok], "o-", label=n)
        axes[1].plot(xs, [max(r["peak_mem_mb"], 1e-3) for _, r in ok], "o-", label=n)
    for ax, ylabel in zip(axes, ("seconds", "peak memory growth (MB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (bytes)")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle("One forward pass vs. sequence length (log-log)")
    fig.tight_layout()
    fig.savefig(out_dir / "long_context.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # the child process of `measure`
        print(json.dumps(one(json.loads(argv[1]), int(argv[2]))))
        return None
    return main_for("long_context", __doc__, run, argv)


if __name__ == "__main__":
    main()

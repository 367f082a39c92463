"""Long sequences, training: time and peak memory of one training step (forward, backward and optimizer step; batch 1,
fp32) over 8K .. 1,048,576 bytes, MEGABYTE with and without activation checkpointing (its blocks recomputed, and the
chunked loss: the local model, head and cross-entropy chunk by chunk), and the byte transformer of about the same
parameter count; beside each, bytelm's own estimate of the step's memory (bytelm.training.memory), which decides
whether `bytelm train` refuses a run.

    python -m benchmarks.long_training --suite quick|full|smoke

Every (model, checkpointing, length) runs in a fresh process so that its peak memory is its own, as in
benchmarks/long_context.py: the step's peak resident set (Linux VmHWM, reset after a warm-up step made the optimizer's
state) minus the resident set before it, and the whole process's peak over what it held before the model was built.
A run whose time, predicted from its series' measured lengths, would exceed `long_train_time_limit` is skipped and
recorded as such, as is one whose memory estimate exceeds the memory available (it would be refused by `bytelm
train`; running it would only wake the OOM killer, on a machine others share). The steps run with the allocator's
defaults: `bytelm train --activation-checkpointing` also maps large allocations on a CPU
(bytelm.training.memory.map_large_allocations), which lowers the checkpointed peaks measured here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from bytelm import build
from bytelm.devices import available_memory, format_bytes
from bytelm.models import config_from_dict
from bytelm.training.config import OptimizerSection
from bytelm.training.memory import training_parts
from bytelm.training.optim import make_optimizer
from bytelm.training.trainer import enable_activation_checkpointing

from . import suites
from .common import RESULTS, fit_exponent, fmt_params, main_for, pyplot, write
from .long_context import REPO, _reset_peak, _status_kb


def estimate(config: dict, length: int, checkpointing: bool) -> int:
    """bytelm's estimate of the step's memory (what `bytelm train` checks): weights, gradients, optimizer state and
    activations."""
    parts = training_parts(config_from_dict(config), 1, length, "muon", "fp32", torch.device("cpu"), checkpointing)
    return sum(n for _, n in parts)


def one(config: dict, length: int, checkpointing: bool) -> dict:
    """In this process: build the model and bytelm's optimizer (Muon + AdamW), one warm-up step on 64 bytes (first-call
    allocations, the optimizer's state), then one timed step on `length` random bytes, as the trainer takes it."""
    base = _reset_peak()
    torch.manual_seed(0)
    model = build(config_from_dict(config)).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    opt = make_optimizer(model, OptimizerSection(name="muon"))
    x = torch.randint(0, 256, (1, length))

    def step(x: torch.Tensor) -> float:
        loss = model(x, loss="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(x[:, :64])
    rss0 = _reset_peak()
    t0 = time.perf_counter()
    loss = step(x)
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {"seconds": dt, "peak_mem_mb": (peak - rss0) / 1024, "process_peak_mb": (peak - base) / 1024,
            "loss": loss, "params": model.num_params()}


def measure(config: dict, length: int, checkpointing: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.long_training", "--one", json.dumps(config), str(length),
           str(int(checkpointing))]
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


def series(cfg, checkpointing: bool, lengths: list[int], limit: float) -> dict[int, dict]:
    rows, done, failed = {}, [], None
    for L in lengths:
        if L > cfg.max_seq_len:
            rows[L] = {"status": f"longer than max_seq_len {cfg.max_seq_len}"}
            continue
        if failed is not None:  # a shorter one ran out of time or memory: a longer one would too
            rows[L] = {"status": f"skipped: {failed:,} bytes {rows[failed]['status']}"}
            continue
        need = estimate(cfg.to_dict(), L, checkpointing)
        avail, _ = available_memory("cpu")
        if avail is not None and need > avail:
            rows[L] = {"status": f"skipped: estimate {format_bytes(need)} > {format_bytes(avail)} available",
                       "estimate_mb": need / 2**20}
            continue
        if len(done) >= 2:  # predict from the last two measured lengths
            (l1, t1), (l2, t2) = done[-2:]
            predicted = t2 * (L / l2) ** fit_exponent([l1, l2], [t1, t2])
            if predicted > limit:
                rows[L] = {"status": f"skipped: predicted {predicted:,.0f} s > limit {limit:.0f} s",
                           "predicted_seconds": predicted}
                continue
        r = measure(cfg.to_dict(), L, checkpointing, timeout=limit * 1.5 + 60)
        r["estimate_mb"] = need / 2**20
        rows[L] = r
        print(f"  {L:>9,} bytes, checkpointing {checkpointing}: {json.dumps(r)}", flush=True)
        if r["status"] == "ok":
            done.append((L, r["seconds"]))
        else:
            failed = L
    return rows


def run(suite: suites.Suite, out_dir=RESULTS) -> dict:
    P = suite.long_train_megabyte.patch_size
    models = {f"bytelm MEGABYTE (P={P})": suite.long_train_megabyte,
              "bytelm ByteTransformer": suite.long_train_transformer}
    results: dict[str, dict] = {}
    for name, cfg in models.items():
        for checkpointing in (True, False):
            key = f"{name}, {'activation checkpointing' if checkpointing else 'no checkpointing'}"
            rows = series(cfg, checkpointing, suite.long_train_lengths, suite.long_train_time_limit)
            ok = [(L, r) for L, r in rows.items() if r["status"] == "ok"]
            results[key] = {
                "config": cfg.to_dict(), "checkpointing": checkpointing,
                "params": next((r["params"] for _, r in ok), None),
                "runs": {str(L): r for L, r in rows.items()},
                "time_exponent": fit_exponent([L for L, _ in ok], [r["seconds"] for _, r in ok]),
                "memory_exponent": fit_exponent([L for L, _ in ok], [max(r["peak_mem_mb"], 1e-3) for _, r in ok]),
            }
            print(f"{key}: {json.dumps(results[key]['runs'])}", flush=True)
    payload = {"suite": suite.name, "lengths": suite.long_train_lengths, "time_limit_s": suite.long_train_time_limit,
               "threads": torch.get_num_threads(), "models": results}
    write("long_training", payload, markdown(payload), out_dir)
    plot(payload, out_dir)
    return payload


def markdown(p: dict) -> str:
    lines = [f"# One training step (forward + backward + optimizer step, batch 1, fp32) over long sequences "
             f"(limit {p['time_limit_s']:.0f} s a run)", "",
             "Peak MB: the step's peak resident set over what the process held before it (weights and optimizer "
             "state already made); process: the whole process's peak over what it held before the model was built, "
             "against bytelm's estimate of the run (what `bytelm train` checks).", "",
             *([p["note"], ""] if p.get("note") else []),
             "| model | bytes | seconds | peak MB (step) | peak MB (process) | estimate MB |",
             "|---|---|---|---|---|---|"]
    for n, m in p["models"].items():
        for L in p["lengths"]:
            r = m["runs"][str(L)]
            est = f"{r['estimate_mb']:,.0f}" if "estimate_mb" in r else ""
            if r["status"] == "ok":
                lines.append(f"| {n} | {L:,} | {r['seconds']:,.2f} | {r['peak_mem_mb']:,.0f} | "
                             f"{r['process_peak_mb']:,.0f} | {est} |")
            else:
                lines.append(f"| {n} | {L:,} | {r['status']} | | | {est} |")
    lines.append("")
    for n, m in p["models"].items():
        e, em = m["time_exponent"], m["memory_exponent"]
        params = fmt_params(m["params"]) if m["params"] else "?"
        lines.append(f"- {n} ({params}): " + ("fewer than two lengths measured." if e is None else
                                               f"time ~ length^{e:.2f}, step memory ~ length^{em:.2f}."))
    return "\n".join(lines) + "\n"


def plot(p: dict, out_dir) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for n, m in p["models"].items():
        ok = [(int(L), r) for L, r in m["runs"].items() if r["status"] == "ok"]
        if not ok:
            continue
        xs = [L for L, _ in ok]
        style = "o-" if m["checkpointing"] else "s--"
        axes[0].plot(xs, [r["seconds"] for _, r in ok], style, label=n)
        axes[1].plot(xs, [max(r["peak_mem_mb"], 1e-3) for _, r in ok], style, label=n)
    for ax, ylabel in zip(axes, ("seconds per step", "peak memory of the step (MB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (bytes)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("One training step vs. sequence length (batch 1, fp32; log-log)")
    fig.tight_layout()
    fig.savefig(out_dir / "long_training.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # the child process of `measure`
        print(json.dumps(one(json.loads(argv[1]), int(argv[2]), bool(int(argv[3])))))
        return None
    return main_for("long_training", __doc__, run, argv)


if __name__ == "__main__":
    main()

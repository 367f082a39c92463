"""Shared helpers for the benchmarks: machine facts, timing, and writing results (JSON + markdown)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bytelm.training.config import OptimizerSection
from bytelm.training.optim import in_blocks, make_optimizer

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write(name: str, payload: dict, markdown: str, out_dir: Path = RESULTS) -> None:
    """`name`.json (machine facts + payload, every raw timing) and `name`.md (the table) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)


def pyplot():
    """matplotlib's pyplot on a file backend, or None when it is not installed (plots are then skipped)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Slope of log y against log x (least squares): cost ~ length ** slope."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den


def bytelm_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, local: tuple[str, ...] = (),
                     local_lr_scale: float = 1.0, optimizer: str = "adamw"):
    """The optimizer as bytelm trains (bytelm.training.optim.make_optimizer), for every contender alike: AdamW
    (0.9, 0.95), decay on matrices and embeddings only, or with optimizer="muon" Muon for the transformer stacks'
    matrices (bytelm's blocks, megabyte-pytorch's `transformers`, mblm's `stage_models`) and that AdamW for the rest;
    parameter groups whose `lr_scale` is local_lr_scale for the parameters whose names start with a prefix in `local`
    (a MEGABYTE's local stack), else 1 (the caller multiplies its schedule's rate by each group's lr_scale)."""
    settings = OptimizerSection(name=optimizer, lr=lr, weight_decay=weight_decay, beta1=0.9, beta2=0.95,
                                local_lr_scale=local_lr_scale)
    return make_optimizer(model, settings, {"local": local}, hidden=stack_matrix)


def stack_matrix(name: str) -> bool:
    """A parameter of a transformer stack, in bytelm or in a peer: what Muon trains."""
    return in_blocks(name) or name.startswith(("transformers.", "stage_models."))


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backward, clip the gradient norm to 1, step, clear the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def main_for(name: str, doc: str, run, argv=None) -> dict:
    """The command line of one benchmark module: `python -m benchmarks.NAME --suite quick|full|smoke`."""
    import argparse

    from . import suites

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="quick", choices=["quick", "full", "smoke"])
    args = ap.parse_args(argv)
    suite = suites.get(args.suite)
    payload = run(suite, RESULTS / suite.name)
    print((RESULTS / suite.name / f"{name}.md").read_text())
    return payload

"""The optimizer's step on a CPU: AdamW for all, Muon + AdamW with torch's bf16 Newton-Schulz, and with bytelm's fp32
one (`Fp32Muon`, what bytelm uses on a CPU without bf16 matrix instructions), beside one forward + backward of the
same model, all in one run.

    python -m benchmarks.optimizer_step [--preset small] [--batch 8] [--repeats 5]

Every repeat times each variant's step once, in turn, on the same gradients (random, fixed), so that machine noise
hits all alike; reports medians, and each step as a share of a training step (forward + backward + that step).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from bytelm import Megabyte, MegabyteConfig
from bytelm.training.config import OptimizerSection
from bytelm.training.optim import Fp32Muon, make_optimizer
from bytelm.training.precision import cpu_has_native_bf16

from .common import RESULTS, median, timed, write


def optimizers(model: torch.nn.Module) -> dict[str, object]:
    """variant -> an optimizer over its own copy of the model (the steps must not feed each other)."""
    out = {}
    for name, optimizer, muon_class in (("AdamW", "adamw", None), ("Muon (torch, bf16 Newton-Schulz)", "muon",
                                         torch.optim.Muon), ("Muon (bytelm, fp32 Newton-Schulz)", "muon", Fp32Muon)):
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.grad = torch.randn_like(p, generator=torch.Generator().manual_seed(0)) * 1e-3
        opt = make_optimizer(m, OptimizerSection(name=optimizer))
        if muon_class is not None:  # swap in the class asked for, whatever this CPU would get by default
            part = opt.parts["muon"]
            opt.parts["muon"] = muon_class(part.param_groups, lr=4e-3, weight_decay=0.1,
                                           adjust_lr_fn="match_rms_adamw")
        out[name] = opt
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json and .md")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = MegabyteConfig.from_name(args.preset)
    model = Megabyte(cfg)
    x = torch.randint(0, 256, (args.batch, cfg.max_seq_len))
    opts = optimizers(model)
    times: dict[str, list[float]] = {name: [] for name in ["forward + backward (fp32)", *opts]}

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model.loss(x).backward()

    fwd_bwd()  # warm-up, and one step of each
    for opt in opts.values():
        opt.step()
    for _ in range(args.repeats):
        times["forward + backward (fp32)"].append(timed(fwd_bwd)[0])
        for name, opt in opts.items():
            times[name].append(timed(opt.step)[0])
    med = {k: median(v) for k, v in times.items()}
    fb = med["forward + backward (fp32)"]
    rows = [f"| {k} | {1000 * v:,.1f} | {'' if k.startswith('forward') else f'{v / (fb + v):.0%}'} |"
            for k, v in med.items()]
    md = (f"# Optimizer step, MEGABYTE `{args.preset}` ({model.num_params():,} params), batch {args.batch} x "
          f"{cfg.max_seq_len}\n\nCPU with native bf16: {cpu_has_native_bf16()}; {torch.get_num_threads()} threads; "
          f"median of {args.repeats}, interleaved.\n\n| what | ms | share of a training step |\n|---|---|---|\n"
          + "\n".join(rows) + "\n")
    torch_muon, ours = med["Muon (torch, bf16 Newton-Schulz)"], med["Muon (bytelm, fp32 Newton-Schulz)"]
    md += f"\nbytelm's fp32 Muon step vs. torch's bf16 one: **{torch_muon / ours:.1f}x** faster here.\n"
    payload = {"preset": args.preset, "batch": args.batch, "native_bf16": cpu_has_native_bf16(),
               "seconds": times, "median_seconds": med, "speedup_fp32_over_bf16": torch_muon / ours,
               "measured_at": time.strftime("%Y-%m-%d")}
    write(f"optimizer_step_{args.preset}", payload, md, args.out)
    print(md)
    return payload


if __name__ == "__main__":
    main()

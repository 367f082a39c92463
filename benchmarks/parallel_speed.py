"""A training step under DDP and under FSDP2 (the local model's blocks sharded one by one, or kept in the root's
unit), side by side in one torchrun job, interleaved step by step so the machine's noise falls on all alike; and each
rank's parameter + gradient + optimizer bytes, measured.

    python -m benchmarks.parallel_speed [--ranks 2] [--preset small] [--steps 12]

It launches itself under torchrun (gloo on the CPU, NCCL on CUDA) and writes
benchmarks/results/parallel_speed.md. On one CPU machine the ranks share its cores and gloo copies through memory:
the ratios say what sharding costs in collectives, not what many GPUs would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from bytelm.training import TrainConfig, Trainer
from bytelm.training.memory import held_bytes

from .common import RESULTS

VARIANTS = {"ddp": {"parallel": "ddp"}, "fsdp, local blocks sharded": {"parallel": "fsdp", "fsdp_local": "shard"},
            "fsdp, local model in the root unit": {"parallel": "fsdp", "fsdp_local": "root"}}


def state_bytes(trainer: Trainer) -> int:
    """This rank's bytes of parameters, gradients (one per parameter: a step leaves none held) and optimizer state."""
    held = held_bytes(trainer.model, trainer.optimizer)
    return 2 * held["params"] + held["optimizer"]


def worker(args) -> None:
    data = Path(sysconfig.get_paths()["stdlib"]) / "email"
    trainers = {}
    for name, over in VARIANTS.items():
        settings = {"preset": args.preset, "data": [str(data)], "out_dir": tempfile.mkdtemp(), "seq_len": args.seq_len,
                    "batch_size": args.batch_size, "max_steps": args.steps + 2, "sample_bytes": 0, "precision": "fp32",
                    "log_interval": 10_000, "eval_interval": 10_000, "save_interval": 10_000, **over}
        trainers[name] = Trainer(TrainConfig.from_dict(settings), log=lambda *_: None)
    times = {name: [] for name in trainers}
    for step in range(args.steps + 2):  # the first two: warm-up
        for name, trainer in trainers.items():
            trainer.env.barrier()
            t0 = time.perf_counter()
            trainer.train_step()
            trainer.env.barrier()
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    if next(iter(trainers.values())).master:
        out = {name: {"step_s": statistics.median(t), "bytes": state_bytes(trainers[name])}
               for name, t in times.items()}
        Path(args.json).write_text(json.dumps(out))
    for trainer in trainers.values():  # what holds the process group, dropped before it is (Trainer.close)
        trainer.forward = trainer.eager_forward = trainer.model = trainer.optimizer = None
    next(iter(trainers.values())).close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", default="")
    p.add_argument("--out", type=Path, default=RESULTS / "parallel_speed.md")
    args = p.parse_args()
    if args.json:  # a rank of the torchrun job
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks), "--master-port",
               "29655", "-m", "benchmarks.parallel_speed", "--preset", args.preset, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--json", str(result)]
        threads = max(1, (os.cpu_count() or 1) // args.ranks)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        out = json.loads(result.read_text())
    ddp = out["ddp"]
    lines = [f"# A training step under DDP and FSDP2: {args.preset}, {args.ranks} ranks",
             "", f"`python -m benchmarks.parallel_speed --ranks {args.ranks} --preset {args.preset} --steps "
                 f"{args.steps}`: {args.ranks} processes x {args.batch_size} windows of {args.seq_len} bytes, fp32, "
                 f"Muon + AdamW, median of {args.steps} steps interleaved; device "
                 f"{'cuda' if torch.cuda.is_available() else f'cpu ({os.cpu_count()} cores, gloo)'}.", "",
             "| strategy | step (s) | vs DDP | parameters + gradients + optimizer state per rank (MB) |",
             "|---|---:|---:|---:|"]
    for name, r in out.items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / ddp['step_s']:.2f}x | "
                     f"{r['bytes'] / 1e6:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()

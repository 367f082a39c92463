"""Quality at equal compute: bytelm MEGABYTE, the bytelm byte transformer of equal parameters, and megabyte-pytorch and
mblm at MEGABYTE's shape, each trained for the same wall-clock time on the same corpus, then scored on the same held-out
bytes; repeated for each model-init seed (mean and spread = max - min over seeds).

    python -m benchmarks.quality --suite quick|full|smoke [--corpus stdlib|cmake-help|PATH] [--seeds 0 1]
                                 [--seconds S] [--lr LR] [--local-lr-scale X] [--optimizer muon|adamw]
                                 [--precision equal|fp32|bf16|default|both]

Corpus: `stdlib` (the Python standard library's source on this machine, bytelm's default corpus), `cmake-help`
(CMake's reStructuredText documentation, /usr/share/cmake-*/Help, Debian's cmake-data), or any file or folder; split
by file (bytelm's default split, 5% of files held out). Every model sees the same batches in the same order (one
sampler seed for all seeds), with bytelm's default training recipe (bytelm.training.TrainConfig's optimizer: Muon for
every model's transformer-stack matrices and AdamW for the rest, peak lr, local-stack lr scale, AdamW betas and weight
decay, final lr ratio) over each model's own time budget: linear warm-up for its
first 5% (not TrainConfig's 100 steps, a large share of a short benchmark), then cosine to 10%; every MEGABYTE's
local stack (bytelm's and the peers' alike) learns at the recipe's `local_lr_scale` times the rate. `--lr` and
`--local-lr-scale` and `--optimizer` override the recipe for every model.
Precision: `equal` (the default) trains every model at bytelm's default precision on this machine (bf16 autocast on
a CPU with native bf16 matmuls, else fp32); `fp32` trains every model in fp32; `bf16` every model, the peers too,
under CPU bf16 autocast; `default` trains bytelm's models at their default precision (`TrainConfig.precision="auto"`)
and the peers in fp32, their default; `both` adds bytelm MEGABYTE at its default precision as an extra row next to
the all-fp32 rows.
Training is interleaved in slices of a few seconds, least-trained model first, so that machine noise hits all
alike; each model's budget counts only its own steps. Validation bpb: bytelm's metric (summed nats / (ln 2 * bytes),
every byte counted, byte 0 of each window predicted from nothing) on the same `quality_eval_windows` windows for all;
for megabyte-pytorch on its own logits (see benchmarks/peer.py)."""

from __future__ import annotations

import argparse
import glob
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from bytelm import ByteTransformer, Megabyte
from bytelm.data import WindowSampler, load_split
from bytelm.models import byte_loss, get_spec
from bytelm.training import TrainConfig
from bytelm.training.precision import autocast_for, uses_bf16

from . import peer as peer_mod
from . import suites
from .common import RESULTS, bytelm_optimizer, fmt_params, optimizer_step, write

SLICE_SECONDS = 5.0
CORPORA = {"stdlib": "the Python standard library's source", "cmake-help": "CMake's documentation, reStructuredText"}
OURS = "bytelm MEGABYTE"
OURS_DEFAULT = "bytelm MEGABYTE, default precision"


def corpus_paths(corpus: str) -> list[str] | None:
    """What load_split reads for a corpus name (None: bytelm's default, the stdlib), or the path itself."""
    if corpus == "stdlib":
        return None
    if corpus == "cmake-help":
        found = sorted(glob.glob("/usr/share/cmake-*/Help"))
        if not found:
            raise SystemExit("cmake-help: no /usr/share/cmake-*/Help here (Debian: apt-get install cmake-data)")
        return [found[-1]]
    if not Path(corpus).exists():
        raise SystemExit(f"--corpus: no such file or folder {corpus!r}; or choose stdlib, cmake-help")
    return [corpus]


def recipe(suite: suites.Suite, lr: float | None = None, local_lr_scale: float | None = None,
           optimizer: str | None = None) -> TrainConfig:
    """bytelm's default training recipe over this suite's time budget (lr, local-stack scale, optimizer overridable)."""
    overridden = {k: v for k, v in (("optimizer", optimizer), ("lr", lr), ("local_lr_scale", local_lr_scale))
                  if v is not None}
    return TrainConfig.flat(time_budget=suite.quality_seconds, out_dir="-", **overridden)


class Contender:
    def __init__(self, name: str, model: torch.nn.Module, logits_fn, suite: suites.Suite, cfg: TrainConfig,
                 train_data, local: tuple[str, ...] = (), bf16: bool = False) -> None:
        self.name, self.model, self.logits_fn, self.suite, self.cfg = name, model, logits_fn, suite, cfg
        o = cfg.optimizer
        self.opt = bytelm_optimizer(model, o.lr, o.weight_decay, local=local, local_lr_scale=o.local_lr_scale,
                                    optimizer=o.name)
        self.sampler = WindowSampler(train_data, suite.quality_seq_len, suite.quality_batch, seed=1337)
        self.bf16 = bf16
        self.elapsed, self.steps, self.losses = 0.0, 0, []

    def lr(self) -> float:
        """Warm-up over the first 5% of the time budget, then cosine to lr * min_lr_ratio at its end."""
        frac = min(1.0, self.elapsed / self.suite.quality_seconds)
        base, floor = self.cfg.optimizer.lr, self.cfg.schedule.min_lr_ratio
        if frac < 0.05:
            return base * max(frac / 0.05, 0.01)
        return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95)))

    def cast(self):
        return autocast_for("bf16" if self.bf16 else "fp32", torch.device("cpu"))

    def step_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss of batch x: cross-entropy of the model's logits (autocast as this contender's)."""
        with self.cast():
            logits = self.logits_fn(self.model, x)
        return byte_loss(logits, x)

    def train_for(self, seconds: float) -> None:
        self.model.train()
        end = self.elapsed + seconds
        while self.elapsed < min(end, self.suite.quality_seconds):
            x = self.sampler.next_batch()
            t0 = time.perf_counter()
            for g in self.opt.param_groups:
                g["lr"] = self.lr() * g["lr_scale"]
            loss = self.step_loss(x)
            optimizer_step(self.model, self.opt, loss)
            self.elapsed += time.perf_counter() - t0
            self.steps += 1
            self.losses.append(loss.item())

    @torch.inference_mode()
    def val_bpb(self, windows: list[torch.Tensor]) -> float:
        self.model.eval()
        with self.cast():
            nats = sum(byte_loss(self.logits_fn(self.model, x), x, reduction="sum").item() for x in windows)
        n = sum(x.numel() for x in windows)
        return nats / (math.log(2) * n)


def bytelm_default_bf16() -> bool:
    """Whether `bytelm train` computes in bf16 autocast on this machine's CPU (TrainConfig's default precision)."""
    return uses_bf16(TrainConfig().parallel.precision, torch.device("cpu"))


def contenders_for(suite: suites.Suite, cfg: TrainConfig, train, precision: str, paper: bool) -> list[Contender]:
    ours = lambda m, x: m(x)  # noqa: E731
    local = get_spec("megabyte").stacks["local"]
    default_bf16 = bytelm_default_bf16()
    bf16 = precision == "bf16" or (precision == "default" and default_bf16)
    peers_bf16 = precision == "bf16"
    out = [Contender(OURS, Megabyte(suite.megabyte), ours, suite, cfg, train, local, bf16=bf16)]
    if precision == "both":
        out.append(Contender(OURS_DEFAULT, Megabyte(suite.megabyte), ours, suite, cfg, train, local,
                             bf16=default_bf16))
    if paper:
        cfg_paper = suite.megabyte.replace(local_context=0, local_norms=False, init="gpt2")
        out.append(Contender("bytelm MEGABYTE, the paper's local model", Megabyte(cfg_paper), ours, suite, cfg, train,
                             local, bf16=bf16))
    out.append(Contender("bytelm ByteTransformer", ByteTransformer(suite.transformer_eq), ours, suite, cfg, train,
                         bf16=bf16))
    if peer_mod.available():
        out.append(Contender("megabyte-pytorch", peer_mod.build_peer(suite.megabyte, suite.quality_seq_len),
                             peer_mod.peer_logits, suite, cfg, train, peer_mod.PEER_LOCAL, bf16=peers_bf16))
    if peer_mod.mblm_available():
        out.append(Contender("mblm", peer_mod.build_mblm(suite.megabyte, suite.quality_seq_len),
                             peer_mod.mblm_logits, suite, cfg, train, peer_mod.MBLM_LOCAL, bf16=peers_bf16))
    return out


def run(suite: suites.Suite, out_dir=RESULTS, corpus: str = "stdlib", seeds: tuple[int, ...] = (0,),
        lr: float | None = None, local_lr_scale: float | None = None, precision: str = "equal",
        paper: bool = True, name: str | None = None, optimizer: str | None = None) -> dict:
    if precision == "equal":  # every model at bytelm's default precision on this machine
        precision = "bf16" if bytelm_default_bf16() else "fp32"
    train, val, split = load_split(corpus_paths(corpus))
    cfg = recipe(suite, lr, local_lr_scale, optimizer)
    o = cfg.optimizer
    ev = WindowSampler(val, suite.quality_seq_len, 1, seed=2024)
    windows = [ev.next_batch() for _ in range(suite.quality_eval_windows)]
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        contenders = contenders_for(suite, cfg, train, precision, paper)
        while True:
            todo = [c for c in contenders if c.elapsed < suite.quality_seconds]
            if not todo:
                break
            min(todo, key=lambda c: c.elapsed).train_for(min(SLICE_SECONDS, suite.quality_seconds))
        for c in contenders:
            runs.setdefault(c.name, []).append(
                {"seed": seed, "val_bpb": c.val_bpb(windows), "steps": c.steps, "train_seconds": c.elapsed,
                 "bf16": c.bf16, "params": sum(p.numel() for p in c.model.parameters()),
                 "final_train_bpb": sum(c.losses[-10:]) / max(1, len(c.losses[-10:])) / math.log(2),
                 "loss_curve": c.losses})
    results = {}
    for cname, rs in runs.items():
        b = [r["val_bpb"] for r in rs]
        results[cname] = {"val_bpb": statistics.mean(b), "spread": max(b) - min(b), "seeds": [r["seed"] for r in rs],
                          "val_bpb_per_seed": b, "steps": round(statistics.mean(r["steps"] for r in rs)),
                          "bytes_seen": round(statistics.mean(r["steps"] for r in rs)) * suite.quality_batch
                          * suite.quality_seq_len, "params": rs[0]["params"], "bf16": rs[0]["bf16"], "runs": rs}
    payload = {"suite": suite.name, "corpus": corpus, "corpus_name": CORPORA.get(corpus, corpus),
               "seconds_each": suite.quality_seconds, "seq_len": suite.quality_seq_len, "batch": suite.quality_batch,
               "recipe": {"optimizer": o.name, "lr": o.lr, "local_lr_scale": o.local_lr_scale,
                          "warmup": "5% of the time budget",
                          "schedule": "cosine", "min_lr_ratio": cfg.schedule.min_lr_ratio,
                          "weight_decay": o.weight_decay, "betas": [o.beta1, o.beta2],
                          "grad_clip": 1.0,
                          "overridden": lr is not None or local_lr_scale is not None or optimizer is not None},
               "lr": o.lr, "local_lr_scale": o.local_lr_scale, "precision": precision, "seeds": list(seeds),
               "split": split, "eval_bytes": sum(x.numel() for x in windows), "results": results}
    write(name or ("quality" if corpus == "stdlib" else f"quality-{corpus}"), payload, markdown(payload), out_dir)
    return payload


def markdown(p: dict) -> str:
    seeds = p.get("seeds", [0])
    lines = [f"# Validation bits per byte after {p['seconds_each']:,.0f} s of training each "
             f"({p.get('corpus_name', 'Python stdlib')}, split by file; {p['eval_bytes']:,} held-out bytes)", "",
             f"Mean over {len(seeds)} model-init seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}); "
             "spread = max - min over seeds.", "",
             "| model | params | precision | steps (mean) | bytes seen | val bpb (mean) | spread | per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(p["results"].items(), key=lambda kv: kv[1]["val_bpb"]):
        per = ", ".join(f"{b:.3f}" for b in r.get("val_bpb_per_seed", [r["val_bpb"]]))
        spread = f"{r['spread']:.3f}" if len(seeds) > 1 else "-"
        lines.append(f"| {name} | {fmt_params(r['params'])} | {'bf16 autocast' if r.get('bf16') else 'fp32'} | "
                     f"{r['steps']:,} | {r['bytes_seen']:,} | {r['val_bpb']:.3f} | {spread} | {per} |")
    rc = p.get("recipe", {})
    opt = ("Muon for the transformer stacks' matrices (AdamW-matched RMS) and AdamW for the rest"
           if rc.get("optimizer") == "muon" else "AdamW")
    lines += ["", f"Batch {p['batch']} x {p['seq_len']:,} bytes, the same batches for all. Recipe "
              f"({'overridden' if rc.get('overridden') else 'bytelm default, TrainConfig'}): {opt}, lr {p['lr']:g} "
              f"(each MEGABYTE's local stack: {p.get('local_lr_scale', 1):g}x), betas {tuple(rc.get('betas', []))}, "
              f"weight decay {rc.get('weight_decay')}, warm-up over 5% of the time budget, cosine to "
              f"{rc.get('min_lr_ratio')}x at its end (each model's own), clip 1.0. {p['split']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="quick", choices=["quick", "full", "smoke"])
    ap.add_argument("--corpus", default="stdlib", help="stdlib | cmake-help | a file or folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="model-init seeds (default: 0)")
    ap.add_argument("--seconds", type=float, help="training seconds per model (default: the suite's)")
    ap.add_argument("--lr", type=float, help="peak lr for every model (default: bytelm's TrainConfig.lr)")
    ap.add_argument("--local-lr-scale", type=float, help="every MEGABYTE's local stack (default: TrainConfig's)")
    ap.add_argument("--optimizer", choices=["muon", "adamw"], help="every model's (default: bytelm's TrainConfig)")
    ap.add_argument("--precision", default="equal", choices=["equal", "fp32", "bf16", "default", "both"])
    ap.add_argument("--no-paper", action="store_true", help="leave out the paper's-design MEGABYTE")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<suite>)")
    ap.add_argument("--name", help="results file name without extension (default quality[-CORPUS])")
    args = ap.parse_args(argv)
    suite = suites.get(args.suite)
    if args.seconds:
        suite = replace(suite, quality_seconds=args.seconds)
    out = args.out or RESULTS / suite.name
    payload = run(suite, out, args.corpus, tuple(args.seeds), args.lr, args.local_lr_scale, args.precision,
                  not args.no_paper, args.name, args.optimizer)
    name = args.name or ("quality" if args.corpus == "stdlib" else f"quality-{args.corpus}")
    print((out / f"{name}.md").read_text())
    return payload


if __name__ == "__main__":
    main()

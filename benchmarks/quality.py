"""Quality at equal compute: bytelm MEGABYTE, the bytelm byte transformer of equal parameters, and megabyte-pytorch and
mblm at MEGABYTE's shape, each trained for the same wall-clock time on the same corpus, then scored on the same held-out
bytes.

    python -m benchmarks.quality --suite quick|full|smoke

Corpus: the Python standard library's source on this machine, split by file (bytelm's default split, 5% of files held
out). Every model sees the same batches in the same order (one sampler seed), with the same AdamW settings and a
schedule over its own time budget (linear warm-up for the first 5%, cosine to 10%); every MEGABYTE's local stack
(bytelm's and the peers' alike) learns at `quality_local_lr_scale` times the rate, as bytelm's recipe trains it.
Training is interleaved in slices of a few seconds, least-trained model first, so that machine noise hits all three
alike; each model's budget counts only its own steps. Validation bpb: bytelm's metric (summed nats / (ln 2 * bytes),
every byte counted, byte 0 of each window predicted from nothing) on the same `quality_eval_windows` windows for all;
for megabyte-pytorch on its own logits (see benchmarks/peer.py)."""

from __future__ import annotations

import math
import time

import torch

from bytelm import ByteTransformer, Megabyte
from bytelm.data import WindowSampler, load_split
from bytelm.models import byte_loss, get_spec

from . import peer as peer_mod
from . import suites
from .common import RESULTS, adamw, fmt_params, main_for, optimizer_step, write

SLICE_SECONDS = 5.0


class Contender:
    def __init__(self, name: str, model: torch.nn.Module, logits_fn, suite: suites.Suite, train_data,
                 local: tuple[str, ...] = ()) -> None:
        self.name, self.model, self.logits_fn, self.suite = name, model, logits_fn, suite
        self.opt = adamw(model, suite.quality_lr, local=local, local_lr_scale=suite.quality_local_lr_scale)
        self.sampler = WindowSampler(train_data, suite.quality_seq_len, suite.quality_batch, seed=1337)
        self.elapsed, self.steps, self.losses = 0.0, 0, []

    def lr(self) -> float:
        frac = min(1.0, self.elapsed / self.suite.quality_seconds)
        base = self.suite.quality_lr
        if frac < 0.05:
            return base * max(frac / 0.05, 0.01)
        return base * (0.1 + 0.45 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95)))

    def train_for(self, seconds: float) -> None:
        self.model.train()
        end = self.elapsed + seconds
        while self.elapsed < min(end, self.suite.quality_seconds):
            x = self.sampler.next_batch()
            t0 = time.perf_counter()
            for g in self.opt.param_groups:
                g["lr"] = self.lr() * g["lr_scale"]
            loss = byte_loss(self.logits_fn(self.model, x), x)
            optimizer_step(self.model, self.opt, loss)
            self.elapsed += time.perf_counter() - t0
            self.steps += 1
            self.losses.append(loss.item())

    @torch.inference_mode()
    def val_bpb(self, windows: list[torch.Tensor]) -> float:
        self.model.eval()
        nats = sum(byte_loss(self.logits_fn(self.model, x), x, reduction="sum").item() for x in windows)
        n = sum(x.numel() for x in windows)
        return nats / (math.log(2) * n)


def run(suite: suites.Suite, out_dir=RESULTS) -> dict:
    train, val, split = load_split(None)
    torch.manual_seed(0)
    ours = lambda m, x: m(x)
    paper = suite.megabyte.replace(local_context=0, local_norms=False)
    local = get_spec("megabyte").stacks["local"]
    contenders = [Contender("bytelm MEGABYTE", Megabyte(suite.megabyte), ours, suite, train, local),
                  Contender("bytelm MEGABYTE, the paper's local model", Megabyte(paper), ours, suite, train, local),
                  Contender("bytelm ByteTransformer", ByteTransformer(suite.transformer_eq), ours, suite, train)]
    if peer_mod.available():
        contenders.append(Contender("megabyte-pytorch", peer_mod.build_peer(suite.megabyte, suite.quality_seq_len),
                                    peer_mod.peer_logits, suite, train, peer_mod.PEER_LOCAL))
    if peer_mod.mblm_available():
        contenders.append(Contender("mblm", peer_mod.build_mblm(suite.megabyte, suite.quality_seq_len),
                                    peer_mod.mblm_logits, suite, train, peer_mod.MBLM_LOCAL))
    while True:
        todo = [c for c in contenders if c.elapsed < suite.quality_seconds]
        if not todo:
            break
        min(todo, key=lambda c: c.elapsed).train_for(min(SLICE_SECONDS, suite.quality_seconds))
    ev = WindowSampler(val, suite.quality_seq_len, 1, seed=2024)
    windows = [ev.next_batch() for _ in range(suite.quality_eval_windows)]
    results = {}
    for c in contenders:
        results[c.name] = {"val_bpb": c.val_bpb(windows), "steps": c.steps, "train_seconds": c.elapsed,
                           "bytes_seen": c.steps * suite.quality_batch * suite.quality_seq_len,
                           "params": sum(p.numel() for p in c.model.parameters()),
                           "final_train_bpb": sum(c.losses[-10:]) / max(1, len(c.losses[-10:])) / math.log(2),
                           "loss_curve": c.losses}
    payload = {"suite": suite.name, "seconds_each": suite.quality_seconds, "seq_len": suite.quality_seq_len,
               "batch": suite.quality_batch, "lr": suite.quality_lr, "local_lr_scale": suite.quality_local_lr_scale,
               "split": split,
               "eval_bytes": sum(x.numel() for x in windows), "results": results}
    write("quality", payload, markdown(payload), out_dir)
    return payload


def markdown(p: dict) -> str:
    lines = [f"# Validation bits per byte after {p['seconds_each']:,.0f} s of training each (Python stdlib, "
             f"split by file; {p['eval_bytes']:,} held-out bytes)", "",
             "| model | params | steps | bytes seen | val bpb |", "|---|---|---|---|---|"]
    for name, r in p["results"].items():
        lines.append(f"| {name} | {fmt_params(r['params'])} | {r['steps']:,} | {r['bytes_seen']:,} | "
                     f"{r['val_bpb']:.3f} |")
    lines += ["", f"Batch {p['batch']} x {p['seq_len']:,} bytes, AdamW lr {p['lr']:g} (each MEGABYTE's local stack: "
              f"{p.get('local_lr_scale', 1):g}x), same batches for all. {p['split']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    return main_for("quality", __doc__, run, argv)


if __name__ == "__main__":
    main()

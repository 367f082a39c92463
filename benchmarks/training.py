"""Training throughput: bytes/s of forward + backward + AdamW step, bytelm MEGABYTE vs. megabyte-pytorch at the same
shape, and MEGABYTE vs. the byte transformer with the same parameter count.

    python -m benchmarks.training --suite quick|full|smoke

Each round times `train_steps` steps of every model in turn (after one untimed warm-up step each), `train_repeats`
rounds; reported is the median step. Same batch shape (train_batch x train_seq_len bytes) and optimizer for all
(AdamW, fused where the device has it, as bytelm trains); the peer's loss is our byte loss on its logits (every byte
counted), which is what it computes too.

Besides the plain fp32 eager rows (the headline ratios), the three MEGABYTEs are also timed under bf16 autocast (what
`--precision bf16` trains with, and `auto` on a CPU with native bf16), bytelm's and megabyte-pytorch's, where the
suite says so, under torch.compile (`--compile`; its compile time is reported, as it counts against a time budget),
and bytelm's under bf16 with Muon (its default optimizer: what a default `bytelm train` step costs here). A row's
name says which.
"""

from __future__ import annotations

import functools
import time

import torch

from bytelm import ByteTransformer, Megabyte
from bytelm.models import byte_loss
from bytelm.training.precision import autocast_for

from . import peer as peer_mod
from . import suites
from .common import RESULTS, bytelm_optimizer, fmt_params, main_for, median, optimizer_step, write

BF16, COMPILED = ", bf16 autocast", ", compiled"
MUON = ", bf16 autocast + Muon"  # bytelm's default recipe on a CPU with native bf16 (the others: AdamW)


def contenders(suite: suites.Suite, seq_len: int) -> dict[str, tuple[torch.nn.Module, object]]:
    """name -> (module, loss_fn(forward, x)); a name ending in BF16 or COMPILED is timed that way."""
    ours = lambda f, x: byte_loss(f(x), x)  # noqa: E731  (what model.loss computes, through `f`)
    # each MEGABYTE: (how to build it, its loss)
    megabytes = {"bytelm MEGABYTE": (lambda: Megabyte(suite.megabyte), ours)}
    if peer_mod.available():
        megabytes["megabyte-pytorch"] = (lambda: peer_mod.build_peer(suite.megabyte, seq_len),
                                         lambda f, x: byte_loss(peer_mod.peer_logits(f, x), x))
    if peer_mod.mblm_available():
        megabytes["mblm"] = (lambda: peer_mod.build_mblm(suite.megabyte, seq_len),
                             lambda f, x: byte_loss(peer_mod.mblm_logits(f, x), x))
    torch.manual_seed(0)
    out = {}  # the plain rows, in this order: bytelm's two models, then the peers
    for name, (build, loss) in megabytes.items():
        out[name] = (build(), loss)
        if name == "bytelm MEGABYTE":
            out["bytelm ByteTransformer"] = (ByteTransformer(suite.transformer_eq), ours)
    for name, (build, loss) in megabytes.items():
        hows = [BF16, COMPILED] if suite.train_compile and name != "mblm" else [BF16]
        for how in hows + ([MUON] if name == "bytelm MEGABYTE" else []):
            torch.manual_seed(0)
            out[name + how] = (build(), loss)
    return out


def step_fn(model, loss_fn, batch_shape, how: str = ""):
    opt = (bytelm_optimizer(model, 1e-4, optimizer="muon") if how == MUON
           else torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    forward = torch.compile(model) if how == COMPILED else model
    precision = functools.partial(autocast_for, "bf16" if how in (BF16, MUON) else "fp32", torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randint(0, 256, batch_shape, generator=gen)
        t0 = time.perf_counter()
        with precision():
            loss = loss_fn(forward, x)
        optimizer_step(model, opt, loss)
        return time.perf_counter() - t0

    return step


def run(suite: suites.Suite, out_dir=RESULTS) -> dict:
    B, T = suite.train_batch, suite.train_seq_len
    models = contenders(suite, T)
    steps, compile_s = {}, {}
    if suite.train_compile:  # compile times from cold, not from an earlier run's cache
        torch._inductor.config.force_disable_caches = True
    for name, (m, loss_fn) in models.items():
        m.train()
        how = next((h for h in (MUON, BF16, COMPILED) if name.endswith(h)), "")
        steps[name] = step_fn(m, loss_fn, (B, T), how)
        t0 = time.perf_counter()
        steps[name]()  # warm-up (and, compiled, compiling)
        if how == COMPILED:
            compile_s[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(suite.train_repeats):
        for name, step in steps.items():
            times[name] += [step() for _ in range(suite.train_steps)]
    bps = {name: B * T / median(t) for name, t in times.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in models.items()}
    payload = {"suite": suite.name, "batch": B, "seq_len": T, "step_seconds": times, "bytes_per_s": bps,
               "params": params, "megabyte_config": suite.megabyte.to_dict(),
               "transformer_config": suite.transformer_eq.to_dict(),
               "megabyte_vs_transformer": bps["bytelm MEGABYTE"] / bps["bytelm ByteTransformer"]}
    if "megabyte-pytorch" in bps:
        payload["megabyte_vs_peer"] = bps["bytelm MEGABYTE"] / bps["megabyte-pytorch"]
        payload["variants_vs_peer"] = {name: b / bps["megabyte-pytorch"] for name, b in bps.items()
                                       if name.startswith(("bytelm MEGABYTE", "megabyte-pytorch", "mblm"))}
    payload["compile_seconds"] = compile_s  # the first (warm-up) step of each compiled model, compiling included
    if "mblm" in bps:
        payload["megabyte_vs_mblm"] = bps["bytelm MEGABYTE"] / bps["mblm"]
    write("training", payload, markdown(payload), out_dir)
    return payload


def markdown(p: dict) -> str:
    lines = [f"# Training throughput: forward + backward + AdamW, batch {p['batch']} x {p['seq_len']:,} bytes "
             f"(median step)", "", "Rows: fp32 eager unless the name says bf16 autocast or compiled (torch.compile, "
             "inductor; compile time: the first step).", "",
             "| model | params | bytes/s | vs. megabyte-pytorch (fp32 eager) |", "|---|---|---|---|"]
    vs = p.get("variants_vs_peer", {})
    for name, bps in p["bytes_per_s"].items():
        ratio = f"{vs[name]:.2f}x" if name in vs else ""
        lines.append(f"| {name} | {fmt_params(p['params'][name])} | {bps:,.0f} | {ratio} |")
    lines += ["", f"- MEGABYTE vs. the byte transformer of equal parameters: **{p['megabyte_vs_transformer']:.2f}x**."]
    if "megabyte_vs_peer" in p:
        lines.append(f"- bytelm MEGABYTE vs. megabyte-pytorch at the same shape: **{p['megabyte_vs_peer']:.2f}x**.")
    if "megabyte_vs_mblm" in p:
        lines.append(f"- bytelm MEGABYTE vs. mblm at the same shape: **{p['megabyte_vs_mblm']:.2f}x**.")
    b = p["bytes_per_s"]
    for how in (BF16, COMPILED):
        ours = "bytelm MEGABYTE" + how
        for other in ("megabyte-pytorch", "mblm"):
            if ours in b and other + how in b:
                lines.append(f"- both{how}: bytelm MEGABYTE vs. {other} **{b[ours] / b[other + how]:.2f}x**.")
    if "bytelm MEGABYTE" + MUON in b and "bytelm MEGABYTE" + BF16 in b:
        lines.append(f"- Muon's cost (bytelm's default optimizer; the rows above step AdamW): "
                     f"{b['bytelm MEGABYTE' + BF16] / b['bytelm MEGABYTE' + MUON]:.2f}x the bf16 AdamW step's time.")
    for name, sec in p.get("compile_seconds", {}).items():
        lines.append(f"- compiling {name.removesuffix(COMPILED)}: {sec:.0f} s (the first step).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    return main_for("training", __doc__, run, argv)


if __name__ == "__main__":
    main()

"""Training throughput: bytes/s of forward + backward + AdamW step, bytelm MEGABYTE vs. megabyte-pytorch at the same
shape, and MEGABYTE vs. the byte transformer with the same parameter count.

    python -m benchmarks.training --suite quick|full|smoke

Each round times `train_steps` steps of every model in turn (after one untimed warm-up step each), `train_repeats`
rounds; reported is the median step. Same batch shape (train_batch x train_seq_len bytes) and optimizer for all; the
peer's loss is our byte loss on its logits (every byte counted), which is what it computes too.
"""

from __future__ import annotations

import time

import torch

from bytelm import ByteTransformer, Megabyte
from bytelm.models import byte_loss

from . import peer as peer_mod
from . import suites
from .common import RESULTS, fmt_params, main_for, median, optimizer_step, write


def contenders(suite: suites.Suite, seq_len: int) -> dict[str, tuple[torch.nn.Module, object]]:
    """name -> (module, loss_fn(module, x))."""
    torch.manual_seed(0)
    out = {
        "bytelm MEGABYTE": (Megabyte(suite.megabyte), lambda m, x: m.loss(x)),
        "bytelm ByteTransformer": (ByteTransformer(suite.transformer_eq), lambda m, x: m.loss(x)),
    }
    if peer_mod.available():
        out["megabyte-pytorch"] = (peer_mod.build_peer(suite.megabyte, seq_len),
                                   lambda m, x: byte_loss(peer_mod.peer_logits(m, x), x))
    if peer_mod.mblm_available():
        out["mblm"] = (peer_mod.build_mblm(suite.megabyte, seq_len),
                       lambda m, x: byte_loss(peer_mod.mblm_logits(m, x), x))
    return out


def step_fn(model, loss_fn, batch_shape):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randint(0, 256, batch_shape, generator=gen)
        t0 = time.perf_counter()
        optimizer_step(model, opt, loss_fn(model, x))
        return time.perf_counter() - t0

    return step


def run(suite: suites.Suite, out_dir=RESULTS) -> dict:
    B, T = suite.train_batch, suite.train_seq_len
    models = contenders(suite, T)
    steps = {}
    for name, (m, loss_fn) in models.items():
        m.train()
        steps[name] = step_fn(m, loss_fn, (B, T))
        steps[name]()  # warm-up
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
    if "mblm" in bps:
        payload["megabyte_vs_mblm"] = bps["bytelm MEGABYTE"] / bps["mblm"]
    write("training", payload, markdown(payload), out_dir)
    return payload


def markdown(p: dict) -> str:
    lines = [f"# Training throughput: forward + backward + AdamW, batch {p['batch']} x {p['seq_len']:,} bytes "
             f"(median step)", "", "| model | params | bytes/s |", "|---|---|---|"]
    for name, bps in p["bytes_per_s"].items():
        lines.append(f"| {name} | {fmt_params(p['params'][name])} | {bps:,.0f} |")
    lines += ["", f"- MEGABYTE vs. the byte transformer of equal parameters: **{p['megabyte_vs_transformer']:.2f}x**."]
    if "megabyte_vs_peer" in p:
        lines.append(f"- bytelm MEGABYTE vs. megabyte-pytorch at the same shape: **{p['megabyte_vs_peer']:.2f}x**.")
    if "megabyte_vs_mblm" in p:
        lines.append(f"- bytelm MEGABYTE vs. mblm at the same shape: **{p['megabyte_vs_mblm']:.2f}x**.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    return main_for("training", __doc__, run, argv)


if __name__ == "__main__":
    main()

"""Why did megabyte-pytorch learn more per step than bytelm's MEGABYTE (the paper's design, bytelm 0.1)? Each of its
design choices, moved into ours one at a time (and its token shift taken out of it), trained for the same steps on the
same batches and scored on the same held-out bytes. None closed the gap; benchmarks/local_context.py found the cause.

    python -m benchmarks.ablation [--steps 150] [--variants ours peer ...]

Shape: the benchmarks' `full` MEGABYTE (benchmarks/suites.py). Batch 8 x 1,024 bytes of the Python standard library
(bytelm's split by file), AdamW (0.9, 0.95), weight decay 0.1 on matrices, lr warm-up over 20 steps then cosine to 10%,
gradient clipping 1.0; validation bpb over 64 windows of 1,024 held-out bytes. Each variant runs in its own process
(some patch module state), one seed each: read differences under ~0.05 bpb as noise.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bytelm import Megabyte
from bytelm.data import WindowSampler, load_split
from bytelm.models import byte_loss

from . import peer, suites
from .common import RESULTS, bytelm_optimizer, optimizer_step, write

VARIANTS = {
    "ours": "bytelm MEGABYTE, the paper's local model",
    "peer": "megabyte-pytorch",
    "peer-noshift": "megabyte-pytorch without its token shift",
    "ours-shift": "ours + its token shift",
    "ours-patchproj": "ours + its patch embedder (LayerNorm, Linear, LayerNorm over P x D_L-wide byte embeddings)",
    "ours-fullproj": "ours + its global-to-local projection (one full G x P*D_L matrix instead of the paper's "
                     "per-slice W_GL)",
    "ours-embinit": "ours + its embedding scale (N(0, 1) instead of N(0, 0.02))",
    "ours-torchinit": "ours + PyTorch's default Linear init instead of GPT-2's",
    "ours-rmsnorm": "ours + RMSNorm instead of LayerNorm",
    "ours-lr4e-3": "ours at lr 4e-3",
}


def _token_shift(t: torch.Tensor) -> torch.Tensor:
    """megabyte-pytorch's (from RWKV): half of each position's features come from the position before."""
    a, b = t.chunk(2, dim=-1)
    return torch.cat((a, F.pad(b, (0, 0, 1, -1))), dim=-1)


def build(variant: str) -> tuple[nn.Module, object]:
    """(model, logits_fn) for a variant; patches module state, so call it once per process."""
    cfg = suites.get("full").megabyte
    if variant == "peer-noshift":
        import MEGABYTE_pytorch.megabyte as mpm

        mpm.token_shift = lambda t: t
    if variant == "ours-shift":
        from bytelm.nn import Block

        def forward(self, x, rope=None, cache=None, pos=0, rows=None, span=None):
            x = x + self.drop(self.attn(self.norm1(_token_shift(x)), rope, cache, pos, rows, span))
            return x + self.drop(self.mlp(self.norm2(_token_shift(x))))

        Block.forward = forward
    torch.manual_seed(0)
    if variant.startswith("peer"):
        return peer.build_peer(cfg, 1024), peer.peer_logits
    cfg = cfg.replace(local_context=0, local_norms=False)  # what this ablation measured: the paper's design
    m = Megabyte(cfg)
    P, DL, G = cfg.patch_size, cfg.local_dim, cfg.global_dim
    if variant == "ours-fullproj":
        m.global_to_local = nn.Linear(G, P * DL, bias=False)
        nn.init.normal_(m.global_to_local.weight, std=0.02)
        m._to_local = lambda g: m.global_to_local(g).unflatten(-1, (P, DL))
    if variant == "ours-embinit":
        nn.init.normal_(m.global_embed.weight, std=1.0)
        nn.init.normal_(m.local_embed.weight, std=1.0)
    if variant == "ours-patchproj":
        m.global_embed = nn.Embedding(256, DL)
        nn.init.normal_(m.global_embed.weight, std=0.02)
        m.patch_proj = nn.Sequential(nn.LayerNorm(P * DL), nn.Linear(P * DL, G, bias=False), nn.LayerNorm(G))
        nn.init.normal_(m.patch_proj[1].weight, std=0.02)
        m._patch_embed = lambda x, start: m.patch_proj(m.global_embed(x).reshape(x.shape[0], -1, P * DL))
    if variant == "ours-torchinit":
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()
    if variant == "ours-rmsnorm":
        def swap(mod):
            for name, child in mod.named_children():
                if isinstance(child, nn.LayerNorm):
                    setattr(mod, name, nn.RMSNorm(child.normalized_shape, eps=1e-8))
                else:
                    swap(child)

        swap(m)
    return m, lambda mm, x: mm(x)


def one(variant: str, steps: int, windows: int = 64) -> dict:
    lr_max = 4e-3 if variant == "ours-lr4e-3" else 2e-3
    train, val, _ = load_split(None)
    m, logits = build(variant)
    opt = bytelm_optimizer(m, lr_max)
    sampler = WindowSampler(train, 1024, 8, seed=1337)
    t0 = time.time()
    for i in range(steps):
        lr = lr_max * min(1, (i + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * i / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = sampler.next_batch()
        optimizer_step(m, opt, byte_loss(logits(m, x), x))
    ev = WindowSampler(val, 1024, 1, seed=2024)
    m.eval()
    with torch.no_grad():
        held_out = torch.cat([ev.next_batch() for _ in range(windows)])  # (windows, 1024)
        nats = F.cross_entropy(logits(m, held_out).flatten(0, 1), held_out.flatten(), reduction="none")
    P = suites.get("full").megabyte.patch_size
    by_pos = nats.view(windows, -1, P).mean(dim=(0, 1)) / math.log(2)  # (P,) bpb at each position in a patch
    return {"variant": variant, "lr": lr_max, "steps": steps, "val_bpb": nats.mean().item() / math.log(2),
            "bpb_by_patch_position": [round(v, 4) for v in by_pos.tolist()], "seconds": time.time() - t0}


def markdown(steps: int, rows: list[dict]) -> str:
    def cells(r):  # the first byte of a patch is predicted from the global model alone in the paper's design
        pos = r.get("bpb_by_patch_position")
        return f"{pos[0]:.3f} | {sum(pos[1:]) / len(pos[1:]):.3f}" if pos else "not measured | not measured"

    return "\n".join([f"# Ablation: val bpb after {steps} steps, same batches (one seed each)", "",
                      "| variant | val bpb | bpb of a patch's first byte | bpb of its other bytes |",
                      "|---|---|---|---|",
                      *(f"| {VARIANTS[r['variant']]} | {r['val_bpb']:.3f} | {cells(r)} |" for r in rows)]) + "\n"


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 1,024 bytes to score")
    ap.add_argument("--out", type=Path, default=RESULTS / "full", help="results folder")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # the child process
        print(json.dumps(one(args.one, args.steps, args.windows)))
        return None
    saved = args.out / "ablation.json"
    rows = json.loads(saved.read_text())["runs"] if saved.is_file() else []  # rerun variants replace their rows
    rows = [r for r in rows if r["variant"] not in args.variants and r["steps"] == args.steps]
    for v in args.variants:
        r = subprocess.run([sys.executable, "-m", "benchmarks.ablation", "--one", v, "--steps", str(args.steps),
                            "--windows", str(args.windows)],
                           capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{VARIANTS[v]}: {rows[-1]['val_bpb']:.3f}", flush=True)
    rows.sort(key=lambda r: list(VARIANTS).index(r["variant"]))
    md = markdown(args.steps, rows)
    write("ablation", {"steps": args.steps, "runs": rows}, md, args.out)
    print(md)
    return {"runs": rows}


if __name__ == "__main__":
    main()

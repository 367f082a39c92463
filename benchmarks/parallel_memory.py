"""The training state one rank holds under data parallel (DDP) and sharded data parallel (FSDP2, `fully_shard` on each
transformer block, then the root) at 1, 2, 4 and 8 ranks, for the paper presets of every model type, with AdamW and
with Muon (bytelm's default): computed from each preset's config on the meta device (bytelm.training.memory's
`state_bytes`; no model is allocated, so it runs on any machine in seconds).

    python -m benchmarks.parallel_memory [--precision bf16] [--ranks 1 2 4 8] [--presets paper-1.3b ...]

Writes benchmarks/results/parallel_memory.md. Activations are left out: per rank they are the same under both
strategies for the batch each rank runs (`bytelm train` estimates them before a run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bytelm.models import config_class, model_types
from bytelm.models.memory import skeleton
from bytelm.training.memory import STRATEGIES, state_bytes

from .common import RESULTS

OPTIMIZERS = {"adamw": "AdamW", "muon": "Muon (bytelm's default)"}
COLUMNS = ("params", "grads", "optimizer", "unsharded", "muon", "total")
HEADER = ("| strategy | ranks | params | grads | optimizer | unsharded weights (peak) | Muon Newton-Schulz (peak) "
          "| total per rank |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")


def gb(n: int) -> str:
    """Bytes in GB (10^9): one decimal from 10 GB up, two significant figures below."""
    x = n / 1e9
    return "0" if n == 0 else f"{x:.1f}" if x >= 10 else f"{x:#.2g}"


def paper_presets() -> list[tuple[str, str]]:
    """(model type, preset) of every preset named paper-*."""
    return [(mt, name) for mt in model_types() for name in config_class(mt).presets if name.startswith("paper")]


def table(config, optimizer: str, ranks: list[int], precision: str) -> tuple[str, list[dict]]:
    rows, lines = [], []
    for strategy in STRATEGIES:
        for world in ranks:
            parts = state_bytes(config, optimizer, strategy, world, precision)
            rows.append({"strategy": strategy, "ranks": world, **parts})
            name = "DDP" if strategy == "ddp" else "FSDP2"
            if strategy == "ddp" and world == 1:
                name = "one process (no DDP)"
            lines.append(f"| {name} | {world} | " + " | ".join(gb(parts[c]) for c in COLUMNS[:-1])
                         + f" | **{gb(parts['total'])}** |")
    return HEADER + "\n".join(lines) + "\n", rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                    help="the compute dtype of the weights a step materialises (bf16: bytelm's default on CUDA)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--presets", nargs="+", help="model_type:preset pairs (default: every paper-* preset)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for parallel_memory.md")
    args = ap.parse_args(argv)

    presets = [tuple(p.split(":", 1)) for p in args.presets] if args.presets else paper_presets()
    md = ("# Training state per rank: DDP vs. FSDP2\n\n"
          f"GB (10^9 bytes) per rank, computed from each preset's config on the meta device "
          f"(`bytelm.training.memory.state_bytes`), weights computed in {args.precision}. Parameters, gradients and "
          "optimizer state are fp32. DDP: every rank holds all of them, and its gradient buckets another copy of the "
          "gradients (a single process runs without DDP). FSDP2 (`fully_shard` per transformer block, then the "
          "root): each tensor's dim 0 split across the ranks as torch.chunk does, every rank's shard padded to "
          "ceil(rows / ranks) rows. AdamW: 2 moments per parameter; Muon: 1 momentum per block matrix, AdamW's 2 for "
          "the rest.\n\n"
          "Transient terms, at a step's peak: *unsharded weights*: FSDP2 all-gathers the root's parameters (kept "
          "from forward to backward) and one block at a time (the largest is counted; the backward pass also holds "
          "that block's unsharded gradients before their reduce-scatter and prefetches the next block, up to 3x the "
          "block's part); DDP in bf16: autocast's bf16 copy of every Linear weight. *Muon Newton-Schulz*: the largest "
          "block matrix's fp32 iteration (3 m n + 2 min(m, n)^2 elements: the update, the iterate and the next one, "
          "the Gram matrix and its polynomial; under FSDP2 on the rank that owns the matrix, which gathers it whole). "
          "Activations are not included: per rank they are the same under both strategies for the batch each rank "
          "runs.\n\n"
          "    python -m benchmarks.parallel_memory" + (f" --precision {args.precision}"
                                                        if args.precision != "bf16" else "") + "\n")
    payload: dict = {"precision": args.precision, "presets": {}}
    for model_type, name in presets:
        cfg = config_class(model_type).from_name(name)
        n = sum(p.numel() for p in skeleton(cfg).parameters())
        md += f"\n## {model_type} `{name}` ({n / 1e6:,.1f}M parameters)\n"
        payload["presets"][f"{model_type}:{name}"] = {}
        for optimizer, title in OPTIMIZERS.items():
            text, rows = table(cfg, optimizer, args.ranks, args.precision)
            md += f"\n### {title}\n\n{text}"
            payload["presets"][f"{model_type}:{name}"][optimizer] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parallel_memory.md").write_text(md)
    print(md)
    return payload


if __name__ == "__main__":
    main()

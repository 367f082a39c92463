"""Patches that follow the data: MEGABYTE with fixed patches (P = 8 and P = 4), SpaceByte's rule and BLT's entropy
rule (bytelm.models.patching), each trained for the same wall-clock time on the same batches of a corpus, for two or
more model-init seeds, then scored on the same held-out bytes; with the mean patch length each one chooses there.
`--speed` then measures, on the trained seed-0 models, batch-1 generation bytes/s and an engine's aggregate bytes/s
for 16 clients under random traffic.

    python -m benchmarks.patching [--corpus stdlib|cmake-help|kjv] [--seeds 0 1] [--seconds 90] [--save DIR]
    python -m benchmarks.patching --speed DIR [--corpus ...]

Shape (SHAPE below): a 0.9M-parameter MEGABYTE (global 128 x 4 layers, local 64 x 2 layers, 512-byte context), small
enough to take a few hundred steps in a CPU minute, with patch_size 8 or 4; the dynamic rules use patch_size 8 as
their longest patch. Batch 8 x 512 bytes; the recipe,
schedule, interleaving and precision are benchmarks/quality.py's (bytelm's TrainConfig: Muon + AdamW, lr 4e-3, the
local stack at 4x, warm-up 5% of the budget, cosine to 10%). Every model trains through `model(x, loss="mean")`, the
loss `bytelm train` uses, so the entropy rule's small model learns alongside.

Corpora: `stdlib` (the Python standard library's source, split by file), `cmake-help` (CMake's reStructuredText docs,
Debian's cmake-data), `kjv` (the King James Bible, 4.4 MB of English prose, from Debian's bible-kjv `bible` command;
its last 5% held out: most of Revelation's neighbours)."""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from bytelm import Megabyte, MegabyteConfig
from bytelm.data import WindowSampler, load_split
from bytelm.generation.engine import Engine, SamplingParams
from bytelm.models import get_spec

from . import suites
from .common import RESULTS, fmt_params, machine, write
from .quality import SLICE_SECONDS, Contender, bytelm_default_bf16, corpus_paths, recipe

OUT = RESULTS / "patching"
SHAPE = dict(max_seq_len=512, global_dim=128, global_layers=4, global_heads=4, local_dim=64, local_layers=2,
             local_heads=2)
VARIANTS = {  # name -> MegabyteConfig overrides of the suite's MEGABYTE
    "fixed P=8": dict(patch_size=8),
    "fixed P=4": dict(patch_size=4),
    "space (P<=8)": dict(patch_size=8, patching="space"),
    "entropy (P<=8)": dict(patch_size=8, patching="entropy"),
}
CORPORA = {"stdlib": "the Python standard library's source", "cmake-help": "CMake's documentation, reStructuredText",
           "kjv": "the King James Bible (English prose)"}


def kjv_path() -> str:
    """The King James Bible as one text file (cached), from Debian's bible-kjv."""
    path = Path("/tmp/bytelm-bench/kjv.txt")
    if not path.exists():
        try:
            text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True,
                                  timeout=600).stdout
        except FileNotFoundError:
            raise SystemExit("kjv: no `bible` command here (Debian: apt-get install bible-kjv)") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(path)


def short(corpus: str) -> str:
    """A corpus's name in file and folder names: its own, or a path's last part."""
    return corpus if corpus in CORPORA else Path(corpus).name


def model_dir(folder: Path, corpus: str, variant: str) -> Path:
    """Where a variant's seed-0 model is saved: FOLDER/CORPUS/RULE/P ("space (P<=8)" -> space/8)."""
    rule, p = variant.split(" ")
    return folder / short(corpus) / rule / p.strip("()<=P")


def paths_for(corpus: str):
    return [kjv_path()] if corpus == "kjv" else corpus_paths(corpus)


class Trainee(Contender):
    """A contender trained through the model's own loss (the entropy rule's small model learns on it too)."""

    def step_loss(self, x: torch.Tensor) -> torch.Tensor:
        with self.cast():
            return self.model(x, loss="mean")


def mean_patch_len(model: Megabyte, windows: list[torch.Tensor]) -> float:
    ends = sum(int(model.patch_ends(x).sum()) for x in windows)
    return sum(x.numel() for x in windows) / max(ends, 1)


def train(suite: suites.Suite, corpus: str, seeds: tuple[int, ...], save: Path | None) -> dict:
    train_data, val, split = load_split(paths_for(corpus))
    cfg = recipe(suite)
    bf16 = bytelm_default_bf16()
    ev = WindowSampler(val, suite.quality_seq_len, 1, seed=2024)
    windows = [ev.next_batch() for _ in range(suite.quality_eval_windows)]
    local = get_spec("megabyte").stacks["local"]
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        cs = [Trainee(name, Megabyte(replace(suite.megabyte, **kw)), lambda m, x: m(x), suite, cfg, train_data,
                      local, bf16=bf16) for name, kw in VARIANTS.items()]
        while todo := [c for c in cs if c.elapsed < suite.quality_seconds]:
            min(todo, key=lambda c: c.elapsed).train_for(min(SLICE_SECONDS, suite.quality_seconds))
        for c in cs:
            c.model.eval()
            runs.setdefault(c.name, []).append(
                {"seed": seed, "val_bpb": c.val_bpb(windows), "steps": c.steps, "train_seconds": c.elapsed,
                 "params": c.model.num_params(), "mean_patch": mean_patch_len(c.model, windows),
                 "loss_curve": c.losses})
            if save is not None and seed == seeds[0]:
                c.model.save_pretrained(model_dir(save, corpus, c.name))
    results = {}
    for name, rs in runs.items():
        b = [r["val_bpb"] for r in rs]
        results[name] = {"val_bpb": statistics.mean(b), "spread": max(b) - min(b), "val_bpb_per_seed": b,
                         "steps": round(statistics.mean(r["steps"] for r in rs)), "params": rs[0]["params"],
                         "mean_patch": statistics.mean(r["mean_patch"] for r in rs), "runs": rs}
    base = results["fixed P=8"]["val_bpb"]
    for r in results.values():
        r["vs_fixed8"] = r["val_bpb"] / base - 1
    return {"corpus": corpus, "corpus_name": CORPORA.get(corpus, corpus), "seconds_each": suite.quality_seconds,
            "seq_len": suite.quality_seq_len, "batch": suite.quality_batch, "seeds": list(seeds),
            "precision": "bf16 autocast" if bf16 else "fp32", "split": split,
            "eval_bytes": sum(x.numel() for x in windows), "machine": machine(), "results": results}


def markdown(p: dict) -> str:
    lines = [f"# Patching rules: validation bits per byte after {p['seconds_each']:,.0f} s of training each "
             f"({p['corpus_name']}; {p['eval_bytes']:,} held-out bytes)", "",
             f"Mean over {len(p['seeds'])} model-init seeds ({', '.join(map(str, p['seeds']))}); spread = max - min. "
             f"{p['precision']}, batch {p['batch']} x {p['seq_len']:,} bytes, the same batches for all.", "",
             "| patching | params | steps (mean) | mean patch (bytes) | val bpb (mean) | vs fixed P=8 | spread "
             "| per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in p["results"].items():
        per = ", ".join(f"{b:.3f}" for b in r["val_bpb_per_seed"])
        lines.append(f"| {name} | {fmt_params(r['params'])} | {r['steps']:,} | {r['mean_patch']:.2f} | "
                     f"{r['val_bpb']:.3f} | {100 * r['vs_fixed8']:+.1f}% | {r['spread']:.3f} | {per} |")
    lines += ["", p["split"] + "."]
    return "\n".join(lines) + "\n"


# --- speed of the trained models -----------------------------------------------------------------------------------
def gen_speed(model: Megabyte, prompt: bytes, n: int, repeats: int = 2) -> dict:
    """Batch-1 sampled generation of n bytes: bytes/s (median of repeats) and the global steps per byte it took."""
    rates, steps = [], []
    for r in range(repeats):
        eng = Engine(model, max_streams=1, max_len=len(prompt) + n)
        out = bytearray()
        eng.submit(prompt, SamplingParams(max_new_bytes=n, temperature=1.0, seed=r),
                   lambda o, out=out: out.extend(o.data))
        t0 = time.perf_counter()
        while eng.active or eng.queued:
            eng.step()
        rates.append(len(out) / (time.perf_counter() - t0))
        steps.append(eng.stats["global_steps"] / max(len(out), 1))
    return {"bytes_per_s": statistics.median(rates), "global_steps_per_byte": statistics.mean(steps)}


def traffic(model: Megabyte, text: bytes, clients: int = 16, per_client: int = 3, seed: int = 0) -> dict:
    """`clients` threads each sending `per_client` requests one after another (prompts of 16..256 bytes cut from
    held-out text at random, 32..224 new bytes, temperature 1), random think times of 0..50 ms, into one engine of 16
    streams: aggregate generated bytes/s over the whole run."""
    rng, half = random.Random(seed), model.config.max_seq_len // 2  # (256 for the benchmark's shape)
    plans = [[(text[(a := rng.randrange(len(text) - half)) : a + rng.randrange(16, half + 1)],
               rng.randrange(32, min(225, half)), rng.random() * 0.05) for _ in range(per_client)]
             for _ in range(clients)]
    eng = Engine(model, max_streams=clients)
    eng.start()
    total = [0]
    lock = threading.Lock()

    def client(plan):
        for prompt, n, gap in plan:
            time.sleep(gap)
            out = eng.generate(prompt, SamplingParams(max_new_bytes=n, temperature=1.0, seed=n))
            with lock:
                total[0] += len(out.data)

    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    eng.stop()
    return {"bytes_per_s": total[0] / wall, "bytes": total[0], "seconds": wall}


def speed(folder: Path, corpus: str, gen_bytes: int = 250, per_client: int = 3) -> dict:
    _, val, _ = load_split(paths_for(corpus))
    text = bytes(WindowSampler(val, 16384, 1, seed=7).next_batch()[0].tolist())  # held-out text for the prompts
    out = {}
    for name in VARIANTS:
        model = Megabyte.from_pretrained(model_dir(folder, corpus, name)).eval()
        half = model.config.max_seq_len // 2
        with torch.inference_mode():
            g = gen_speed(model, text[:half], min(gen_bytes, half - 6))
            t = traffic(model, text, per_client=per_client)
        out[name] = {"gen": g, "traffic": t}
    return {"corpus": corpus, "corpus_name": CORPORA.get(corpus, corpus), "gen_bytes": gen_bytes,
            "per_client": per_client, "threads": torch.get_num_threads(), "machine": machine(), "results": out}


def speed_markdown(p: dict) -> str:
    base = p["results"]["fixed P=8"]
    lines = [f"# Patching rules: generation speed of the trained models ({p['corpus_name']})", "",
             f"Batch 1: {p['gen_bytes']} sampled bytes after a 256-byte held-out prompt (median of 2). Traffic: 16 "
             f"clients x {p.get('per_client', 3)} requests (prompts 16..256 held-out bytes, 32..224 new bytes, "
             "temperature 1) into one "
             f"16-stream engine. {p['threads']} torch thread(s).", "",
             "| patching | global steps / byte | batch-1 bytes/s | vs fixed P=8 | 16 clients bytes/s | vs fixed P=8 |",
             "|---|---|---|---|---|---|"]
    for name, r in p["results"].items():
        g, t = r["gen"], r["traffic"]
        lines.append(f"| {name} | {g['global_steps_per_byte']:.3f} | {g['bytes_per_s']:.0f} | "
                     f"{g['bytes_per_s'] / base['gen']['bytes_per_s']:.2f}x | {t['bytes_per_s']:.0f} | "
                     f"{t['bytes_per_s'] / base['traffic']['bytes_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="full", choices=["quick", "full", "smoke"])
    ap.add_argument("--corpus", default="stdlib", help="stdlib | cmake-help | kjv | a file or folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seconds", type=float, default=90.0, help="training seconds per model")
    ap.add_argument("--save", type=Path, help="save the seed-0 models under this folder (for --speed)")
    ap.add_argument("--speed", type=Path, help="measure the speed of the models saved under this folder")
    ap.add_argument("--requests-per-client", type=int, default=3, help="--speed: each of the 16 clients' requests")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    name = short(args.corpus)
    if args.speed:
        p = speed(args.speed, args.corpus, per_client=args.requests_per_client)
        write(f"speed-{name}", p, speed_markdown(p), args.out)
        print(speed_markdown(p))
        return p
    suite = replace(suites.get(args.suite), quality_seconds=args.seconds)
    if args.suite != "smoke":
        suite = replace(suite, megabyte=MegabyteConfig(**SHAPE), quality_seq_len=SHAPE["max_seq_len"],
                        quality_eval_windows=128)
    p = train(suite, args.corpus, tuple(args.seeds), args.save)
    write(f"bpb-{name}", p, markdown(p), args.out)
    print(markdown(p))
    return p


if __name__ == "__main__":
    main()

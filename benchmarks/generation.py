"""Greedy generation speed, batch 1: bytelm MEGABYTE vs. megabyte-pytorch at the same shape, and vs. the bytelm byte
transformer with ~1/3.4 of its parameters; and the time per byte as the position grows.

    python -m benchmarks.generation --suite quick|full|smoke

Ours and the transformer run interleaved (MEGABYTE, transformer, MEGABYTE, ...), `gen_repeats` times each, and every
byte's time is kept. megabyte-pytorch recomputes a full forward over the whole prefix for every byte, so 8,192 bytes
would take hours here; it really generates the first `peer_gen_bytes` bytes (compared with ours over the same bytes),
and its per-byte step is timed at `peer_points` prefix lengths up to `gen_bytes` and integrated over all positions
(the step's time is smooth in the prefix length; the real run checks the integral over its own range).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bytelm import ByteTransformer, Megabyte
from bytelm.generation import decode

from . import peer as peer_mod
from . import suites
from .common import RESULTS, fmt_params, main_for, median, pyplot, write

BUCKETS = [(0, 1024), (1024, 4096), (4096, 8192)]


def byte_times(model, n: int) -> list[float]:
    """Seconds spent on each of n greedy bytes from an empty prompt (the first includes the prefill)."""
    x = torch.zeros(1, 0, dtype=torch.long)
    out, last = [], time.perf_counter()
    for _ in decode(model, x, n, temperature=0):
        now = time.perf_counter()
        out.append(now - last)
        last = now
    return out


def peer_byte_times(m, n: int) -> list[float]:
    out, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        out.append(now - last[0])
        last[0] = now

    peer_mod.peer_generate(m, torch.zeros(1, 0, dtype=torch.long), n, on_byte=tick)
    return out


@torch.inference_mode()
def peer_step_profile(m, n: int, points: int, repeats: int) -> tuple[list[int], list[float]]:
    """Median seconds of one peer step (a forward over the prefix + argmax) at `points` prefix lengths in [0, n)."""
    lengths = sorted({int(v) for v in np.linspace(0, n - 1, points)})
    x = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
    secs = []
    for L in lengths:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m(x[:, :L])[:, -1].argmax(-1)
            ts.append(time.perf_counter() - t0)
        secs.append(median(ts))
    return lengths, secs


def integrate(lengths: list[int], secs: list[float], n: int) -> float:
    """Total seconds for steps at prefix lengths 0..n-1, from the step time sampled at `lengths`."""
    return float(np.interp(np.arange(n), lengths, secs).sum())


def bucket_us(times: list[float]) -> dict[str, float]:
    return {f"{a}-{b}": float(np.mean(times[a:b])) * 1e6 for a, b in BUCKETS if len(times) > a}


def run(suite: suites.Suite, out_dir=RESULTS) -> dict:
    torch.manual_seed(0)
    n = suite.gen_bytes
    mb = Megabyte(suite.megabyte).eval()
    tf = ByteTransformer(suite.transformer_gen).eval()
    ours: dict[str, list[list[float]]] = {"megabyte": [], "transformer": []}
    for _ in range(suite.gen_repeats):
        ours["megabyte"].append(byte_times(mb, n))
        ours["transformer"].append(byte_times(tf, n))
    total = {k: median([sum(t) for t in v]) for k, v in ours.items()}
    per_byte = {k: np.median(np.array(v), axis=0).tolist() for k, v in ours.items()}  # (n,) median over repeats
    payload = {
        "suite": suite.name, "bytes": n, "repeats": suite.gen_repeats,
        "megabyte": {"config": suite.megabyte.to_dict(), "params": mb.num_params()},
        "transformer": {"config": suite.transformer_gen.to_dict(), "params": tf.num_params()},
        "seconds": {k: [sum(t) for t in v] for k, v in ours.items()},
        "bytes_per_s": {k: n / v for k, v in total.items()},
        "us_per_byte_by_position": {k: bucket_us(v) for k, v in per_byte.items()},
        "per_byte_median_s": per_byte,
    }
    payload["megabyte_vs_transformer"] = total["transformer"] / total["megabyte"]

    if peer_mod.available():
        torch.manual_seed(0)
        pm = peer_mod.build_peer(suite.megabyte, n).eval()
        k = suite.peer_gen_bytes
        real = [peer_byte_times(pm, k) for _ in range(max(1, suite.gen_repeats - 1))]
        lengths, secs = peer_step_profile(pm, n, suite.peer_points, repeats=3)
        peer_total_real = median([sum(t) for t in real])
        peer_total_est = integrate(lengths, secs, n)
        ours_first_k = median([sum(t[:k]) for t in ours["megabyte"]])
        payload["peer"] = {
            "package": "MEGABYTE-pytorch", "params": sum(p.numel() for p in pm.parameters()),
            "real_bytes": k, "real_seconds": [sum(t) for t in real],
            "real_integral_check_seconds": integrate(lengths, secs, k),
            "step_lengths": lengths, "step_seconds": secs, "estimated_seconds": peer_total_est,
            "bytes_per_s_real": k / peer_total_real, "bytes_per_s_estimated": n / peer_total_est,
            "us_per_byte_by_position": {f"{a}-{b}": float(np.mean(np.interp(np.arange(a, min(b, n)), lengths,
                                                                            secs))) * 1e6
                                        for a, b in BUCKETS if n > a},
        }
        payload["megabyte_vs_peer_real"] = peer_total_real / ours_first_k
        payload["megabyte_vs_peer"] = peer_total_est / total["megabyte"]
    write("generation", payload, markdown(payload), out_dir)
    plot(payload, out_dir)
    return payload


def markdown(p: dict) -> str:
    n = p["bytes"]
    mbp, tfp = p["megabyte"]["params"], p["transformer"]["params"]
    rows = [
        "| model | params | bytes/s | " + " | ".join(f"µs/byte @ {b}" for b in p["us_per_byte_by_position"]["megabyte"])
        + " |",
        "|---|---|---|" + "---|" * len(p["us_per_byte_by_position"]["megabyte"]),
    ]

    def row(name, params, bps, buckets):
        return f"| {name} | {fmt_params(params)} | {bps:,.0f} | " + " | ".join(f"{v:,.0f}" for v in buckets.values()) \
            + " |"

    rows.append(row("bytelm MEGABYTE (KV caches)", mbp, p["bytes_per_s"]["megabyte"],
                    p["us_per_byte_by_position"]["megabyte"]))
    rows.append(row("bytelm ByteTransformer (KV cache)", tfp, p["bytes_per_s"]["transformer"],
                    p["us_per_byte_by_position"]["transformer"]))
    lines = [f"# Greedy generation of {n:,} bytes, batch 1 (medians of {p['repeats']})", ""]
    if "peer" in p:
        q = p["peer"]
        rows.append(row("megabyte-pytorch (no cache)*", q["params"], q["bytes_per_s_estimated"],
                        q["us_per_byte_by_position"]))
    lines += rows + [""]
    lines.append(f"- MEGABYTE ({mbp / tfp:.1f}x the transformer's parameters) generates "
                 f"**{p['megabyte_vs_transformer']:.2f}x** as fast as the transformer.")
    if "peer" in p:
        q = p["peer"]
        lines.append(f"- bytelm MEGABYTE vs. megabyte-pytorch at the same shape: **{p['megabyte_vs_peer']:.1f}x** over "
                     f"{n:,} bytes; **{p['megabyte_vs_peer_real']:.1f}x** over the first {q['real_bytes']:,} bytes, "
                     "both really generated.")
        lines.append(f"- *megabyte-pytorch's {n:,}-byte time is its per-byte step timed at {len(q['step_lengths'])} "
                     f"prefix lengths and summed over all positions ({q['estimated_seconds']:.0f} s); over the first "
                     f"{q['real_bytes']:,} bytes that estimate gives {q['real_integral_check_seconds']:.2f} s "
                     f"where the real run took {median(q['real_seconds']):.2f} s.")
    else:
        lines.append("- megabyte-pytorch not installed (pip install -e '.[bench]'): peer not measured.")
    return "\n".join(lines) + "\n"


def plot(p: dict, out_dir) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 64
    for key, label in (("megabyte", "bytelm MEGABYTE"), ("transformer", "bytelm ByteTransformer")):
        t = np.array(p["per_byte_median_s"][key]) * 1e6
        if len(t) >= w:
            t = np.convolve(t, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(t)), t, label=f"{label} ({fmt_params(p[key]['params'])})")
    if "peer" in p:
        q = p["peer"]
        ax.plot(q["step_lengths"], np.array(q["step_seconds"]) * 1e6, "o-",
                label=f"megabyte-pytorch, no cache ({fmt_params(q['params'])})")
    ax.set_yscale("log")
    ax.set_xlabel("position of the generated byte")
    ax.set_ylabel(f"µs per byte (moving mean over {w})")
    ax.set_title("Greedy generation, batch 1: time per byte vs. position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "generation.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    return main_for("generation", __doc__, run, argv)


if __name__ == "__main__":
    main()

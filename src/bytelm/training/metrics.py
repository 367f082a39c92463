"""A run's metrics: one CSV row per log or validation interval, and a plot of them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

FIELDS = ["step", "split", "loss", "bpb", "lr", "bytes_per_s", "elapsed_s"]


def append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def truncate(path: Path, step: int) -> None:
    """Drop the rows logged after `step` (a resumed run logs them again). A file that is not a metrics log is a
    `CheckpointError` (it is not rewritten: it may be someone's data)."""
    try:
        rows = [r for r in read_rows(path) if int(r["step"]) <= step]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise CheckpointError(f"{path} is not a bytelm metrics log ({type(e).__name__}: {e}); move it aside to "
                              "resume (the run starts a new one)") from None
    if path.exists():
        path.unlink()
    for r in rows:
        append_row(path, r)


def logged_val(path: Path, step: int) -> float | None:
    """The validation loss logged at `step` (a resumed fine-tune's base score)."""
    for r in read_rows(path):
        if r["split"] == "val" and int(r["step"]) == step:
            return float(r["loss"])
    return None


def plot_metrics(out_dir: Path) -> Path | None:
    """loss.png: train and validation bits per byte against step (skipped when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    try:
        rows = read_rows(out_dir / "metrics.csv")
    except (UnicodeDecodeError, csv.Error):
        return None
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        try:
            pts = [(int(r["step"]), float(r["bpb"])) for r in rows if r["split"] == split]
        except (ValueError, TypeError):  # a hand-edited log: the picture is not worth failing a finished run for
            plt.close(fig)
            return None
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(out_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    return out_dir / "loss.png"

"""Images and audio end to end (issue 18): bytelm MEGABYTE against the byte transformer at equal wall-clock, through
the real CLI (`bytelm train`, `bytelm eval --json`, `bytelm generate`), on data every Debian machine can have offline.

    python -m benchmarks.media --suite quick|full|smoke [--out DIR] [--cache DIR] [--only images audio]

Data (prepared once, deterministically, under --cache; default: the system temp dir's bytelm-bench-media/):
- images: Fashion-MNIST (Debian's dataset-fashion-mnist): 28x28 grey, 784 bytes an image, one image one sequence;
  the training images (the suite's first N of 60,000) and the first images of the 10,000 test images, as `.npy`
  stacks bytelm reads directly.
- audio: speech synthesised with espeak-ng from King James Bible verses (Debian's bible-kjv, `bible` command):
  training clips from Genesis, test clips from Ruth (other text), six voices / speeds / pitches in turn; resampled by
  bytelm to 8 kHz mono mu-law (G.711 telephone audio: 256 values a sample as in the paper, and at 8,000 bytes a second
  the few minutes of training a shared 2-core CPU affords see a good part of it, never more than once). Debian
  alsa-utils' recordings (/usr/share/sounds/alsa) are scored too: a real recorded voice (and one noise clip) neither
  model trained on.
The smoke suite (and a machine without these packages, for the data it lacks) uses small generated images and tones.

Training: both models of a data set train AT THE SAME TIME, one thread each (OMP_NUM_THREADS=1), each for the same
`--time-budget`: on a machine other jobs share, whatever load there is then hits both alike (one after the other, a
busy minute would favour one). Each is scored on the held-out test set with `bytelm eval --json` (bits per byte,
bits per pixel / per sample, PNG / WebP / xz). For audio, bytelm's codecs skip FLAC on mu-law codes; this benchmark
adds FLAC of the 16-bit samples the codes decode to (the same information, so the same bits per sample).

Samples (temperature 1.0): 16 unconditional images from each model, and completions of test images' top halves
beside the originals (bytelm.Megabyte.generate, batched in one process); audio through `bytelm generate --out x.wav`
(0.5 s from nothing, and 0.25 s continuing 0.25 s of a test clip), plotted as waveform + spectrogram beside the clip.
Results: media.json, media.md, media-images.png, media-completions.png, media-audio.png, media-*.wav in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import bytelm
from bytelm.data import audio as audio_io
from bytelm.data.media import AudioFormat

from . import suites
from .common import RESULTS, fmt_params, pyplot, write

FASHION = Path("/usr/share/datasets/fashion-mnist")
ALSA = Path("/usr/share/sounds/alsa")
# (espeak-ng voice, words per minute, pitch 0..99): clip i is spoken by VOICES[i % 6]
VOICES = [("en-us", 160, 50), ("en-gb", 175, 40), ("en-gb-scotland", 145, 60), ("en-029", 165, 45),
          ("en-us+f3", 150, 70), ("en-gb-x-rp+m3", 185, 35)]
VERSES_PER_CLIP = {"train": 3, "test": 1}  # short test clips: the transformer scores ~2 KB/s on one thread
PAPER = {"images": "ImageNet 64x64: MEGABYTE 3.52, transformer 3.62 bpb",
         "audio": "audio (256-valued samples): MEGABYTE 3.477, transformer 3.567 bpb"}
MODELS = ("megabyte", "transformer")
NAMES = {"megabyte": "bytelm MEGABYTE", "transformer": "byte transformer"}


# ---------------------------------------------------------------- data


def _save_npy(path: Path, arr: np.ndarray) -> Path:
    """Written beside and renamed into place, so an interrupted run never leaves half a cache file."""
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return path


def read_idx(path: Path, n: int) -> np.ndarray:
    """The first n images of an IDX3 file (gzip): a 16-byte big-endian header (magic 0x803, count, rows, cols)."""
    with gzip.open(path, "rb") as f:
        magic, count, rows, cols = np.frombuffer(f.read(16), dtype=">u4")
        if magic != 0x803:
            raise SystemExit(f"{path}: not an IDX3 image file (magic {magic:#x})")
        n = min(n, int(count))
        return np.frombuffer(f.read(n * rows * cols), dtype=np.uint8).reshape(n, rows, cols)


def fashion_mnist(cache: Path, n_train: int, n_test: int) -> dict | None:
    """{'train', 'test'}: .npy stacks of Fashion-MNIST images (None when the Debian package is not installed)."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        return None
    out = {}
    for split, src, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        path = cache / f"fashion-mnist-{split}-{n}.npy"
        if not path.is_file():
            _save_npy(path, read_idx(FASHION / f"{src}-images-idx3-ubyte.gz", n))
        out[split] = path
    return out


def synthetic_images(cache: Path, n_train: int, n_test: int, size: int = 8) -> dict:
    """Small grey images, each a random-brightness rectangle on a gradient: structure a model can learn in seconds."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ramp = np.linspace(0, 96, size, dtype=np.float64)
        imgs = np.broadcast_to(ramp, (n, size, size)).copy()
        for img in imgs:
            y, x = rng.integers(0, size // 2, 2)
            img[y:y + size // 2, x:x + size // 2] = rng.integers(128, 256)
        out[split] = _save_npy(cache / f"synthetic-{split}-{n}.npy", imgs.astype(np.uint8))
    return out


def verses(spec: str) -> list[str]:
    """Verse texts of a `bible` range (Debian's bible-kjv), without their references."""
    text = subprocess.run(["bible", "-f", spec], capture_output=True, text=True, check=True).stdout
    # -f wraps long verses over several lines; a verse starts with its reference (Ge1:1, Ru2:3)
    out: list[str] = []
    for line in text.splitlines():
        head, _, rest = line.strip().partition(" ")
        if head[:1].isalpha() and ":" in head and head[-1].isdigit():
            out.append(rest)
        elif out and line.strip():
            out[-1] += " " + line.strip()
    return out


def speech(cache: Path, n_train: int, n_test: int) -> dict | None:
    """{'train', 'test'}: folders of WAV clips spoken by espeak-ng (None without espeak-ng or bible-kjv)."""
    if not (shutil.which("espeak-ng") and shutil.which("bible")):
        return None
    out = {}
    for split, spec, n in (("train", "Ge1:1-11:32", n_train), ("test", "Ru1:1-4:22", n_test)):
        folder = cache / f"speech-{split}-{n}"
        if not (folder / "done").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            texts = verses(spec)
            for i in range(n):
                voice, wpm, pitch = VOICES[i % len(VOICES)]
                k = VERSES_PER_CLIP[split]
                text = " ".join(texts[i * k:(i + 1) * k])
                subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w",
                                str(folder / f"clip-{i:03d}.wav"), text], check=True, capture_output=True)
            (folder / "done").write_text("")
        out[split] = folder
    return out


def synthetic_audio(cache: Path, n_train: int, n_test: int, rate: int = 8000) -> dict:
    """Clips of 0.2 s of a tone sweeping from a random pitch, under a decaying envelope (8 kHz, 16-bit WAV)."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    out = {}
    t = np.arange(int(0.2 * rate)) / rate
    for split, n in (("train", n_train), ("test", n_test)):
        folder = cache / f"tones-{split}-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            f0 = rng.uniform(200, 800)
            x = 0.5 * np.exp(-4 * t) * np.sin(2 * np.pi * (f0 + 300 * t) * t)
            sf.write(folder / f"tone-{i:03d}.wav", x, rate, subtype="PCM_16")
        out[split] = folder
    return out


# ---------------------------------------------------------------- the CLI


def _env(threads: int) -> dict:
    """A child's environment: this bytelm (not another install) on its path, `threads` compute threads."""
    src = str(Path(bytelm.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def cli_all(jobs: list[list[str]], logs: list[Path], in_process: bool) -> list[str]:
    """Run `bytelm ARGV` for each job, all at once (one thread each), and return each one's stdout. In-process and
    one by one for the smoke suite, where starting interpreters would cost more than the work."""
    if in_process:
        from bytelm.cli import main as bytelm_main

        return _in_process(bytelm_main, jobs, logs)
    procs = []
    for argv, log in zip(jobs, logs, strict=True):
        with open(log, "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "bytelm.cli", *argv], stdout=subprocess.PIPE,
                                          stderr=err, text=True, env=_env(1)))
    outs = [p.communicate()[0] for p in procs]
    for argv, log, p, text in zip(jobs, logs, procs, outs, strict=True):
        with open(log, "a") as f:  # bytelm's progress lines go to stdout: kept after its stderr
            f.write(text)
        if p.returncode:
            raise SystemExit(f"bytelm {' '.join(argv)} exited {p.returncode}; see {log}")
    return outs


def _in_process(bytelm_main, jobs: list[list[str]], logs: list[Path]) -> list[str]:
    outs = []
    for argv, log in zip(jobs, logs, strict=True):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), open(log, "w") as err, contextlib.redirect_stderr(err):
            rc = bytelm_main(argv)
        if rc:
            raise SystemExit(f"bytelm {' '.join(argv)} exited {rc}; see {log}")
        outs.append(buf.getvalue())
    return outs


def _overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def train_args(kind: str, model: str, suite: suites.Suite, data: Path, run_dir: Path) -> list[str]:
    """`bytelm train` for one model on one data set; every setting but the model the same for both models."""
    if kind == "images":
        shape = {**(suite.media_image_mb if model == "megabyte" else suite.media_tf)}
        seq, batch, extra = None, suite.media_image_batch, []
    else:
        shape = {**(suite.media_audio_mb if model == "megabyte" else suite.media_tf)}
        seq, batch = suite.media_audio_seq_len, suite.media_audio_batch
        extra = ["--sample-rate", str(suite.media_sample_rate), "--sample-format", "mulaw", "--seq-len", str(seq)]
    if seq:
        shape["max_seq_len"] = seq
    return ["train", "--model-type", model, "--preset", "tiny", "--model", *_overrides(shape), "--data", str(data),
            *extra, "--batch-size", str(batch), "--time-budget", f"{suite.media_seconds:g}",
            "--warmup-steps", str(suite.media_warmup_steps), "--seed", "0", "--eval-interval", "200",
            "--eval-batches", "4", "--save-interval", "1000000", "--log-interval", "20", "--sample-bytes", "0",
            "--out-dir", str(run_dir)]


def eval_args(run_dir: Path, data: Path, codecs: bool) -> list[str]:
    return ["eval", str(run_dir), "--data", str(data), "--json", *([] if codecs else ["--no-codecs"])]


def trained(run_dir: Path) -> dict:
    """Steps, seconds and bytes a run trained (its last checkpoint's trainer state) and its model's parameters."""
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    model = bytelm.load(str(run_dir))
    return {"steps": state["step"], "train_seconds": round(state["elapsed"], 1), "bytes_seen": state["bytes_seen"],
            "params": model.num_params(), "config": model.config.to_dict()}


# ---------------------------------------------------------------- one data set


def run_pair(kind: str, suite: suites.Suite, data: dict, work: Path, out: Path, extra_eval: dict) -> dict:
    """Train both models on data['train'] at once, score them on data['test'] (and extra_eval's sets), sample."""
    runs = {m: work / f"{kind}-{m}" for m in MODELS}
    for r in runs.values():
        shutil.rmtree(r, ignore_errors=True)  # a fresh run each time, never a resumed one
    smoke = not suite.media_real
    load = {"before_training": os.getloadavg()}
    t0 = time.perf_counter()
    cli_all([train_args(kind, m, suite, data["train"], runs[m]) for m in MODELS],
            [work / f"{kind}-{m}-train.log" for m in MODELS], smoke)
    load["after_training"] = os.getloadavg()
    result: dict = {"train_wall_seconds": round(time.perf_counter() - t0, 1), "models": {}}
    for name, path in {"test": data["test"], **extra_eval}.items():
        outs = cli_all([eval_args(runs[m], path, codecs=(m == MODELS[0])) for m in MODELS],
                       [work / f"{kind}-{m}-eval-{name}.log" for m in MODELS], smoke)
        scores = [json.loads(o.strip().splitlines()[-1]) for o in outs]
        result.setdefault("eval", {})[name] = {"data": scores[0]["data"], "codecs_bpb": scores[0]["codecs_bpb"],
                                               **{m: s for m, s in zip(MODELS, scores, strict=True)}}
    load["after_eval"] = os.getloadavg()
    for m in MODELS:
        result["models"][m] = trained(runs[m])
    result["load_average_1_5_15"] = load
    sample = image_samples if kind == "images" else audio_samples
    result["samples"] = sample(runs, data, suite, work, out)
    return result


# ---------------------------------------------------------------- samples


def _grid(imgs: np.ndarray, cols: int) -> np.ndarray:
    """(N, H, W) -> one (rows*(H+1)-1, cols*(W+1)-1) picture with 1-pixel white gaps."""
    n, h, w = imgs.shape
    rows = -(-n // cols)
    g = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        g[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
    return g


def image_samples(runs: dict, data: dict, suite: suites.Suite, work: Path, out: Path) -> dict:
    """16 images from nothing per model, and completions of 6 test images' top halves, as two PNG figures."""
    import torch

    test = np.load(data["test"])
    n, h, w = test.shape[:3]
    side = 4 if suite.media_real else 2
    k = min(6, n)
    prompt = torch.from_numpy(test[:k].reshape(k, -1)[:, : (h // 2) * w].astype(np.int64))
    made, completions = {}, {}
    for m in MODELS:
        model = bytelm.load(str(runs[m])).eval()
        empty = torch.zeros(side * side, 0, dtype=torch.long)
        made[m] = model.generate(empty, h * w, temperature=1.0, seed=0).numpy().astype(np.uint8).reshape(-1, h, w)
        completions[m] = model.generate(prompt, h * w - prompt.shape[1], temperature=1.0, seed=0
                                        ).numpy().astype(np.uint8).reshape(-1, h, w)
    plt = pyplot()
    if plt is None:
        return {}
    real = test[: side * side, ..., 0] if test.ndim == 4 else test[: side * side]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, (title, imgs) in zip(axes, [("test images (real)", real), (NAMES["megabyte"], made["megabyte"]),
                                        (NAMES["transformer"], made["transformer"])], strict=True):
        ax.imshow(_grid(imgs, side), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle("Generated from nothing, temperature 1.0", fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.84, wspace=0.08)  # tight_layout: seconds, here
    fig.savefig(out / "media-images.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(3, 1, figsize=(1.2 * k + 1.5, 4.6))
    rows = [("original", test[:k].reshape(k, h, w)), (NAMES["megabyte"], completions["megabyte"]),
            (NAMES["transformer"], completions["transformer"])]
    for ax, (title, imgs) in zip(axes, rows, strict=True):
        ax.imshow(_grid(imgs, k), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.axhline(h // 2 - 0.5, color="red", lw=0.8)  # above the line: the prompt; below: generated
        ax.set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Test images' top halves completed (below the red line), temperature 1.0", fontsize=10)
    fig.subplots_adjust(left=0.2, right=0.98, bottom=0.02, top=0.9, hspace=0.15)
    fig.savefig(out / "media-completions.png", dpi=110)
    plt.close(fig)
    return {"unconditional": "media-images.png", "completions": "media-completions.png"}


def audio_samples(runs: dict, data: dict, suite: suites.Suite, work: Path, out: Path) -> dict:
    """Through `bytelm generate`: 0.5 s from nothing and 0.25 s after 0.25 s of a test clip, per model; WAVs kept
    in `out` and plotted (waveform + spectrogram) under the real clip."""
    fmt = AudioFormat(suite.media_sample_rate, "mulaw")
    clip = audio_io.read_audio(sorted(Path(data["test"]).glob("*.wav"))[0], fmt)
    span = suite.media_audio_seq_len * 15 // 16  # what fits in the context, whole samples
    start = min(len(clip) - span, fmt.sample_rate // 4)  # past the clip's leading silence
    real = clip[start:start + span]
    (out / "media-real.wav").write_bytes(audio_io.bytes_to_wav(real, fmt))
    (work / "prompt.wav").write_bytes(audio_io.bytes_to_wav(real[: span // 2], fmt))
    jobs, logs, files = [], [], {}
    for m in MODELS:
        for what, extra in (("unconditional", ["--max-bytes", str(span)]),
                            ("continuation", ["--prompt-audio", str(work / "prompt.wav"), "--max-bytes",
                                              str(span - span // 2)])):
            files[(m, what)] = out / f"media-{m}-{what}.wav"
            jobs.append(["generate", str(runs[m]), "--temperature", "1.0", "--seed", "0", *extra,
                         "--out", str(files[(m, what)])])
            logs.append(work / f"audio-{m}-{what}-generate.log")
    cli_all(jobs, logs, not suite.media_real)
    files = {f"{m}-{what}": f.name for (m, what), f in files.items()}
    return {**({"plot": "media-audio.png"} if plot_audio(out, fmt) else {}), "real": "media-real.wav", **files}


def plot_audio(out: Path, fmt: AudioFormat) -> bool:
    """media-audio.png from the WAVs in `out`: waveform and spectrogram of the real clip and of each generated one
    (`python -c "from benchmarks import media; media.plot_audio(...)"` redraws it without training again)."""
    plt = pyplot()
    if plt is None:
        return False
    real = audio_io.read_audio(out / "media-real.wav", fmt)
    rows = [("real test clip", real)] + [(f"{NAMES[m]}, {what}", audio_io.read_audio(
        out / f"media-{m}-{what}.wav", fmt)) for m in MODELS for what in ("unconditional", "continuation")]
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 1.6 * len(rows)), squeeze=False)
    dither = np.random.default_rng(0).standard_normal(len(real)) * 1e-5
    for (title, codes), (wave_ax, spec_ax) in zip(rows, axes, strict=True):
        x = audio_io.decode(codes, fmt) / 32768.0
        t = np.arange(len(x)) / fmt.sample_rate
        wave_ax.plot(t, x, lw=0.4)
        wave_ax.set_ylim(-1, 1)
        wave_ax.set_title(title, fontsize=9, loc="left")
        nfft = min(256, 1 << max(4, (len(x) // 4).bit_length() - 1))  # short (smoke) clips: a shorter window
        # silence (exact zeros) is -inf dB: a dither at -100 dB keeps it on the colour scale
        spec_ax.specgram(x + dither[: len(x)], Fs=fmt.sample_rate, NFFT=nfft, noverlap=nfft * 3 // 4, cmap="magma")
        if "continuation" in title or title.startswith("real"):
            for ax in (wave_ax, spec_ax):
                ax.axvline(len(real) // 2 / fmt.sample_rate, color="red", lw=0.8)  # the prompt ends here
    axes[-1, 0].set_xlabel("seconds")
    axes[-1, 1].set_xlabel("seconds (spectrogram, Hz up)")
    fig.suptitle(f"{fmt.describe()}; temperature 1.0; red line: where the continuation's prompt ends", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.92, hspace=0.6, wspace=0.12)
    fig.savefig(out / "media-audio.png", dpi=80)
    plt.close(fig)
    return True


def flac_bits_per_sample(folder: Path, fmt: AudioFormat) -> float:
    """FLAC (level 8) of the 16-bit samples each clip's mu-law codes decode to: bits per sample (= per mu-law byte)."""
    import soundfile as sf

    bits = samples = 0
    for f in sorted(folder.glob("*.wav")):
        pcm = audio_io.decode(audio_io.read_audio(f, fmt), fmt)
        buf = io.BytesIO()
        sf.write(buf, pcm, fmt.sample_rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
        bits, samples = bits + 8 * len(buf.getvalue()), samples + len(pcm)
    return bits / samples


# ---------------------------------------------------------------- the benchmark


def run(suite: suites.Suite, out_dir: Path = RESULTS, cache: Path | None = None,
        only: tuple[str, ...] = ("images", "audio")) -> dict:
    import torch

    threads = torch.get_num_threads()
    if not suite.media_real:  # smoke: in this process, one thread as each CLI process (two spin on a busy machine)
        torch.set_num_threads(1)
    try:
        return _run(suite, out_dir, cache, only)
    finally:
        torch.set_num_threads(threads)


def _run(suite: suites.Suite, out_dir: Path, cache: Path | None, only: tuple[str, ...]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cache or Path(tempfile.gettempdir()) / "bytelm-bench-media"
    work = cache / f"runs-{suite.name}"
    work.mkdir(parents=True, exist_ok=True)
    payload: dict = {"suite": suite.name, "seconds_each": suite.media_seconds, "threads_each": 1,
                     "cpu_count": os.cpu_count(), "paper": PAPER, "datasets": {}, "skipped": {}}
    if "images" in only:
        data = (fashion_mnist(cache, suite.media_train_images, suite.media_test_images) if suite.media_real else
                synthetic_images(cache, suite.media_train_images, suite.media_test_images))
        if data is None:
            payload["skipped"]["images"] = f"no {FASHION} (Debian: apt-get install dataset-fashion-mnist)"
        else:
            res = run_pair("images", suite, data, work, out_dir, {})
            res["data"] = "Fashion-MNIST, 28x28 grey" if suite.media_real else "generated 8x8 grey images"
            res["train_images"], res["test_images"] = suite.media_train_images, suite.media_test_images
            payload["datasets"]["images"] = res
    if "audio" in only:
        data = (speech(cache, suite.media_train_clips, suite.media_test_clips) if suite.media_real else
                synthetic_audio(cache, suite.media_train_clips, suite.media_test_clips))
        if data is None:
            payload["skipped"]["audio"] = "no espeak-ng or bible (Debian: apt-get install espeak-ng bible-kjv)"
        else:
            extra = {"alsa": ALSA} if suite.media_real and ALSA.is_dir() else {}
            res = run_pair("audio", suite, data, work, out_dir, extra)
            fmt = AudioFormat(suite.media_sample_rate, "mulaw")
            for name, folder in {"test": data["test"], **extra}.items():
                res["eval"][name]["codecs_bpb"]["flac (16-bit decode)"] = flac_bits_per_sample(Path(folder), fmt)
            res["data"] = ("espeak-ng speech (KJV Genesis / Ruth), 8 kHz mu-law" if suite.media_real else
                           "generated tones, 8 kHz mu-law")
            res["train_clips"], res["test_clips"] = suite.media_train_clips, suite.media_test_clips
            payload["datasets"]["audio"] = res
    write("media", payload, markdown(payload), out_dir)
    return payload


def _unit(kind: str, s: dict) -> str:
    return f"{s['bits_per_pixel']:.3f}" if kind == "images" else f"{s['bits_per_sample']:.3f}"


def markdown(p: dict) -> str:
    lines = [f"# Images and audio: MEGABYTE vs. the byte transformer, {p['seconds_each']:,.0f} s of training each",
             "", f"Suite `{p['suite']}`. Both models of a data set trained at the same time, one thread each "
             f"({p['cpu_count']} CPUs), through `bytelm train --time-budget`; scored by `bytelm eval --json` on "
             "held-out data. Lower is better.", ""]
    for kind, res in p["datasets"].items():
        unit = "bits/pixel" if kind == "images" else "bits/sample"
        lines += [f"## {kind}: {res['data']}", "",
                  f"| model | params | steps | bytes seen | test bits/byte | {unit} |", "|---|---|---|---|---|---|"]
        for name, ev in res["eval"].items():
            if name != "test":
                continue
            for m in MODELS:
                t = res["models"][m]
                lines.append(f"| {NAMES[m]} | {fmt_params(t['params'])} | {t['steps']:,} | {t['bytes_seen']:,} | "
                             f"**{ev[m]['bpb']:.3f}** | {_unit(kind, ev[m])} |")
            for codec, bpb in ev["codecs_bpb"].items():  # one byte a pixel (grey) or a sample (mu-law)
                lines.append(f"| {codec} (lossless codec) | - | - | - | {bpb:.3f} | {bpb:.3f} |")
        lines += ["", f"Test data: {res['eval']['test']['data']}."]
        for name, ev in res["eval"].items():
            if name != "test":
                lines += ["", f"Also scored: {ev['data']}: " + "; ".join(
                    f"{NAMES[m]} {ev[m]['bpb']:.3f}" for m in MODELS) + "; " + "; ".join(
                    f"{c} {b:.3f}" for c, b in ev["codecs_bpb"].items()) + " bits/byte."]
        load = res["load_average_1_5_15"]
        lines += ["", f"Paper, for scale (far larger models and data): {p['paper'][kind]}. Load average (1, 5, 15 "
                  f"min) before training {', '.join(f'{x:.1f}' for x in load['before_training'])}, after "
                  f"{', '.join(f'{x:.1f}' for x in load['after_training'])}.", ""]
    for kind, why in p["skipped"].items():
        lines += [f"## {kind}: skipped", "", why, ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="quick", choices=["quick", "full", "smoke"])
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/media)")
    ap.add_argument("--cache", type=Path, help="prepared data and training runs (default: a temp-dir folder)")
    ap.add_argument("--only", nargs="+", choices=["images", "audio"], default=["images", "audio"])
    ap.add_argument("--seconds", type=float, help="training seconds per model (default: the suite's)")
    args = ap.parse_args(argv)
    suite = suites.get(args.suite)
    if args.seconds:
        suite = replace(suite, media_seconds=args.seconds)
    out = args.out or RESULTS / "media"
    payload = run(suite, out, args.cache, tuple(args.only))
    print((out / "media.md").read_text())
    return payload


if __name__ == "__main__":
    main()

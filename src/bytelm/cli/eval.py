"""`bytelm eval MODEL`: bits per byte over files, folders, or the split a run trained on."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, UsageError
from ..io import read_json_object
from .models import ModelArg, load
from .options import parse


@dataclass
class EvalArgs:
    """Bits per byte = summed nats over every byte / (ln 2 * bytes); byte 0 counts. Without --data: the validation
    split of the data the run (with --adapter: the fine-tune) trained on, or of the embedded corpus. Files named
    with --data are scored whole unless --split picks a part of the split they make. An image model scores whole
    images (also in bits per pixel), an audio model its clips (also in bits per sample), read as it was trained;
    beside each, what lossless codecs (PNG, WebP, FLAC, xz) make of the same bytes."""

    model: ModelArg = None
    """a model folder, a training run folder or a hub id (org/name); with --adapter: its base (default: the base
    the adapter records)"""
    adapter: str | None = None  # a LoRA adapter folder or fine-tune run folder (or hub id) to use on top of MODEL
    data: list[str] | None = None  # files or folders to score
    split: Literal["val", "train", "all"] | None = None
    """which part of the data's train/validation split to score (default: all of --data; else val)"""
    mode: Literal["chunked", "sliding", "strided"] = "chunked"
    """chunked: consecutive windows; sliding: overlapping windows scoring their last --stride bytes; strided: the
    paper's strided inference (MEGABYTE)"""
    seq_len: int | None = None  # window length (default: the model's max_seq_len)
    stride: int | None = None  # for sliding/strided: bytes scored per window (default: seq_len/2)
    batch_size: int = 8  # windows per forward pass
    max_bytes: int | None = None  # score only the first N bytes
    image_fit: Literal["none", "resize", "crop", "pad"] | None = None
    """images of another size than the model's: none (an error) | resize | crop | pad (default: the run's)"""
    codecs: bool = True  # also the bits per byte of lossless codecs on the same bytes (the first 64 MiB)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    json: bool = False  # print the result as JSON


def _run_data_settings(model_path: Path):
    """The data settings of the run a model came from, when it came from one (so eval uses the same split): a
    bytelm.training.config.DataSection (imported here: `bytelm eval --help` must not import the training layer)."""
    from ..training.config import DataSection, TrainConfig

    for candidate in (model_path / "run.json", model_path.parent.parent / "run.json"):
        if candidate.is_file():
            settings = read_json_object(candidate, UsageError).get("train", {})
            if not isinstance(settings, dict):
                raise UsageError(f"{candidate}: \"train\" must be a JSON object of the run's settings")
            try:  # a training run's or a fine-tune's, flat or sectioned
                return TrainConfig.section_of(settings, "data")
            except ConfigError as e:
                raise UsageError(f"{candidate}: {e}") from None
    return DataSection()


def main(argv: list[str]) -> int:
    from ..data import ByteDataset, ImageFormat, load_split
    from ..evaluation import codec_bpb, evaluate, per_unit

    args = parse(EvalArgs, argv, "bytelm eval")
    model = load(args.model, args.device, args.adapter)
    media = model.config.media
    if isinstance(media, ImageFormat) and args.seq_len not in (None, media.seq_len):
        raise UsageError(f"an image model scores whole images: --seq-len must be {media.seq_len:,} (one "
                         f"{media.height}x{media.width}x{media.channels} image) or left out")
    run = _run_data_settings(Path(args.adapter or args.model))
    data = args.data or run.paths or None
    split = args.split or ("all" if args.data else "val")
    train, val, info = load_split(data, run.val_fraction, None if media else run.separator, media,
                                  args.image_fit or run.image_fit, convert=True)
    if split == "all":
        dataset = ByteDataset(train.parts + val.parts, separator=train.separator, name="all", media=media)
        info = f"{', '.join(map(str, data)) if data else 'the embedded corpus'} ({dataset.describe()})"
    else:
        dataset = val if split == "val" else train
    seq_len = args.seq_len
    if seq_len is None and media is not None:  # one image; for sound, whole samples
        seq_len = media.seq_len if isinstance(media, ImageFormat) else \
            model.config.max_seq_len - model.config.max_seq_len % media.bytes_per_sample
    res = evaluate(model, dataset, seq_len=seq_len, mode=args.mode, stride=args.stride,
                   batch_size=args.batch_size, max_bytes=args.max_bytes, progress=sys.stderr.isatty())
    units = per_unit(res.bpb, media)
    codecs = codec_bpb(dataset, res.bytes) if args.codecs else {}
    if args.json:
        print(json.dumps({**dataclasses.asdict(res), **units, "codecs_bpb": codecs, "modality": model.config.modality,
                          "split": split, "data": info}))
        return 0
    print(f"{split} split of: {info}" if split != "all" else f"all of: {info}")
    print(f"bits per byte: {res.bpb:.4f} over {res.bytes:,} bytes ({res.mode}, seq_len {res.seq_len}, "
          f"stride {res.stride}, {res.seconds:.1f}s)")
    if "bits_per_pixel" in units:
        print(f"bits per pixel: {units['bits_per_pixel']:.4f} ({media.channels} byte(s) per pixel)")
    if "bits_per_sample" in units:
        print(f"bits per sample: {units['bits_per_sample']:.4f} ({units['kbit_per_s']:.1f} kbit/s at "
              f"{media.sample_rate:,} Hz)")
    if codecs:
        print("lossless codecs on the same bytes (bits per byte): " +
              " | ".join(f"{name} {bpb:.4f}" for name, bpb in codecs.items()))
    return 0

"""Images to raw pixel bytes and back, through Pillow (and NumPy for `.npy` stacks).

An image becomes H x W x C bytes, row-major with a pixel's channels together (bytelm.data.media). Its size is the
user's (`--image-size HxW[xC]`) or the first image's; an image of another size is an error unless `fit` says how to
bring it to size (Pillow's ImageOps, Lanczos resampling):

    none     sizes must match (the default: nothing is changed without being asked)
    resize   scaled to the size, aspect ratio not kept
    crop     scaled to cover the size, then its centre cut out (ImageOps.fit)
    pad      scaled to fit inside the size, then padded with black (ImageOps.pad)

Channels are converted (grey <-> RGB, alpha added or dropped) only when the size states them; otherwise an image with
other channels than the first is an error, as is a 16-bit or floating-point image (8 bits per channel only).
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError, PromptRowsError
from .media import IMAGE_FITS, ImageFormat

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # channels -> Pillow mode
# Pillow modes that hold 8 bits per channel and the channels they convert to without loss
_EIGHT_BIT = {"1": 1, "L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "La": 2,
              "RGBa": 4}


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - Pillow is a dependency of bytelm[media]
        raise DataError("images need Pillow: pip install 'bytelm[media]'") from None
    return Image, ImageOps


def _channels(img, where: str) -> int:
    if img.mode == "P":  # a palette: RGB, or RGBA where it has a transparent entry
        return 4 if "transparency" in img.info else 3
    if img.mode not in _EIGHT_BIT:
        raise DataError(f"{where} is a {img.mode!r} image (16-bit or floating point): bytelm models 8 bits per "
                        "channel; convert it to 8-bit grey or RGB first")
    return _EIGHT_BIT[img.mode]


def open_image(path: Path):
    """A decoded Pillow image (every pixel read now, so a truncated or corrupt file fails here, naming itself)."""
    Image, _ = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {str(e) or type(e).__name__}") from None


def _npy(path: Path) -> np.ndarray:
    """A `.npy` stack of images: uint8 (N, H, W) or (N, H, W, C), memory-mapped, never unpickled."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read image array {path}: {e}") from None
    if arr.dtype != np.uint8:
        raise DataError(f"{path} holds {arr.dtype} values: an image array must be uint8 (0..255)")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or not 1 <= arr.shape[3] <= 4 or 0 in arr.shape:
        raise DataError(f"{path} has shape {arr.shape}: an image array must be (N, H, W) or (N, H, W, C) with "
                        "1..4 channels")
    return arr


def probe(path: Path) -> tuple[int, int, int]:
    """(height, width, channels) of an image file or of a `.npy` stack's images, reading as little as it can."""
    if path.suffix.lower() == ".npy":
        return tuple(_npy(path).shape[1:])  # type: ignore[return-value]
    img = open_image(path)
    return img.height, img.width, _channels(img, str(path))


def to_format(img, fmt: ImageFormat, fit: str, where: str, convert: bool = False) -> np.ndarray:
    """A Pillow image (or a uint8 (H, W, C) array) as fmt's pixels (H, W, C), brought to size by `fit`; its channels
    converted to fmt's when `convert` (the user stated them), else they must be fmt's already."""
    Image, ImageOps = _pil()
    if isinstance(img, np.ndarray):
        h, w, c = img.shape
        if (h, w, c) == (fmt.height, fmt.width, fmt.channels):
            return np.ascontiguousarray(img)
        img = Image.fromarray(np.ascontiguousarray(img[..., 0] if c == 1 else img), MODES[c])
    c = _channels(img, where)
    if c != fmt.channels and not convert:
        raise DataError(f"{where} has {c} channel(s) where the images have {fmt.channels}: state the channels to "
                        f"convert every image to with --image-size {fmt.height}x{fmt.width}xC")
    img = img.convert(MODES[fmt.channels]) if img.mode != MODES[fmt.channels] else img
    size = (fmt.width, fmt.height)  # Pillow's order
    if img.size != size:
        if fit == "none":
            raise DataError(f"{where} is {img.height}x{img.width}, not {fmt.height}x{fmt.width} like the other "
                            "images: state the size with --image-size HxW and how to reach it with --image-fit "
                            "resize|crop|pad")
        if fit not in IMAGE_FITS:
            raise DataError(f"image fit must be one of {', '.join(IMAGE_FITS)}, got {fit!r}")
        lanczos = Image.Resampling.LANCZOS
        img = (img.resize(size, lanczos) if fit == "resize" else ImageOps.fit(img, size, lanczos) if fit == "crop"
               else ImageOps.pad(img, size, lanczos))
    return np.asarray(img, dtype=np.uint8).reshape(fmt.height, fmt.width, fmt.channels)


def read_images(path: Path, fmt: ImageFormat, fit: str, convert: bool = False) -> list[np.ndarray]:
    """The images of one file (a `.npy` stack holds many) as flat arrays of fmt.seq_len bytes each."""
    if path.suffix.lower() == ".npy":
        arr = _npy(path)
        if arr.shape[1:] == (fmt.height, fmt.width, fmt.channels):  # the common case: views, nothing decoded
            flat = arr.reshape(len(arr), -1)
            return [flat[i] for i in range(len(flat))]
        return [to_format(a, fmt, fit, f"{path}[{i}]", convert).reshape(-1) for i, a in enumerate(arr)]
    return [to_format(open_image(path), fmt, fit, str(path), convert).reshape(-1)]


def to_pil(data: bytes | np.ndarray, fmt: ImageFormat):
    """fmt.seq_len bytes of pixels -> a Pillow image of fmt's size and mode."""
    Image, _ = _pil()
    arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data, np.uint8)
    if arr.size != fmt.seq_len:
        raise DataError(f"{arr.size:,} bytes are not one {fmt.height}x{fmt.width}x{fmt.channels} image "
                        f"({fmt.seq_len:,} bytes)")
    arr = arr.reshape(fmt.height, fmt.width, fmt.channels)
    return Image.fromarray(arr[..., 0] if fmt.channels == 1 else arr, MODES[fmt.channels])


def pixels_to_png(data: bytes | np.ndarray, fmt: ImageFormat, optimize: bool = False) -> bytes:
    """fmt.seq_len bytes of pixels -> the bytes of a PNG file (lossless: reading it back gives the same pixels)."""
    buf = io.BytesIO()
    to_pil(data, fmt).save(buf, format="PNG", optimize=optimize)
    return buf.getvalue()


def png_to_pixels(png: bytes, fmt: ImageFormat, fit: str = "none", where: str = "the image") -> bytes:
    """An image file's bytes (PNG or any format Pillow reads) -> fmt's pixel bytes (channels converted to fmt's)."""
    Image, _ = _pil()
    try:
        img = Image.open(io.BytesIO(png))
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read {where}: {str(e) or type(e).__name__}") from None
    return to_format(img, fmt, fit, where, convert=True).tobytes()


def top_rows(path: Path, fmt: ImageFormat, rows: int | None = None) -> bytes:
    """The pixels of the top `rows` rows of an image file, as an image model's prompt: the image must be as wide as
    the model's and no taller (channels are converted). rows: default all of a shorter image, half of a full one."""
    return _top_rows(open_image(path), fmt, rows, str(path), "--prompt-rows")


def top_rows_of(blob: bytes, fmt: ImageFormat, rows: int | None = None, where: str = "the image",
                rows_name: str = "rows") -> bytes:
    """`top_rows` of an image file's bytes (PNG or any format Pillow reads), e.g. one a client sent; `rows_name`
    is what its errors call `rows`."""
    Image, _ = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(blob))
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))  # Pillow names the file object
        raise DataError(f"cannot read {where}: {why or type(e).__name__}") from None
    return _top_rows(img, fmt, rows, where, rows_name)


def _top_rows(img, fmt: ImageFormat, rows: int | None, where: str, rows_name: str) -> bytes:
    if img.width != fmt.width or img.height > fmt.height:
        raise DataError(f"{where} is {img.height} rows of {img.width} pixels: a prompt image for this model "
                        f"({fmt.height} rows of {fmt.width} pixels) must be {fmt.width} pixels wide and at most "
                        f"{fmt.height} rows tall (its top rows)")
    if rows is None:
        rows = img.height if img.height < fmt.height else fmt.height // 2
    if not 1 <= rows <= min(img.height, fmt.height - 1):
        raise PromptRowsError(f"{rows_name} must be in 1..{min(img.height, fmt.height - 1)} for {where} "
                              f"({img.height} rows; the model's images have {fmt.height}), got {rows}")
    _channels(img, where)  # 16-bit and float images refused, naming the file
    pixels = np.asarray(img.convert(MODES[fmt.channels]), dtype=np.uint8).reshape(img.height, fmt.width, -1)
    return pixels[:rows].tobytes()

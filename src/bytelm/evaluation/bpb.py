"""Bits per byte of a model over a whole input: every byte scored exactly once, byte 0 of the input included.

    bpb = (sum over all bytes of -ln p(x_t | context)) / (ln 2 * number of bytes)

A model predicts every byte of its input window, the first one from nothing (see `bytelm.model`), so the only
question is which context each byte is scored with. Three modes answer it:

chunked (default)
    Consecutive non-overlapping windows of `seq_len` bytes (the last one shorter), each scored from its own start.
    One forward pass per byte: the cheapest, but a byte near a window start sees little context.

sliding
    Windows of `seq_len` bytes whose starts advance by `stride` bytes (Press et al., 2020; the "sliding window" of
    MEGABYTE's evaluations). The first window scores all its bytes; every later one scores only the bytes after the
    previous window's end (its last `stride` bytes; the final window may be shorter and score fewer). So every byte
    after the first `seq_len` is scored with at least `seq_len - stride` bytes of context. `stride == seq_len` is
    exactly `chunked`. Costs about seq_len / stride forward passes per byte.

strided (MEGABYTE only)
    The paper's strided inference (Yu et al. 2023, arXiv 2305.07185, section 2.3.3), quoted:

        "We observed empirically that the per-token loss within each patch would increase towards the end of the
        patch, as the prediction relies more on the weaker Local model. To alleviate this issue, we propose strided
        inference, in which we predict the sequence with two forward passes of the full model, whose inputs are
        offset by p/2 positions from each other. We then combine the first p/2 positions in each patch for our
        predictions to predict the complete sequence. Similarly to sliding window techniques (Press et al., 2020),
        this approach doubles the cost of inference but improves results."

    Here it runs inside the sliding-window schedule above (so inputs of any length work). With patch size P and
    o = P // 2, each window x[s:e] is run twice: pass A on x[s:e] and pass B on x[s+o:e], whose patch boundaries sit
    o bytes later. A byte at window offset j (= t - s) sits at in-patch position j % P in pass A and (j - o) % P in
    pass B, and is scored from the pass where that position is in the first half of the patch: from A when
    j % P < o, from B otherwise. One exception: a byte in pass A's first patch (j < P) is always scored from A,
    because in B it would also sit in the first patch, where the global model contributes only its pad, and with o
    bytes less context (bytelm has no pad byte with which to shift B's input to the right instead). For odd P pass B
    supplies ceil(P/2) positions of each patch and pass A floor(P/2). With P = 1 (o = 0) strided inference is
    sliding inference. A model without patches (ByteTransformer) is a P = 1 model: `mode="strided"` falls back to
    sliding and the result says so (`mode == "sliding"`, with a `note`).

Images and sounds (a bounded `ByteDataset`: bytelm.data.dataset) are scored one image or clip at a time: windows
never cross from one into the next, and the first byte of each is scored from nothing, as it was trained. An image
model's window is one whole image.

Memory stays bounded whatever the input size: windows are read lazily from a `ByteDataset` (memory-mapped files),
`batch_size` windows of equal length at a time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import ByteDataset
from ..devices import check_memory
from ..errors import EvaluationError
from ..models.config import VOCAB_SIZE

MODES = ("chunked", "sliding", "strided")


@dataclass
class EvalResult:
    bpb: float  # bits per byte: nats / (ln 2 * bytes)
    nats: float  # summed cross-entropy over every scored byte
    bytes: int  # bytes scored (= the input's length, or max_bytes)
    mode: str  # the mode actually run ("sliding" where "strided" fell back)
    seq_len: int
    stride: int
    seconds: float
    note: str = ""  # set when the requested mode was changed (strided on a model without patches)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        s = (f"{self.bpb:.4f} bits/byte over {self.bytes:,} bytes ({self.mode}, seq_len={self.seq_len}, "
             f"stride={self.stride}, {self.seconds:.1f}s)")
        return f"{s}; {self.note}" if self.note else s


def _as_dataset(data) -> ByteDataset:
    if isinstance(data, ByteDataset):
        return data
    if isinstance(data, str):
        raise TypeError("data must be bytes, not str: encode it first, e.g. text.encode('utf-8')")
    if isinstance(data, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(data, dtype=np.uint8)
    elif isinstance(data, (np.ndarray, torch.Tensor)):
        arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else data
        if arr.ndim != 1:
            raise ValueError(f"data must be a 1-D array of byte values, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"data must hold integer byte values 0..255, got dtype {arr.dtype}")
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= VOCAB_SIZE):
                raise ValueError(f"byte values must be in 0..255, got min {int(arr.min())}, max {int(arr.max())}")
            arr = arr.astype(np.uint8)
    else:
        raise TypeError(f"data must be a ByteDataset, bytes or a 1-D uint8 array, got {type(data).__name__}")
    return ByteDataset([arr], name="data")


def _windows(n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, score_from): the window is bytes [start, end), it scores bytes [score_from, end)."""
    begin = prev_end = 0
    while prev_end < n:
        end = min(begin + seq_len, n)
        yield begin, end, prev_end
        prev_end, begin = end, begin + stride


def _bounded_windows(ds: ByteDataset, n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """`_windows` inside each part of a bounded dataset (an image, a clip) in turn, up to byte n: no window crosses
    into the next part, and each part's first byte is scored from nothing, as it was trained."""
    for start, end in zip(ds.offsets[:-1].tolist(), ds.offsets[1:].tolist(), strict=True):
        if start >= n:
            return
        for s, e, f in _windows(min(end, n) - start, seq_len, stride):
            yield start + s, start + e, start + f


def _batches(windows: Iterator[tuple[int, int, int]], batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows grouped `batch_size` at a time, each group of one window length."""
    batch: list[tuple[int, int, int]] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _byte_nats(model, x: torch.Tensor) -> torch.Tensor:
    """Per-byte cross-entropy in nats (B, T), float32."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), x.reshape(-1), reduction="none").view(x.shape)


def evaluate(model, data, seq_len: int | None = None, mode: str = "chunked", stride: int | None = None,
             batch_size: int = 8, max_bytes: int | None = None, progress: bool = False) -> EvalResult:
    """Bits per byte of `model` over all of `data` (a ByteDataset, bytes, or a 1-D uint8 array).

    seq_len: window length (default: the model's max_seq_len). stride: how far windows advance in the sliding and
    strided modes (default seq_len // 2; must be in 1..seq_len); chunked takes no stride other than seq_len.
    max_bytes: evaluate only the first max_bytes bytes. Runs without gradients in eval mode (the model's training
    mode is restored afterwards), on the model's device. See the module docstring for the exact modes.
    """
    if mode not in MODES:
        raise EvaluationError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    max_len = model.config.max_seq_len
    seq_len = max_len if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= max_len:
        raise EvaluationError(f"seq_len must be in 1..max_seq_len={max_len} of this model, got {seq_len!r}")
    if mode == "chunked":
        if stride is not None and stride != seq_len:
            raise EvaluationError(f"chunked windows do not overlap (stride = seq_len = {seq_len}); got stride="
                                  f"{stride}: use mode='sliding' for overlapping windows")
        stride = seq_len
    elif stride is None:
        stride = max(1, seq_len // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= seq_len:
        raise EvaluationError(f"stride must be in 1..seq_len={seq_len}, got {stride!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise EvaluationError(f"max_bytes must be >= 1 (or None for all of the data), got {max_bytes!r}")
    ds = _as_dataset(data)
    n = len(ds) if max_bytes is None else min(len(ds), max_bytes)
    if n == 0:
        raise EvaluationError(f"{ds.name} is empty (0 bytes): nothing to evaluate")
    if ds.bounded and seq_len % ds.align:
        raise EvaluationError(f"seq_len {seq_len} is not a whole number of samples ({ds.align} bytes each)")
    if ds.bounded and stride % ds.align:
        raise EvaluationError(f"stride {stride} is not a whole number of samples ({ds.align} bytes each)")

    note = ""
    P = getattr(model.config, "patch_size", 1)
    o = P // 2
    if mode == "strided" and o == 0:
        mode = "sliding"
        note = (f"strided inference needs patches of 2 or more bytes; this {type(model).__name__} has "
                f"{'patch size 1' if hasattr(model.config, 'patch_size') else 'none'}, so it is sliding inference")
    strided = mode == "strided"

    device = model.device
    # a floor of what a batch holds at once: its logits and their log-softmax in fp32 (the activations come and go
    # layer by layer); the batch is at most the number of windows
    rows = min(batch_size, -(-max(n - seq_len, 0) // stride) + 1)
    logits = 2 * rows * seq_len * VOCAB_SIZE * 4
    check_memory(logits, device, "this evaluation", [(f"logits of {rows:,} windows x {seq_len:,} bytes {{}}", logits)],
                 "lower --batch-size")
    # float64 accumulation; MPS has no float64, so accumulate on the CPU there
    acc = torch.zeros((), dtype=torch.float64, device="cpu" if device.type == "mps" else device)
    t0 = time.perf_counter()
    # inference mode turns dropout off without touching model.training (see bytelm.nn.dropout_active)
    with torch.inference_mode(), tqdm(total=n, unit="B", unit_scale=True, disable=not progress,
                                      desc=f"eval {mode}") as bar:
        windows = _bounded_windows(ds, n, seq_len, stride) if ds.bounded else _windows(n, seq_len, stride)
        for batch in _batches(windows, batch_size):
            length = batch[0][1] - batch[0][0]
            x = torch.from_numpy(np.stack([ds.read(s, length) for s, _, _ in batch])).to(device).long()
            nats = _byte_nats(model, x)  # pass A
            j = torch.arange(length, device=device)
            if strided and length > P:  # pass B, inputs offset by o; only bytes j >= P can come from it
                use_b = ((j >= P) & (j % P >= o))[o:]
                nats[:, o:] = torch.where(use_b, _byte_nats(model, x[:, o:]), nats[:, o:])
            score_from = torch.tensor([f - s for s, _, f in batch], device=device)
            scored = j[None, :] >= score_from[:, None]
            acc += (nats * scored).to(device=acc.device, dtype=torch.float64).sum()
            bar.update(sum(e - f for _, e, f in batch))
    total = float(acc)
    if not math.isfinite(total):  # a number that looks like a score and is not one
        raise EvaluationError(f"the model's loss over these {n:,} bytes is {total} (not finite): its weights or "
                              "outputs are broken (NaN or inf)")
    return EvalResult(bpb=total / (math.log(2) * n), nats=total, bytes=n, mode=mode, seq_len=seq_len, stride=stride,
                      seconds=time.perf_counter() - t0, note=note)

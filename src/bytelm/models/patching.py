"""Where MEGABYTE's patches end: the rules of `MegabyteConfig.patching`, each causal, so that decoding can cache.

A rule marks `end[t]`: the patch ends with byte t, and byte t + 1 starts the next one. It may read bytes x_0..x_t only
(and the small entropy model's outputs over them), so that whether byte t + 1 opens a new patch, and so whether the
global model runs before it is predicted, is known once byte t is: the global model's output for a patch has seen every
earlier patch and nothing of its own.

    fixed    t % P == P - 1: MEGABYTE's patches (Yu et al. 2023)
    space    after the first "spacelike" byte of a run: not [0-9A-Za-z], not a UTF-8 continuation byte (0x80-0xBF)
             (SpaceByte, Slagle 2024, arXiv 2404.14408, kjslag/spacebyte): a word and the space after it
    entropy  where the next-byte entropy H_t of a small byte model rises by more than `patch_threshold` nats over
             H_{t-1}: byte t + 1 is hard to predict (BLT's "monotonic" rule, Pagnoni et al. 2024, facebookresearch/blt,
             data/patcher.py); the small model trains alongside, on its own next-byte loss

Every dynamic rule also ends a patch that reached P = `patch_size` bytes, so a patch fits the global model's P slots
and the local model's window; a patch is 1..P bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import KVCache, Step, TransformerStack
from .config import VOCAB_SIZE


def _spacelike_table() -> torch.Tensor:
    t = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    for lo, hi in ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("a"), ord("z")), (0x80, 0xBF)):
        t[lo : hi + 1] = False
    return t


SPACELIKE = _spacelike_table()  # (256,) SpaceByte's `spacelike` per byte value


def spacelike(x: torch.Tensor) -> torch.Tensor:
    """Bytes (any shape; -1: before the sequence, not spacelike) -> bool of the same shape."""
    return SPACELIKE.to(x.device)[x.clamp(min=0)] & (x >= 0)


def space_ends(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """SpaceByte's rule: x (n, T) bytes, prev (n,) the byte before each row's x_0 (-1: none) -> (n, T) bool."""
    s = spacelike(torch.cat((prev[:, None], x), dim=1))  # (n, T + 1)
    return s[:, 1:] & ~s[:, :-1]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Next-byte entropy in nats (..., 256) -> (...), in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_ends(h: torch.Tensor, prev: torch.Tensor, threshold: float) -> torch.Tensor:
    """BLT's monotonic rule: entropies h (n, T), prev (n,) each row's entropy before h[:, 0] (+inf: none) -> (n, T)."""
    return (h - torch.cat((prev[:, None], h[:, :-1]), dim=1)) > threshold


def cut(natural: torch.Tensor, P: int) -> torch.Tensor:
    """The rule's ends `natural` (n, T), x_0 starting a patch, plus an end wherever a patch reaches P bytes. Between
    two natural ends the forced ones fall every P bytes from the first, so this is one pass of cumulative maxima, not
    a loop over bytes."""
    n, T = natural.shape
    t = torch.arange(T, device=natural.device)
    # where the segment holding t starts: just after the last natural end before t (or at x_0)
    after_end = torch.where(F.pad(natural[:, :-1], (1, 0), value=False), t, 0)
    seg_start = after_end.cummax(dim=1).values  # (n, T)
    return natural | ((t - seg_start + 1) % P == 0)


def layout(ends: torch.Tensor, T: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch structure of bytes whose patches end at `ends` (n, T): each byte's patch index pid (n, T), its offset in
    that patch off (n, T), and each byte's patch's first position start (n, T). Byte 0 starts patch 0."""
    n, T = ends.shape
    t = torch.arange(T, device=ends.device)
    starts = F.pad(ends[:, :-1], (1, 0), value=True)  # (n, T) byte t starts a patch
    pid = starts.long().cumsum(1) - 1
    start = torch.where(starts, t, 0).cummax(dim=1).values
    return pid, t - start, start


class EntropyModel(nn.Module):
    """The `entropy` rule's small byte model: logits[:, t] predict x_{t+1} from x_0..x_t (rotary positions, causal).
    It learns alongside the MEGABYTE on its own next-byte loss; its entropies only place patch borders, so no gradient
    reaches it through them."""

    def __init__(self, dim: int, layers: int, heads: int, max_len: int, bias: bool, rope_base: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, dim)
        self.stack = TransformerStack(dim, layers, heads, 4.0, bias, 0.0, max_len, True, rope_base)
        self.head = nn.Linear(dim, VOCAB_SIZE, bias=False)

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, step: Step | None = None
                ) -> torch.Tensor:
        return self.head(self.stack(self.embed(x), caches, step))

    def loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-byte next-byte loss (B, T - 1) in nats of logits (B, T, 256) over bytes x (B, T)."""
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none"
                               ).view(x.shape[0], -1)

"""Where one cached call's inputs go: the typed step every decoding layer takes.

A decoding state holds B rows of KV caches; one call feeds T inputs to each of n of those rows, each row starting
at its own position (a continuous batch: rows joined at different times). `Step` says which rows and where, with the
positions as device tensors (gpt-fast's `input_pos`, nanochat's `cache_seqlens`), so every layer has one code path:

    rows   (n,)  long, device   the state rows the n inputs belong to
    pos    (n,)  long, device   each row's position of its first input; input i of row j sits at pos[j] + i
    span         int            keys attended: cache positions 0..span-1 (a static shape when compiled)
    dense        bool           rows are exactly 0..n-1: caches are read as views, not gathered
    at     (n,)  tuple of ints  the same positions on the host, where the caller's control flow needs them
    slots  (n,)  tuple of ints  the same rows on the host
    lens   (n,)  tuple of ints  real inputs per row (the rest is right padding); None: all T

The scheduler (bytelm.generation.engine) builds one per model call from the counts it keeps anyway, so nothing is
read back from the device. A model derives its stacks' steps from it (MEGABYTE: patch positions for the global model,
window positions for the local one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, eq=False)
class Step:
    rows: torch.Tensor
    pos: torch.Tensor
    span: int
    dense: bool = False
    at: tuple[int, ...] = ()
    slots: tuple[int, ...] = ()
    lens: tuple[int, ...] | None = None

    @classmethod
    def make(cls, rows: list[int], at: list[int], span: int, device, lens: list[int] | None = None) -> Step:
        """A step from host lists: `rows` of the state, each row's first position `at`, `span` keys attended."""
        dense = rows == list(range(len(rows)))
        return cls(torch.tensor(rows, dtype=torch.long, device=device),
                   torch.tensor(at, dtype=torch.long, device=device), span, dense, tuple(at), tuple(rows),
                   None if lens is None else tuple(lens))

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    def moved(self, at: list[int], span: int, lens: list[int] | None = None) -> Step:
        """The same rows at other positions (a model's stack counts positions its own way)."""
        return replace(self, pos=torch.tensor(at, dtype=torch.long, device=self.rows.device), span=span,
                       at=tuple(at), lens=None if lens is None else tuple(lens))

    def select(self, js: list[int]) -> Step:
        """Inputs js of this step (rows, positions and lengths kept)."""
        if js == list(range(self.n)):
            return self
        idx = torch.tensor(js, dtype=torch.long, device=self.rows.device)
        slots = tuple(self.slots[j] for j in js)
        return replace(self, rows=self.rows[idx], pos=self.pos[idx], dense=slots == tuple(range(len(js))),
                       at=tuple(self.at[j] for j in js), slots=slots,
                       lens=None if self.lens is None else tuple(self.lens[j] for j in js))

    def mask(self, where: torch.Tensor) -> torch.Tensor | None:
        """(n, 1, T, span): key j visible to the input at position where[i, t] iff j <= it; None where no key needs
        hiding (every row's inputs fill the span from 0, or sit at its end): then attention is plain causal."""
        T = where.shape[1]
        if self.at and all(a + T == self.span for a in self.at) and (T == 1 or T == self.span):
            return None
        return (torch.arange(self.span, device=where.device) <= where[:, :, None])[:, None]

    def positions(self, T: int, limit: int) -> torch.Tensor:
        """(n, T): the position of every input. Padding inputs (past a row's `lens`) may run past the `limit`
        positions of a cache or a position table: they are kept at the last one (a KV cache's spare position)."""
        where = self.pos[:, None] + torch.arange(T, device=self.pos.device)
        return where if self.lens is None else where.clamp(max=limit - 1)

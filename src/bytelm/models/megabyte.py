"""MEGABYTE (Yu et al. 2023, arXiv 2305.07185, section 2), with the local model's cross-patch context.

Shapes: B batch, T bytes, P patch size, K = ceil(T / P) patches, D_G per-byte global width, G = P * D_G the global
model's width, D_L the local model's width, W = `local_context`, L = max(W, 1) + P - 1 local positions.

    patch embedder   h_embed[t] = E_global[x_t] (+ E_pos[t])                               (B, T, D_G)
                     global input k = E_global_pad for k = 0, else bytes of patch k-1 concatenated  (B, K, G)
    global model     transformer over the K patch vectors                                  (B, K, G)
    local model      bytes x_{kP-W} .. x_{kP+P-2} of patch k's window, embedded         (B*K, L, D_L)
                     (+ at the last P positions: W_GL(global out k, slice p), p = 0..P-1)
                     transformer over each patch's window, all patches at once         (B*K, L, D_L)
                     logits of the last P positions over the 256 byte values             (B, T, 256)

`local_context` W = 0 is the paper's local model exactly: its window is [pad, x_{kP} .. x_{kP+P-2}], so a patch's
first byte is predicted from the global model alone. W > 0 is the paper's own remedy (section 2, "cross-patch
attention"): the window starts W bytes into the previous patch, so every byte, a patch's first too, is predicted
by a local model that has read the bytes right before it; the global contribution is added at the patch's own
positions, and with `context_global` at the earlier window positions too, each byte x_t getting the contribution
for predicting x_{t+1} that it gets in its own patch's window (global output of a patch < k: still causal). With
`local_norms` the byte embeddings and the global contribution are each layer-normalised
before they are added, so neither swamps the other whatever their scales (bytelm's default; see the README's
"Differences from the paper" for the measurements behind both).

Dynamic patching (`patching` = space | entropy; bytelm.models.patching): patch k is bytes s_k .. s_{k+1} - 1, 1..P of
them, ending where a causal rule says; its bytes fill P slots of the patch vector (empty slots: zero vectors), its
window is x_{s_k-W} .. x_{s_k+P-2}, and only its own bytes' outputs are read: (B, K, G) and (B*K, L, D_L) as above,
K = the most patches in a row. The state then keeps each row's patch so far, and a decode step runs the global model
for the rows whose patch the rule just ended.

Causality: the global model sees patches < k when predicting patch k, and window position i (byte x_{kP-W+i})
predicts x_{kP-W+i+1}: logits[:, t] depends on x[:, :t] only, and byte 0 is predicted from the pads alone. Decoding
runs the global model once per patch; the local window is refilled from the last W bytes at each patch boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Dropout, KVCache, Step, TransformerStack, init_weights
from .base import ByteLM
from .config import VOCAB_SIZE, MegabyteConfig
from .loss import byte_loss, chunked_byte_loss
from .patching import EntropyModel, cut, entropy, entropy_ends, layout, space_ends
from .registry import ModelSpec, register


@dataclass
class MegabyteState:
    """Decoding state of B rows: both models' KV caches and each row's current patch. The global cache holds one entry
    per patch, the local cache the current patch's window only (rewritten from position 0 at every new patch). Where
    each row is comes with every call (`Step.at`, the byte positions its scheduler counts); with fixed patches that says
    where its patch is too, and the state keeps no position. Dynamic patches follow the bytes, so there the state keeps
    each row's patch length so far and its count of patches."""

    global_kv: list[KVCache]
    local_kv: list[KVCache]
    patch: torch.Tensor  # (B, P) bytes of the current patch so far
    recent: torch.Tensor  # (B, max(W, 1)) the last bytes before the current position (-1: before the sequence)
    ctx: torch.Tensor  # (B, C, D_L) global contributions to window positions L-C.. (C = P, or L with context_global)
    global_steps: int = 0  # batched global-model steps run (a serving metric)
    # dynamic patching only (the patch structure follows the bytes, so the state keeps it): per slot, the current
    # patch's bytes so far and the patches completed before it; `recent` holds the bytes before the patch's start
    plen: list[int] | None = None
    npatch: list[int] | None = None
    entropy_kv: list[KVCache] | None = None  # the entropy rule's small model's caches
    prev_h: torch.Tensor | None = None  # (B,) its entropy after each row's last byte


class Megabyte(ByteLM):
    config_class = MegabyteConfig
    chunked_stacks = ("local_model",)  # the chunked loss runs the local model chunk by chunk

    def __init__(self, config: MegabyteConfig) -> None:
        super().__init__(config)
        c = config
        P, D_G, G, D_L = c.patch_size, c.byte_dim, c.global_dim, c.local_dim
        W = c.local_context
        self.window = max(W, 1) + P - 1  # L: local positions per patch
        self.first = self.window - P  # the window position whose output predicts the patch's first byte
        self.ctx_from = 0 if c.context_global else self.first  # the first window position given a global contribution
        rope = c.pos_emb == "rope"
        self.global_embed = nn.Embedding(VOCAB_SIZE, D_G)
        # learned: per-byte positions (the paper); rope: rotary over patch index inside the global model
        self.global_pos = None if rope else nn.Embedding(c.max_seq_len, D_G)
        self.global_pad = nn.Parameter(torch.zeros(G))
        self.global_model = TransformerStack(G, c.global_layers, c.global_heads, c.mlp_ratio, c.bias, c.dropout,
                                             c.max_patches, rope, c.rope_base)
        self.global_to_local = nn.Linear(D_G, D_L, bias=c.bias)  # W^GL, applied to each of the P slices
        self.local_embed = nn.Embedding(VOCAB_SIZE, D_L)
        self.local_pos = None if rope else nn.Embedding(self.window, D_L)
        self.local_pad = nn.Parameter(torch.zeros(D_L))  # a position before the sequence (W = 0: every p = 0)
        if c.local_norms:
            self.local_byte_norm = nn.LayerNorm(D_L, bias=c.bias)
            self.local_ctx_norm = nn.LayerNorm(D_L, bias=c.bias)
        self.local_model = TransformerStack(D_L, c.local_layers, c.local_heads, c.mlp_ratio, c.bias, c.dropout,
                                            self.window, rope, c.rope_base)
        self.lm_head = nn.Linear(D_L, VOCAB_SIZE, bias=False)
        if c.patching == "entropy":
            self.entropy_model = EntropyModel(c.entropy_dim, c.entropy_layers, max(1, c.entropy_dim // 32),
                                              c.max_seq_len, c.bias, c.rope_base)
        self.drop = Dropout(c.dropout)
        init_weights(self, max(c.global_layers, c.local_layers), c.init)

    # --- pieces shared by training and decoding ----------------------------------------------------------------
    def _patch_embed(self, x: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """Bytes (B, n*P) at byte positions `where` (B, n*P) (None: 0..n*P-1) -> n patch vectors (B, n, G)."""
        B, n = x.shape[0], x.shape[1] // self.config.patch_size
        h = self.global_embed(x)  # (B, n*P, D_G)
        if self.global_pos is not None:
            h = h + self.global_pos(torch.arange(x.shape[1], device=x.device) if where is None else where)
        return h.reshape(B, n, self.config.global_dim)

    def _to_local(self, g_out: torch.Tensor) -> torch.Tensor:
        """Global outputs (..., G) -> per-position local contributions (..., P, D_L)."""
        ctx = self.global_to_local(g_out.unflatten(-1, (self.config.patch_size, self.config.byte_dim)))
        return self.local_ctx_norm(ctx) if self.config.local_norms else ctx

    def _local_in(self, idx: torch.Tensor, ctx: torch.Tensor, start: int) -> torch.Tensor:
        """Window positions start..start+n-1 of each patch: their bytes idx (N, n) (-1: the pad) embedded, plus
        the global contributions ctx (N, L - ctx_from, D_L) of positions ctx_from..L-1.  -> (N, n, D_L)"""
        n = idx.shape[1]
        h = self.local_embed(idx.clamp(min=0))  # (N, n, D_L)
        if start < max(self.config.local_context, 1):  # only these positions can lie before the sequence
            h = torch.where((idx < 0)[..., None], self.local_pad.to(h.dtype), h)
        if self.local_pos is not None:
            h = h + self.local_pos(torch.arange(start, start + n, device=h.device))
        if self.config.local_norms:
            h = self.local_byte_norm(h)
        lo = max(start, self.ctx_from)  # the first of these positions that gets a global contribution
        if lo >= start + n:
            return h
        c = ctx[:, lo - self.ctx_from : start + n - self.ctx_from]
        return c + h if lo == start else torch.cat((h[:, : lo - start], h[:, lo - start :] + c), dim=1)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """Bytes (B, K*P) -> every patch's window of byte indices (B*K, L), -1 before the sequence (and, in the
        paper's design, at each window's first position)."""
        W = self.config.local_context
        Wp, P = max(W, 1), self.config.patch_size
        win = F.pad(x, (Wp, 0), value=-1).unfold(1, Wp + P - 1, P)  # (B, K, L): x_{kP-Wp} .. x_{kP+P-2}
        if W == 0:
            win = win.clone()
            win[..., 0] = -1  # the paper: a learned pad, not the previous patch's last byte
        return win.reshape(-1, win.shape[-1])

    def _ctx_windows(self, ctx: torch.Tensor) -> torch.Tensor:
        """Global contributions of every patch (B, K, P, D_L) -> those of each window's positions ctx_from..L-1
        (B*K, L - ctx_from, D_L): the position holding byte x_t gets the one for predicting x_{t+1}."""
        B, K, P, D = ctx.shape
        if not self.config.context_global:
            return ctx.reshape(B * K, P, D)
        flat = F.pad(ctx.reshape(B, K * P, D), (0, 0, self.first, 0))  # zeros before the sequence
        return flat.unfold(1, self.window, P).permute(0, 1, 3, 2).reshape(B * K, self.window, D)

    # --- training / scoring -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, loss: str | None = None) -> torch.Tensor:
        """Logits (B, T, 256); with `loss` a reduction (mean, sum, none), the loss in nats instead (`byte_loss` of
        the logits), chunk by chunk of patches where `loss_chunk_bytes` is set: the global model runs over every
        patch, then the local model, the head and the cross-entropy over one chunk of patches at a time, each chunk
        recomputed in the backward pass. Nothing local is ever held for more than one chunk."""
        if not torch.compiler.is_compiling():
            self.check_input(x)
        x = x.long()
        if self.config.dynamic:
            return self._dynamic_forward(x, loss)
        B, T = x.shape
        P, G = self.config.patch_size, self.config.global_dim
        K = -(-T // P)
        xp = F.pad(x, (0, K * P - T)) if K * P != T else x  # the last patch padded: causality keeps it out
        # global: pad patch, then patches 0..K-2 (the last patch is never input: nothing after it is predicted)
        g_in = torch.cat((self.global_pad.expand(B, 1, G), self._patch_embed(xp[:, : (K - 1) * P])), dim=1)
        g_out = self.global_model(self.drop(g_in))  # (B, K, G)
        win = self._windows(xp)  # (B*K, L) byte indices: no grad, 8 bytes a position
        if loss is not None and self.loss_chunk_bytes is not None:
            def chunk(i: int, j: int) -> torch.Tensor:  # per-byte losses (B, m) of the real bytes of patches i..j-1
                logits = self._local_logits(g_out, win.view(B, K, -1)[:, i:j].flatten(0, 1), i, j)
                return byte_loss(logits, xp[:, i * P : j * P], "none").view(B, -1)[:, : T - i * P]

            step = max(1, self.loss_chunk_bytes // (B * P))  # patches per chunk
            return chunked_byte_loss(chunk, K, step, B * T, loss, self.recompute)
        logits = self._local_logits(g_out, win, 0, K)[:, :T]  # (B, T, 256)
        return logits if loss is None else byte_loss(logits, x, loss)

    def _local_logits(self, g_out: torch.Tensor, win: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The local model over patches i..j-1 of every row: their windows win (B*n, L), n = j - i, and the global
        outputs g_out (B, K, G) of all patches -> logits (B, n*P, 256) of their bytes."""
        B, n = g_out.shape[0], j - i
        # with context_global a window's first positions take the contributions of earlier patches: enough of them
        # (`back`) that every position of windows i..j-1 gets its own; windows before i are made and dropped
        back = -(-self.first // self.config.patch_size) if self.config.context_global else 0
        lo = max(i - back, 0)
        ctx = self._ctx_windows(self._to_local(g_out[:, lo:j]))  # (B*(j-lo), P or L, D_L)
        ctx = ctx.unflatten(0, (B, j - lo))[:, i - lo :].flatten(0, 1)  # (B*n, P or L, D_L)
        h = self._local_in(win, ctx, 0)  # (B*n, L, D_L)
        l_out = self.local_model(self.drop(h))[:, self.first :]  # (B*n, P, D_L): the last P outputs predict the patch
        return self.lm_head(l_out).view(B, n * self.config.patch_size, VOCAB_SIZE)

    # --- incremental decoding: global model once per patch, local model once per byte ----------------------------
    # Every call takes a Step of byte positions (`step.at`: where each row's input starts). The global model's
    # positions are patch indices (position j holds patch j - 1, position 0 the pad), the local model's are window
    # positions (0..first: the bytes before the patch, first + 1 + i: the patch's byte i).
    @property
    def prefill_align(self) -> int:
        # a fixed-patch chunk resumes at a patch border (the global model's inputs are patches); a dynamic one anywhere
        return 1 if self.config.dynamic else self.config.patch_size

    @property
    def decode_period(self) -> int:
        return 1 if self.config.dynamic else self.config.patch_size  # the global model runs once a patch

    def new_state(self, batch: int, max_len: int) -> MegabyteState:
        c, dev, dt = self.config, self.device, self.dtype
        self.check_state_memory(batch, max_len)
        # dynamic: a patch may be one byte, so up to max_len patches (global position 0 is the pad)
        patches = max_len + 1 if c.dynamic else -(-max_len // c.patch_size)
        return MegabyteState(
            global_kv=self.global_model.new_caches(batch, patches, dev, dt),
            local_kv=self.local_model.new_caches(batch, self.window, dev, dt),
            patch=torch.full((batch, c.patch_size), -1 if c.dynamic else 0, dtype=torch.long, device=dev),
            recent=torch.full((batch, max(c.local_context, 1)), -1, dtype=torch.long, device=dev),
            ctx=torch.zeros(batch, self.window - self.ctx_from, c.local_dim, device=dev, dtype=dt),
            plen=[0] * batch if c.dynamic else None,
            npatch=[0] * batch if c.dynamic else None,
            entropy_kv=(self.entropy_model.stack.new_caches(batch, max_len, dev, dt)
                        if c.patching == "entropy" else None),
            prev_h=torch.full((batch,), math.inf, device=dev) if c.patching == "entropy" else None,
        )

    def _window_in(self, idx: torch.Tensor, ctx: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Local inputs while decoding: bytes idx (n, T) (-1: the pad) at window positions `where` (n, T), plus their
        global contributions from the rows' ctx (n, C, D_L).  -> (n, T, D_L)"""
        h = self.local_embed(idx.clamp(min=0))
        h = torch.where((idx < 0)[..., None], self.local_pad.to(h.dtype), h)
        if self.local_pos is not None:
            h = h + self.local_pos(where)
        if self.config.local_norms:
            h = self.local_byte_norm(h)
        at = (where - self.ctx_from).clamp(min=0)[..., None].expand(-1, -1, ctx.shape[-1])
        return h + torch.where((where >= self.ctx_from)[..., None], ctx.gather(1, at), 0)

    def _local_logits_at(self, idx: torch.Tensor, ctx: torch.Tensor, s: MegabyteState, step: Step) -> torch.Tensor:
        """The local model on bytes idx (n, T) at window positions from `step.pos`; logits (n, 256) after each row's
        last real input."""
        n, T = idx.shape
        h = self._window_in(idx, ctx, step.positions(T, self.window))
        out = self.local_model(h, s.local_kv, step)  # (n, T, D_L)
        last = torch.tensor([m - 1 for m in step.lens], device=idx.device) if step.lens else None
        return self.lm_head(out[:, -1] if last is None else out[torch.arange(n, device=idx.device), last])

    def _new_ctx(self, g_out: torch.Tensor, prior: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The current window's global contributions (n, C, D_L) after row j's global model ran `counts[j]`
        positions (outputs g_out (n, m, G), right padded), `prior` (n, C, D_L) being the contributions before
        them: the last C of prior + every output's P contributions, in order."""
        C, P = prior.shape[1], self.config.patch_size
        flat = torch.cat((prior, self._to_local(g_out).flatten(1, 2)), dim=1)  # (n, C + m*P, D_L)
        ends = torch.tensor([C + c * P for c in counts], device=flat.device)
        at = (ends[:, None] - C + torch.arange(C, device=flat.device))[..., None].expand(-1, -1, flat.shape[-1])
        return flat.gather(1, at)

    def _global_prefill(self, e: torch.Tensor, fresh: torch.Tensor, g_at: list[int], counts: list[int],
                        prior: torch.Tensor, s: MegabyteState, step: Step) -> torch.Tensor:
        """One global pass over the patches a prefill completes: their vectors e (n, M, G), a `fresh` (n,) row's
        preceded by the pad; row j's inputs at global positions from g_at[j], counts[j] of them real. -> the current
        window's contributions (n, C, D_L), `prior` being those before."""
        n = e.shape[0]
        pad = self.global_pad.expand(n, 1, -1).to(e.dtype)
        g_in = torch.where(fresh[:, None, None], torch.cat((pad, e), 1), torch.cat((e, pad), 1))
        g_step = step.moved(g_at, max(a + c for a, c in zip(g_at, counts, strict=True)), counts)
        g_out = self.global_model(self.drop(g_in), s.global_kv, g_step)  # (n, M + 1, G)
        s.global_steps += 1
        return self._new_ctx(g_out, prior, counts)

    def prefill(self, x: torch.Tensor, s: MegabyteState, step: Step) -> torch.Tensor:
        """Bytes x (n, T) of n rows, row j's `step.lens[j]` real ones (the rest right padding) from byte position
        `step.at[j]` on: a whole prompt (at 0) or the next chunk of one (at a patch border); logits (n, 256) after
        each row's last byte. Any number of rows, prompts and chunks of any lengths, in one pass of each model."""
        n, T = x.shape
        P, dev = self.config.patch_size, x.device
        Wp = s.recent.shape[1]
        lens = list(step.lens or (T,) * n)
        if self.config.dynamic:
            return self._dynamic_prefill(x, s, step)
        if any(a % P for a in step.at):
            raise ValueError(f"MEGABYTE prefills from patch borders: positions {list(step.at)}, patch size {P}")
        fresh = torch.tensor([a == 0 for a in step.at], device=dev)  # (n,) rows that start over
        k0 = [a // P for a in step.at]  # patch index at the chunk's start
        k1 = [(a + m) // P for a, m in zip(step.at, lens, strict=True)]  # the current patch after it
        # global model: the patches the chunk completes (a fresh row's inputs start with the pad at position 0)
        done = [b - a for a, b in zip(k0, k1, strict=True)]
        counts = [d + (a == 0) for d, a in zip(done, step.at, strict=True)]
        prior = torch.where(fresh[:, None, None], 0, s.ctx[step.rows])  # (n, C, D_L) contributions before them
        if max(counts) > 0:
            M = max(done)
            where = (step.positions(M * P, self.config.max_seq_len) if M else None)
            g_at = [0 if a == 0 else k + 1 for a, k in zip(step.at, k0, strict=True)]
            ctx = self._global_prefill(self._patch_embed(x[:, : M * P], where), fresh, g_at, counts, prior, s, step)
        else:
            ctx = prior
        s.ctx[step.rows] = ctx
        # local model: the current patch's window so far, from the bytes before the chunk (`recent`) and in it
        before = torch.where(fresh[:, None], -1, s.recent[step.rows])  # (n, Wp)
        hist = torch.cat((before, x, x.new_full((n, P), -1)), dim=1)  # byte position t at index t - at + Wp
        rs = [a + m - k * P for a, m, k in zip(step.at, lens, k1, strict=True)]  # bytes of the current patch
        starts = torch.tensor([k * P - a for a, k in zip(step.at, k1, strict=True)], device=dev)
        R = max(rs)
        idx = hist.gather(1, starts[:, None] + torch.arange(Wp + R, device=dev))  # (n, Wp + R): positions 0..first+R
        if self.config.local_context == 0:
            idx[:, 0] = -1  # the paper: a pad, not the previous patch's last byte
        s.patch[step.rows] = hist.gather(1, starts[:, None] + Wp + torch.arange(P, device=dev))
        s.recent[step.rows] = hist.gather(1, torch.tensor(lens, device=dev)[:, None] + torch.arange(Wp, device=dev))
        l_step = step.moved([0] * n, Wp + R, [Wp + r for r in rs])
        return self._local_logits_at(idx, ctx, s, l_step)

    def decode_step(self, byte: torch.Tensor, s: MegabyteState, step: Step) -> torch.Tensor:
        """Feed byte (n,) at byte position `step.at` of each row; logits (n, 256) for the byte after it. Rows whose
        patch this byte completes run one batched global step and restart their local window; all others run one
        batched local step at their own window positions."""
        if self.config.dynamic:
            return self._dynamic_decode(byte, s, step)
        P, n = self.config.patch_size, byte.shape[0]
        s.patch[step.rows, step.pos % P] = byte
        if self.config.local_context > 0:
            s.recent[step.rows] = torch.cat((s.recent[step.rows][:, 1:], byte.view(-1, 1)), dim=1)
        done = [j for j, t in enumerate(step.at) if t % P == P - 1]
        going = [j for j, t in enumerate(step.at) if t % P != P - 1]
        logits = None
        if done:  # patch complete: one global step for the next patch, then the local window starts over
            d = step.select(done)
            k = [t // P + 1 for t in d.at]  # the new patch's index: the global input at position k is patch k - 1
            where = d.pos[:, None] - (P - 1) + torch.arange(P, device=byte.device)  # (nd, P) its bytes' positions
            g_out = self.global_model(self._patch_embed(s.patch[d.rows], where), s.global_kv, d.moved(k, max(k) + 1))
            s.global_steps += 1
            ctx = self._new_ctx(g_out, s.ctx[d.rows], [1] * d.n)
            s.ctx[d.rows] = ctx
            start = s.recent[d.rows] if self.config.local_context > 0 else s.recent.new_full((d.n, 1), -1)
            out = self._local_logits_at(start, ctx, s, d.moved([0] * d.n, self.first + 1))
            if not going:
                return out
            logits = out.new_empty(n, out.shape[1])
            logits[done] = out
        g = step.select(going)
        w = [self.first + 1 + t % P for t in g.at]  # the byte's window position
        out = self._local_logits_at(byte[going].view(-1, 1) if done else byte.view(-1, 1), s.ctx[g.rows], s,
                                    g.moved(w, max(w) + 1))
        if logits is None:
            return out
        logits[going] = out
        return logits

    # --- dynamic patches (bytelm.models.patching): 1..P bytes each, ending where the rule says ---------------------
    # Patch k is laid out in P slots (its bytes, then -1: empty, embedded as zeros), so the patch embedder, the global
    # model's width G = P * D_G and its P slices for the local model are MEGABYTE's. Patch k's window holds the W bytes
    # before its first byte, then its first P - 1; only its own bytes' outputs are read.
    def _slot_embed(self, slots: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Patches of P slots (n, m*P) of bytes (-1: empty) at byte positions `where` (n, m*P) -> (n, m, G)."""
        n, m = slots.shape[0], slots.shape[1] // self.config.patch_size
        h = self.global_embed(slots.clamp(min=0))  # (n, m*P, D_G)
        if self.global_pos is not None:
            h = h + self.global_pos(where.clamp(0, self.config.max_seq_len - 1))
        return h.masked_fill((slots < 0)[..., None], 0).reshape(n, m, self.config.global_dim)

    def _natural_ends(self, x: torch.Tensor, prev_byte: torch.Tensor, prev_h: torch.Tensor,
                      caches: list[KVCache] | None = None, step: Step | None = None):
        """The rule's own ends over bytes x (n, T) after `prev_byte` / entropy `prev_h` (n,) -> (ends (n, T), the
        entropy model's logits or None, its entropies or None)."""
        if self.config.patching == "space":
            return space_ends(x, prev_byte), None, None
        logits = self.entropy_model(x, caches, step)  # (n, T, 256)
        h = entropy(logits)
        return entropy_ends(h, prev_h, self.config.patch_threshold), logits, h

    @torch.no_grad()
    def patch_ends(self, x: torch.Tensor) -> torch.Tensor:
        """Where this model's patches of bytes x (B, T) end: (B, T) bool, True at a patch's last byte."""
        x = x.long()
        B, T = x.shape
        P = self.config.patch_size
        if not self.config.dynamic:
            return (torch.arange(T, device=x.device) % P == P - 1).expand(B, T)
        natural, _, _ = self._natural_ends(x, x.new_full((B,), -1), torch.full((B,), math.inf, device=x.device))
        return cut(natural, P)

    def _dynamic_forward(self, x: torch.Tensor, loss: str | None) -> torch.Tensor:
        c = self.config
        B, T = x.shape
        P, G, Wp = c.patch_size, c.global_dim, max(c.local_context, 1)
        natural, e_logits, _ = self._natural_ends(x, x.new_full((B,), -1), torch.full((B,), math.inf,
                                                                                     device=x.device))
        pid, off, start = layout(cut(natural, P))  # (B, T) each byte's patch, its offset there, the patch's first
        K = T if x.is_meta else int(pid[:, -1].max()) + 1  # patches of the longest row (meta: the most there can be)
        slot = pid * P + off  # (B, T) each byte's slot
        t = torch.arange(T, device=x.device).expand(B, T)
        slots = x.new_full((B, K * P), -1).scatter(1, slot, x)  # (B, K*P)
        where = x.new_zeros((B, K * P)).scatter(1, slot, t)
        g_in = torch.cat((self.global_pad.expand(B, 1, G), self._slot_embed(slots[:, : (K - 1) * P],
                                                                             where[:, : (K - 1) * P])), dim=1)
        g_out = self.global_model(self.drop(g_in))  # (B, K, G): output k has seen patches < k
        first = x.new_full((B, K), T).scatter(1, pid, start)  # (B, K) each patch's first byte (T: none)
        idx = first[..., None] - Wp + torch.arange(self.window, device=x.device)  # (B, K, L)
        inside = (idx >= 0) & (idx < T)
        win = torch.where(inside, x.gather(1, idx.clamp(0, T - 1).flatten(1)).view(B, K, -1), -1)
        if c.local_context == 0:
            win[..., 0] = -1  # the paper: a pad, not the previous patch's last byte
        h = self._local_in(win.flatten(0, 1), self._to_local(g_out).flatten(0, 1), 0)  # (B*K, L, D_L)
        l_out = self.local_model(self.drop(h))[:, self.first :].reshape(B, K * P, -1)  # (B, K*P, D_L)
        logits = self.lm_head(l_out.gather(1, slot[..., None].expand(-1, -1, l_out.shape[-1])))  # (B, T, 256)
        if loss is None:
            return logits
        out = byte_loss(logits, x, loss)
        if e_logits is not None and torch.is_grad_enabled() and T > 1:
            # the entropy model learns on its own loss; adding (l - l.detach()) gives its gradient and changes no value
            el = self.entropy_model.loss(e_logits, x)  # (B, T - 1)
            el = {"mean": el.mean, "sum": el.sum}.get(loss, lambda: F.pad(el, (1, 0)).view(out.shape))()
            out = out + (el - el.detach())
        return out

    def _dynamic_prefill(self, x: torch.Tensor, s: MegabyteState, step: Step) -> torch.Tensor:
        """As `prefill`, from any position: a row resuming mid-patch carries the patch's bytes so far (`s.patch`)."""
        c = self.config
        if x.shape[1] == 0:  # empty prompts: one byte of padding, so that every row has a place
            x, step = x.new_zeros(x.shape[0], 1), replace(step, lens=(0,) * x.shape[0])
        n, T = x.shape
        P, Wp, dev = c.patch_size, s.recent.shape[1], x.device
        lens = list(step.lens or (T,) * n)
        fresh = [a == 0 for a in step.at]
        had = [0 if f else s.plen[r] for f, r in zip(fresh, step.slots, strict=True)]  # bytes of the current patch
        fr = torch.tensor(fresh, device=dev)
        before = torch.where(fr[:, None], -1, s.recent[step.rows])  # (n, Wp) the bytes before the current patch
        buf = torch.where(fr[:, None], -1, s.patch[step.rows])  # (n, P) its bytes so far, -1 after them
        had_t = torch.tensor(had, device=dev)
        prev_byte = torch.cat((before, buf), 1).gather(1, Wp - 1 + had_t[:, None])[:, 0]  # the byte before x_0
        if c.patching == "entropy":
            prev_h = torch.where(fr, math.inf, s.prev_h[step.rows])
            natural, _, h = self._natural_ends(x, prev_byte, prev_h, s.entropy_kv, step)
            last = torch.tensor([max(m - 1, 0) for m in lens], device=dev)
            s.prev_h[step.rows] = torch.where(torch.tensor([m > 0 for m in lens], device=dev),
                                              h.gather(1, last[:, None])[:, 0], prev_h)
        else:
            natural, _, _ = self._natural_ends(x, prev_byte, None)
        # y: each row's current patch so far, then the chunk: y[j, i] is byte position at[j] - had[j] + i
        R = max(max(k + m for k, m in zip(had, lens, strict=True)), 1)
        i = torch.arange(R, device=dev)
        held = i < had_t[:, None]  # (n, R) bytes that come from the current patch so far
        gi = (i - had_t[:, None]).clamp(0, T - 1)  # (n, R) where the others are in x
        y = torch.where(held, buf.gather(1, i.clamp(max=P - 1).expand(n, R)), x.gather(1, gi))
        total = torch.tensor([k + m for k, m in zip(had, lens, strict=True)], device=dev)
        real = i < total[:, None]  # (n, R)
        ends = cut(~held & natural.gather(1, gi), P) & real
        pid, off, _ = layout(ends)
        done = ends.sum(1)  # (n,) patches the chunk completes
        done_l = done.tolist()
        cur = torch.where(ends, torch.arange(1, R + 1, device=dev), 0).max(1).values  # (n,) current patch's start
        r = total - cur  # (n,) its bytes so far, 0..P-1
        # global model: the completed patches (a fresh row's inputs start with the pad at position 0)
        counts = [d + f for d, f in zip(done_l, fresh, strict=True)]
        prior = torch.where(fr[:, None, None], 0, s.ctx[step.rows])
        if max(counts) > 0:
            M = max(done_l)
            slot = torch.where(real & (pid < M), pid * P + off, M * P)  # the rest goes to a dropped slot
            slots = y.new_full((n, M * P + 1), -1).scatter(1, slot, y)[:, : M * P]
            pos = torch.tensor(step.at, device=dev)[:, None] - had_t[:, None] + torch.arange(R, device=dev)
            where = y.new_zeros((n, M * P + 1)).scatter(1, slot, pos)[:, : M * P]
            g_at = [0 if f else s.npatch[q] + 1 for f, q in zip(fresh, step.slots, strict=True)]
            ctx = self._global_prefill(self._slot_embed(slots, where), fr, g_at, counts, prior, s, step)
        else:
            ctx = prior
        s.ctx[step.rows] = ctx
        # local model: the current patch's window, from the bytes before it and its bytes so far
        hist = torch.cat((before, y), 1)  # (n, Wp + R): y[i] at Wp + i
        r_l = r.tolist()
        Rr = max(r_l)
        idx = hist.gather(1, (cur[:, None] + torch.arange(Wp + Rr, device=dev)).clamp(max=Wp + R - 1))
        if c.local_context == 0:
            idx[:, 0] = -1
        s.recent[step.rows] = hist.gather(1, cur[:, None] + torch.arange(Wp, device=dev))
        ar = torch.arange(P, device=dev)
        s.patch[step.rows] = torch.where(ar < r[:, None], hist.gather(1, (Wp + cur[:, None] + ar).clamp(
            max=Wp + R - 1)), -1)
        for q, f, d, rj in zip(step.slots, fresh, done_l, r_l, strict=True):
            s.plen[q], s.npatch[q] = rj, (0 if f else s.npatch[q]) + d
        l_step = step.moved([0] * n, Wp + Rr, [Wp + rj for rj in r_l])
        return self._local_logits_at(idx, ctx, s, l_step)

    def _dynamic_decode(self, byte: torch.Tensor, s: MegabyteState, step: Step) -> torch.Tensor:
        """As `decode_step`: rows whose patch the rule ends at this byte run one batched global step."""
        c = self.config
        P, n, Wp, dev = c.patch_size, byte.shape[0], s.recent.shape[1], byte.device
        had = [s.plen[q] for q in step.slots]
        had_t = torch.tensor(had, device=dev)
        if c.patching == "space":
            prev = torch.where(had_t > 0, s.patch[step.rows, (had_t - 1).clamp(min=0)], s.recent[step.rows, -1])
            natural, _, _ = self._natural_ends(byte[:, None], prev, None)
        else:
            natural, _, h = self._natural_ends(byte[:, None], None, s.prev_h[step.rows], s.entropy_kv, step)
            s.prev_h[step.rows] = h[:, 0]
        s.patch[step.rows, had_t] = byte
        now = [h + 1 for h in had]
        ends = natural[:, 0].tolist()
        done = [j for j in range(n) if ends[j] or now[j] == P]
        going = [j for j in range(n) if not (ends[j] or now[j] == P)]
        for q, m in zip(step.slots, now, strict=True):
            s.plen[q] = m
        logits = None
        if done:  # the patch is complete: one global step for it, then the next patch's window starts over
            d = step.select(done)
            m = torch.tensor([now[j] for j in done], device=dev)
            where = d.pos[:, None] - m[:, None] + 1 + torch.arange(P, device=dev)  # (nd, P) its bytes' positions
            k = [s.npatch[q] + 1 for q in d.slots]  # its global position
            patch = s.patch[d.rows]
            g_out = self.global_model(self._slot_embed(patch, where), s.global_kv, d.moved(k, max(k) + 1))
            s.global_steps += 1
            ctx = self._new_ctx(g_out, s.ctx[d.rows], [1] * d.n)
            s.ctx[d.rows] = ctx
            before = torch.cat((s.recent[d.rows], patch), 1).gather(1, m[:, None] + torch.arange(Wp, device=dev))
            s.recent[d.rows] = before
            s.patch[d.rows] = -1
            for q in d.slots:
                s.plen[q], s.npatch[q] = 0, s.npatch[q] + 1
            start = before if c.local_context > 0 else before.new_full((d.n, 1), -1)
            out = self._local_logits_at(start, ctx, s, d.moved([0] * d.n, self.first + 1))
            if not going:
                return out
            logits = out.new_empty(n, out.shape[1])
            logits[done] = out
        g = step.select(going)
        w = [self.first + now[j] for j in going]  # the byte's window position
        out = self._local_logits_at(byte[going].view(-1, 1) if done else byte.view(-1, 1), s.ctx[g.rows], s,
                                    g.moved(w, max(w) + 1))
        if logits is None:
            return out
        logits[going] = out
        return logits


# One Linear layer of a block: attention in and out, MLP in and out (what LoRA adapts; see bytelm.finetune).
_BLOCK_LINEARS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc|proj))"

register(ModelSpec(
    model_type="megabyte", config_class=MegabyteConfig, model_class=Megabyte,
    lora_targets={"global": rf"global_model\.{_BLOCK_LINEARS}", "local": rf"local_model\.{_BLOCK_LINEARS}",
                  "all": rf"(global_model|local_model)\.{_BLOCK_LINEARS}"},
    description="MEGABYTE (Yu et al. 2023, arXiv 2305.07185)", tags=["megabyte", "byte-level", "tokenizer-free"],
    stacks={"local": ("local_", "lm_head")},  # the local model, its embeddings and norms, and the output head
    remote_stack=("global_model", "global_layers", "global_embed"),
))

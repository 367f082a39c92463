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

Causality: the global model sees patches < k when predicting patch k, and window position i (byte x_{kP-W+i})
predicts x_{kP-W+i+1}: logits[:, t] depends on x[:, :t] only, and byte 0 is predicted from the pads alone. Decoding
runs the global model once per patch; the local window is refilled from the last W bytes at each patch boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Dropout, KVCache, TransformerStack, init_weights
from .base import ByteLM
from .config import VOCAB_SIZE, MegabyteConfig
from .loss import byte_loss, chunked_byte_loss
from .registry import ModelSpec, register


@dataclass
class MegabyteState:
    """Decoding state of B rows: both models' KV caches and where each row is. The global cache holds one entry per
    patch, the local cache the current patch's window only (overwritten from position 0 at every new patch). Rows
    move independently (a continuous batch: bytelm.generation.engine), so the positions are per row, kept on the
    host, where the control flow needs them."""

    global_kv: list[KVCache]
    local_kv: list[KVCache]
    patch: torch.Tensor  # (B, P) bytes of the current patch so far
    recent: torch.Tensor  # (B, max(W, 1)) the last bytes before the current position (-1: before the sequence)
    ctx: torch.Tensor  # (B, C, D_L) global contributions to window positions L-C.. (C = P, or L with context_global)
    k: list[int]  # per row: index of the current patch
    r: list[int]  # per row: bytes of the current patch already seen
    global_steps: int = 0  # batched global-model steps run (a serving metric)


def _subset(rows: torch.Tensor | None, js: list[int], n: int, device) -> torch.Tensor | None:
    """The state rows of inputs js (of n, given for `rows`, None = all in order); None again when that is all."""
    if rows is None:
        return None if len(js) == n else torch.tensor(js, device=device)
    return rows if len(js) == n else rows[torch.tensor(js, device=rows.device)]


def _positions(values: list[int], device) -> int | torch.Tensor:
    """One int where every row is at the same position (the plain batch: views, no masks), else a tensor (n,)."""
    return values[0] if min(values) == max(values) else torch.tensor(values, device=device)


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
        self.drop = Dropout(c.dropout)
        init_weights(self, max(c.global_layers, c.local_layers), c.init)

    # --- pieces shared by training and decoding ----------------------------------------------------------------
    def _patch_embed(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Bytes (B, n*P) starting at byte position `start` (or a start (B,) per row) -> n patch vectors (B, n, G)."""
        B, n = x.shape[0], x.shape[1] // self.config.patch_size
        h = self.global_embed(x)  # (B, n*P, D_G)
        if self.global_pos is not None:
            if isinstance(start, torch.Tensor):
                h = h + self.global_pos(start[:, None] + torch.arange(x.shape[1], device=x.device))
            else:
                h = h + self.global_pos(torch.arange(start, start + x.shape[1], device=x.device))
        return h.reshape(B, n, self.config.global_dim)

    def _to_local(self, g_out: torch.Tensor) -> torch.Tensor:
        """Global outputs (..., G) -> per-position local contributions (..., P, D_L)."""
        ctx = self.global_to_local(g_out.unflatten(-1, (self.config.patch_size, self.config.byte_dim)))
        return self.local_ctx_norm(ctx) if self.config.local_norms else ctx

    def _local_in(self, idx: torch.Tensor, ctx: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Window positions start..start+n-1 of each patch: their bytes idx (N, n) (-1: the pad) embedded, plus
        the global contributions ctx (N, L - ctx_from, D_L) of positions ctx_from..L-1.  -> (N, n, D_L)
        `start` may be a LongTensor (N,) of positions past the window's first prediction, one per row (n = 1)."""
        n = idx.shape[1]
        h = self.local_embed(idx.clamp(min=0))  # (N, n, D_L)
        if isinstance(start, torch.Tensor):  # decoding a continuous batch: one byte per row, at its own position
            if self.local_pos is not None:
                h = h + self.local_pos(start)[:, None]
            if self.config.local_norms:
                h = self.local_byte_norm(h)
            return h + ctx[torch.arange(ctx.shape[0], device=ctx.device), start - self.ctx_from][:, None]
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
        B, T = x.shape
        P, G = self.config.patch_size, self.config.global_dim
        K = -(-T // P)
        xp = F.pad(x, (0, K * P - T)) if K * P != T else x  # the last patch padded: causality keeps it out
        # global: pad patch, then patches 0..K-2 (the last patch is never input: nothing after it is predicted)
        g_in = torch.cat((self.global_pad.expand(B, 1, G), self._patch_embed(xp[:, : (K - 1) * P], 0)), dim=1)
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
    def new_state(self, batch: int, max_len: int) -> MegabyteState:
        c, dev, dt = self.config, self.device, self.dtype
        self.check_state_memory(batch, max_len)
        return MegabyteState(
            global_kv=self.global_model.new_caches(batch, -(-max_len // c.patch_size), dev, dt),
            local_kv=self.local_model.new_caches(batch, self.window, dev, dt),
            patch=torch.zeros(batch, c.patch_size, dtype=torch.long, device=dev),
            recent=torch.full((batch, max(c.local_context, 1)), -1, dtype=torch.long, device=dev),
            ctx=torch.zeros(batch, self.window - self.ctx_from, c.local_dim, device=dev, dtype=dt),
            k=[0] * batch, r=[0] * batch,
        )

    def _global_step(self, g_in: torch.Tensor, s: MegabyteState, pos: int | torch.Tensor, rows, span: int,
                     prefill: bool = False) -> None:
        """Run the global model on patch inputs (n, m, G) at positions pos.. of state rows `rows` (None: all) and keep
        the current window's contributions."""
        g_out = self.global_model(g_in, s.global_kv, pos, rows, span)  # (n, m, G)
        s.global_steps += 1
        if not self.config.context_global:
            ctx = self._to_local(g_out[:, -1])  # (n, P, D_L)
        elif prefill:  # every patch so far, windowed; the current patch's window is the last
            ctx = self._ctx_windows(self._to_local(g_out)).unflatten(0, (g_out.shape[0], -1))[:, -1]
        else:  # the previous window's last `first` contributions, then the new patch's
            old = s.ctx if rows is None else s.ctx[rows]
            ctx = torch.cat((old[:, old.shape[1] - self.first :], self._to_local(g_out[:, -1])), dim=1)
        if rows is None:
            s.ctx.copy_(ctx)
        else:
            s.ctx[rows] = ctx

    def _local_step(self, idx: torch.Tensor, s: MegabyteState, start: int | torch.Tensor, rows, span: int):
        """Run the local model on window positions start.. of the current patch of state rows `rows` (None: all);
        return the last position's logits (n, 256)."""
        h = self._local_in(idx, s.ctx if rows is None else s.ctx[rows], start)
        return self.lm_head(self.local_model(h, s.local_kv, start, rows, span)[:, -1])  # (n, 256)

    def _window_start(self, recent: torch.Tensor) -> torch.Tensor:
        """Byte indices (n, first + 1) of the window positions up to the patch's first prediction."""
        if self.config.local_context == 0:
            return recent.new_full((recent.shape[0], 1), -1)  # the paper: the pad
        return recent

    def prefill(self, x: torch.Tensor, s: MegabyteState, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts x (n, L) into state rows `rows` (n,) (None: all rows), which start over; logits (n, 256)."""
        B, L = x.shape
        P, G = self.config.patch_size, self.config.global_dim
        k, r = divmod(L, P)  # k complete patches; the current patch k holds r bytes
        g_in = torch.cat((self.global_pad.expand(B, 1, G), self._patch_embed(x[:, : k * P], 0)), dim=1)
        self._global_step(g_in, s, 0, rows, k + 1, prefill=True)  # (n, k+1, G) inputs: pad + patches 0..k-1
        sel = slice(None) if rows is None else rows
        for i in range(s.patch.shape[0]) if rows is None else rows.tolist():
            s.k[i], s.r[i] = k, r
        s.patch[sel, :r] = x[:, k * P :]
        Wp = s.recent.shape[1]
        padded = F.pad(x, (Wp, 0), value=-1)  # (n, Wp + L)
        s.recent[sel] = padded[:, -Wp:]
        idx = padded[:, k * P : k * P + Wp + r]  # window positions 0..first + r: x_{kP-Wp} .. x_{kP+r-1}
        if self.config.local_context == 0:
            idx = torch.cat((idx.new_full((B, 1), -1), idx[:, 1:]), dim=1)
        return self._local_step(idx, s, 0, rows, idx.shape[1])

    def decode_step(self, byte: torch.Tensor, s: MegabyteState, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feed byte (n,) to state rows `rows` (n,) (None: all rows, in order); logits (n, 256) for their next bytes.
        The rows may sit at different positions: those whose patch this byte completes run one batched global step
        and restart their local window; all others run one batched local step at their own window positions."""
        P, n, dev = self.config.patch_size, byte.shape[0], byte.device
        ids = list(range(n)) if rows is None else rows.tolist()
        sel = slice(None) if rows is None else rows
        at = torch.arange(n, device=dev) if rows is None else rows
        s.patch[at, torch.tensor([s.r[i] for i in ids], device=dev)] = byte
        if self.config.local_context > 0:
            s.recent[sel] = torch.cat((s.recent[sel][:, 1:], byte.view(-1, 1)), dim=1)
        for i in ids:
            s.r[i] += 1
        done = [j for j, i in enumerate(ids) if s.r[i] == P]
        going = [j for j, i in enumerate(ids) if s.r[i] < P]
        logits = None
        if done:  # patch complete: one global step for the next patch, then the local window starts over
            d_rows = _subset(rows, done, n, dev)
            d_sel = slice(None) if d_rows is None else d_rows
            ks = []
            for j in done:
                s.k[ids[j]] += 1
                s.r[ids[j]] = 0
                ks.append(s.k[ids[j]])
            start = _positions([(k - 1) * P for k in ks], dev)
            self._global_step(self._patch_embed(s.patch[d_sel], start), s, _positions(ks, dev), d_rows, max(ks) + 1)
            out = self._local_step(self._window_start(s.recent[d_sel]), s, 0, d_rows, self.first + 1)
            if not going:
                return out
            logits = out.new_empty(n, out.shape[1])
            logits[done] = out
        g_rows = _subset(rows, going, n, dev)
        pos = [self.first + s.r[ids[j]] for j in going]
        out = self._local_step(byte[going].view(-1, 1), s, _positions(pos, dev), g_rows, max(pos) + 1)
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

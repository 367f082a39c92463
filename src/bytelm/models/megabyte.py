"""MEGABYTE (Yu et al. 2023, arXiv 2305.07185, section 2).

Shapes: B batch, T bytes, P patch size, K = ceil(T / P) patches, D_G per-byte global width, G = P * D_G the global
model's width, D_L the local model's width.

    patch embedder   h_embed[t] = E_global[x_t] (+ E_pos[t])                               (B, T, D_G)
                     global input k = E_global_pad for k = 0, else bytes of patch k-1 concatenated  (B, K, G)
    global model     transformer over the K patch vectors                                  (B, K, G)
    local model      input (k, p) = W_GL(global out k, slice p) + (E_local_pad if p = 0 else E_local[x_{kP+p-1}])
                     transformer over the P positions of each patch, all patches at once   (B*K, P, D_L)
                     logits over the 256 byte values                                       (B, T, 256)

The global model sees patch k-1 when predicting patch k, and the local model sees the bytes of patch k before
position p: so logits[:, t] depends on x[:, :t] only, and byte 0 is predicted from the two pads alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Dropout, KVCache, TransformerStack, init_weights
from .base import ByteLM
from .config import VOCAB_SIZE, MegabyteConfig
from .registry import ModelSpec, register


@dataclass
class MegabyteState:
    """Decoding state: both models' KV caches and where we are. The global cache holds one entry per patch, the local
    cache the bytes of the current patch only (it is overwritten from position 0 at every new patch)."""

    global_kv: list[KVCache]
    local_kv: list[KVCache]
    patch: torch.Tensor  # (B, P) bytes of the current patch so far
    ctx: torch.Tensor | None = None  # (B, P, D_L) the global model's contribution to each local position
    k: int = 0  # index of the current patch
    r: int = 0  # bytes of the current patch already seen


class Megabyte(ByteLM):
    config_class = MegabyteConfig

    def __init__(self, config: MegabyteConfig) -> None:
        super().__init__(config)
        c = config
        P, D_G, G, D_L = c.patch_size, c.byte_dim, c.global_dim, c.local_dim
        rope = c.pos_emb == "rope"
        self.global_embed = nn.Embedding(VOCAB_SIZE, D_G)
        # learned: per-byte positions (the paper); rope: rotary over patch index inside the global model
        self.global_pos = None if rope else nn.Embedding(c.max_seq_len, D_G)
        self.global_pad = nn.Parameter(torch.zeros(G))
        self.global_model = TransformerStack(G, c.global_layers, c.global_heads, c.mlp_ratio, c.bias, c.dropout,
                                             c.max_patches, rope, c.rope_base)
        self.global_to_local = nn.Linear(D_G, D_L, bias=c.bias)  # W^GL, applied to each of the P slices
        self.local_embed = nn.Embedding(VOCAB_SIZE, D_L)
        self.local_pos = None if rope else nn.Embedding(P, D_L)
        self.local_pad = nn.Parameter(torch.zeros(D_L))
        self.local_model = TransformerStack(D_L, c.local_layers, c.local_heads, c.mlp_ratio, c.bias, c.dropout,
                                            P, rope, c.rope_base)
        self.lm_head = nn.Linear(D_L, VOCAB_SIZE, bias=False)
        self.drop = Dropout(c.dropout)
        init_weights(self, max(c.global_layers, c.local_layers))

    # --- pieces shared by training and decoding ----------------------------------------------------------------
    def _patch_embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Bytes (B, n*P) starting at byte position `start` -> n global patch vectors (B, n, G)."""
        B, n = x.shape[0], x.shape[1] // self.config.patch_size
        h = self.global_embed(x)  # (B, n*P, D_G)
        if self.global_pos is not None:
            h = h + self.global_pos(torch.arange(start, start + x.shape[1], device=x.device))
        return h.reshape(B, n, self.config.global_dim)

    def _to_local(self, g_out: torch.Tensor) -> torch.Tensor:
        """Global outputs (..., G) -> per-position local contributions (..., P, D_L)."""
        return self.global_to_local(g_out.unflatten(-1, (self.config.patch_size, self.config.byte_dim)))

    def _local_in(self, ctx: torch.Tensor, prev: torch.Tensor, start: int) -> torch.Tensor:
        """ctx (N, n, D_L) for local positions start..start+n-1, prev (N, n) the byte before each (ignored at p=0)."""
        h = self.local_embed(prev)  # (N, n, D_L)
        if start == 0:  # position 0 of a patch has no previous byte in it: the learned pad
            h = torch.cat((self.local_pad.expand(h.shape[0], 1, -1).to(h.dtype), h[:, 1:]), dim=1)
        if self.local_pos is not None:
            h = h + self.local_pos(torch.arange(start, start + h.shape[1], device=h.device))
        return ctx + h

    # --- training / scoring -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.check_input(x)
        x = x.long()
        B, T = x.shape
        P, G = self.config.patch_size, self.config.global_dim
        K = -(-T // P)
        if K * P != T:  # pad the last patch; causality keeps the padding out of every real prediction
            x = F.pad(x, (0, K * P - T))
        # global: pad patch, then patches 0..K-2 (the last patch is never input: nothing after it is predicted)
        g_in = torch.cat((self.global_pad.expand(B, 1, G), self._patch_embed(x[:, : (K - 1) * P], 0)), dim=1)
        g_out = self.global_model(self.drop(g_in))  # (B, K, G)
        # local: every patch independently, its bytes shifted right by one inside the patch
        ctx = self._to_local(g_out).reshape(B * K, P, -1)  # (B*K, P, D_L)
        prev = torch.roll(x.reshape(B * K, P), shifts=1, dims=1)  # (B*K, P) prev[:, p] = x[:, p-1]; p=0 becomes the pad
        l_out = self.local_model(self.drop(self._local_in(ctx, prev, 0)))  # (B*K, P, D_L)
        return self.lm_head(l_out).view(B, K * P, VOCAB_SIZE)[:, :T]

    # --- incremental decoding: global model once per patch, local model once per byte ----------------------------
    def new_state(self, batch: int, max_len: int) -> MegabyteState:
        c, dev, dt = self.config, self.device, self.dtype
        return MegabyteState(
            global_kv=self.global_model.new_caches(batch, -(-max_len // c.patch_size), dev, dt),
            local_kv=self.local_model.new_caches(batch, c.patch_size, dev, dt),
            patch=torch.zeros(batch, c.patch_size, dtype=torch.long, device=dev),
        )

    def _global_step(self, g_in: torch.Tensor, s: MegabyteState, pos: int) -> None:
        """Run the global model on patch inputs at positions pos.. and keep the last one's local contributions."""
        g_out = self.global_model(g_in, s.global_kv, pos)  # (B, n, G)
        s.ctx = self._to_local(g_out[:, -1])  # (B, P, D_L)

    def _local_step(self, prev: torch.Tensor, s: MegabyteState, start: int) -> torch.Tensor:
        """Run the local model on positions start.. of the current patch; return the last position's logits."""
        n = prev.shape[1]
        h = self._local_in(s.ctx[:, start : start + n], prev, start)
        return self.lm_head(self.local_model(h, s.local_kv, start)[:, -1])  # (B, 256)

    def prefill(self, x: torch.Tensor, s: MegabyteState) -> torch.Tensor:
        B, L = x.shape
        P, G = self.config.patch_size, self.config.global_dim
        k, r = divmod(L, P)  # k complete patches; the current patch k holds r bytes
        g_in = torch.cat((self.global_pad.expand(B, 1, G), self._patch_embed(x[:, : k * P], 0)), dim=1)
        self._global_step(g_in, s, 0)  # (B, k+1, G) inputs: pad + patches 0..k-1
        s.k, s.r = k, r
        cur = x[:, k * P :]  # (B, r)
        s.patch[:, :r] = cur
        prev = torch.cat((cur.new_zeros(B, 1), cur), dim=1)  # position 0's "previous byte" is replaced by the pad
        return self._local_step(prev, s, 0)

    def decode_step(self, byte: torch.Tensor, s: MegabyteState) -> torch.Tensor:
        P = self.config.patch_size
        s.patch[:, s.r] = byte
        s.r += 1
        if s.r == P:  # patch complete: one global step for the next patch, then the local model starts over
            s.k += 1
            self._global_step(self._patch_embed(s.patch, (s.k - 1) * P), s, s.k)
            s.r = 0
        return self._local_step(byte.view(-1, 1), s, s.r)


# One Linear layer of a block: attention in and out, MLP in and out (what LoRA adapts; see bytelm.finetune).
_BLOCK_LINEARS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc|proj))"

register(ModelSpec(
    model_type="megabyte", config_class=MegabyteConfig, model_class=Megabyte,
    lora_targets={"global": rf"global_model\.{_BLOCK_LINEARS}", "local": rf"local_model\.{_BLOCK_LINEARS}",
                  "all": rf"(global_model|local_model)\.{_BLOCK_LINEARS}"},
    description="MEGABYTE (Yu et al. 2023, arXiv 2305.07185)", tags=["megabyte", "byte-level", "tokenizer-free"],
))

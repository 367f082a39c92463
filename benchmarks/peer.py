"""The peers, `megabyte-pytorch` (PyPI `MEGABYTE-pytorch`, lucidrains) and `mblm` (PyPI, IBM Research: a multi-scale
generalisation of megabyte-pytorch with Transformer or Mamba stages), at a bytelm MEGABYTE shape, read with our
conventions so that every number about them is measured the same way as ours.

    pip install -e ".[bench]"     # installs MEGABYTE-pytorch==0.3.6 and mblm==0.4.2 (install torch first)

megabyte-pytorch:

- Shape: same P, global width/depth/heads, local width/depth/heads, MLP ratio 4. The package takes one `heads` and
  `dim_head` for both stages, so the local stage is rebuilt with its own heads (its own `Transformer` class).
- Logits: its `forward(ids)` returns logits[:, t] predicting ids[:, t + 1] and has no prediction for byte 0; byte 0's
  comes from its start tokens alone (what its own loss uses). `peer_logits` returns our convention, logits[:, t]
  predicting ids[:, t] from ids[:, :t], every byte counted; its own loss would skip byte value 0 (`pad_id`).
- Generation: its `generate` recomputes the full forward for every new byte (no KV cache), samples with top-k and
  Gumbel noise, and always fills its whole `max_seq_len`. `peer_generate` runs the same loop, greedy, for n bytes.

mblm: two Transformer stages (global, local) of our widths, depths and heads, rotary attention in each stage (as
our default), MLP ratio as ours, F.scaled_dot_product_attention. Its logits align like megabyte-pytorch's: the
first patch's start-token logits predict byte 0 (what its own loss uses; `mblm_logits` reads them off its output
layer) and logits[:, t] of its LOGITS output predicts byte t + 1. With sequences a multiple of P its pad
id never occurs.
"""

from __future__ import annotations

import torch

from bytelm import MegabyteConfig

# Each package's local stack (its local transformer, byte embedding, start token and output head), for the
# benchmarks' per-stack learning rate: the same parameters as bytelm's models.registry stacks["local"].
PEER_LOCAL = ("transformers.1.", "token_embs.0.", "start_tokens.1", "to_logits.")
MBLM_LOCAL = ("stage_models.1.", "token_embs_rev.0.", "start_tokens.1", "to_logits.")


def available() -> bool:
    try:
        import MEGABYTE_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build_peer(cfg: MegabyteConfig, seq_len: int) -> torch.nn.Module:
    """megabyte-pytorch's MEGABYTE with our config's shape, holding sequences of up to `seq_len` bytes."""
    try:
        from MEGABYTE_pytorch import MEGABYTE
        from MEGABYTE_pytorch.megabyte import Transformer
    except ImportError as e:
        raise SystemExit("the peer benchmarks need megabyte-pytorch: pip install -e '.[bench]'") from e
    P = cfg.patch_size
    m = MEGABYTE(
        num_tokens=256,
        dim=(cfg.global_dim, cfg.local_dim),
        depth=(cfg.global_layers, cfg.local_layers),
        max_seq_len=(-(-seq_len // P), P),
        dim_head=cfg.global_dim // cfg.global_heads,
        heads=cfg.global_heads,
        ff_mult=int(cfg.mlp_ratio),
        rel_pos=True,  # rotary, like our default
        flash_attn=True,  # F.scaled_dot_product_attention, like ours
    )
    m.transformers[1] = Transformer(dim=cfg.local_dim, layers=cfg.local_layers, heads=cfg.local_heads,
                                    dim_head=cfg.local_dim // cfg.local_heads, ff_mult=int(cfg.mlp_ratio),
                                    rel_pos=True, flash_attn=True)
    return m


def _first_byte_logits(m, batch: int) -> torch.Tensor:
    """The package's prediction of byte 0 (B, 256): its local start token through the local model (its own loss's)."""
    start = m.start_tokens[-1].expand(batch, 1, -1)
    return m.to_logits(m.transformers[-1](start))[:, 0]


def peer_logits(m, x: torch.Tensor) -> torch.Tensor:
    """(B, T) bytes -> (B, T, 256) logits in bytelm's convention: logits[:, t] predicts x[:, t] from x[:, :t]."""
    shifted = m(x)  # (B, T, 256): shifted[:, t] predicts x[:, t + 1]
    return torch.cat((_first_byte_logits(m, x.shape[0])[:, None], shifted[:, :-1]), dim=1)


@torch.inference_mode()
def peer_generate(m, prompt: torch.Tensor, n: int, on_byte=None) -> torch.Tensor:
    """Greedy: the package's own generate loop (a full forward over the whole prefix per byte) without sampling."""
    seq = prompt
    for _ in range(n):
        logits = m(seq)[:, -1]  # an empty prefix goes through its forward_empty
        nxt = logits.argmax(dim=-1)
        if on_byte is not None:
            on_byte()
        seq = torch.cat((seq, nxt[:, None]), dim=1)
    return seq


def mblm_available() -> bool:
    import warnings

    try:
        with warnings.catch_warnings():  # "Failed to import Mamba2": only its Mamba blocks need mamba_ssm
            warnings.simplefilter("ignore")
            import mblm  # noqa: F401
    except ImportError:
        return False
    return True


def build_mblm(cfg: MegabyteConfig, seq_len: int) -> torch.nn.Module:
    """mblm's two-stage Transformer MBLM with our config's shape, holding sequences of up to `seq_len` bytes."""
    import warnings

    try:
        with warnings.catch_warnings():  # "Failed to import Mamba2": only its Mamba blocks need mamba_ssm
            warnings.simplefilter("ignore")
            from mblm import MBLM, MBLMModelConfig
            from mblm.model.transformer import TransformerBlock
    except ImportError as e:
        raise SystemExit("the peer benchmarks need mblm: pip install -e '.[bench]'") from e

    def stage(dim: int, heads: int):
        return TransformerBlock(attn_head_dims=dim // heads, attn_num_heads=heads, attn_use_rot_embs=True,
                                ff_multiplier=int(cfg.mlp_ratio), use_flash_attn=True, pos_emb_type=None)

    P = cfg.patch_size
    return MBLM(MBLMModelConfig(
        num_tokens=256, pad_token_id=0, hidden_dims=[cfg.global_dim, cfg.local_dim],
        num_layers=[cfg.global_layers, cfg.local_layers], seq_lens=[-(-seq_len // P), P],
        train_checkpoint_chunks=None,
        block=[stage(cfg.global_dim, cfg.global_heads), stage(cfg.local_dim, cfg.local_heads)]))


def mblm_logits(m, x: torch.Tensor) -> torch.Tensor:
    """(B, T) bytes -> (B, T, 256) logits in bytelm's convention: logits[:, t] predicts x[:, t] from x[:, :t]."""
    from mblm import MBLMReturnType

    seen, head = [], m.to_logits
    head.forward = lambda h: seen.append(type(head).forward(head, h)) or seen[-1]  # it calls .forward: no hooks
    try:
        shifted = m(x, return_type=MBLMReturnType.LOGITS)  # (B, T, 256): shifted[:, t] predicts x[:, t + 1]
    finally:
        del head.forward
    first = seen[-1][:, 0, :1]  # (B, 1, 256): all logits are (B, K, 1 + P, 256); patch 0's start token's
    return torch.cat((first, shifted[:, :-1]), dim=1)

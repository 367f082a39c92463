"""Controlled experiments behind bytelm's MEGABYTE: why bytelm 0.1's (the paper's design) and then 0.2's learned less
per step than megabyte-pytorch, and what fixes it. The README's "What bytelm does differently from the paper" and
the logbook's entries for bytelm 0.2 to 0.4 (docs/logbook.md) quote the table.

    python -m benchmarks.design VARIANT:SEED[:STEPS] ...   # each run in its own process, appended to design.jsonl
    python -m benchmarks.design --causal VARIANT ...       # causality check of structural variants
    python -m benchmarks.design --table                    # design.jsonl -> design.md (mean over seeds, spread)

A VARIANT is parts joined by "+". Two families:
- built on the paper's design (bytelm 0.1's model, `local_context=0, local_norms=False`) by the class `Exp` below:
  `ours`, `prefix8`, `sepnorm`, ... (bytelm 0.2's model is `prefix4+sepnorm`);
- `bl`: bytelm's real `Megabyte` class at 0.2's config (local window 4, local norms, GPT-2 init), and `peer`
  (megabyte-pytorch), `mblm`, `tf` (bytelm's byte transformer of equal parameters), with parts that change the
  model (`faninit`: the fan_in init scheme, now the default; `torchinit`: PyTorch's own inits; `W8`: local
  window 8; `gemb0.02`: the global byte embedding's init std; `headbias`, `gnorm`, `bias`, `initx2`, `noresscale`,
  `stackinit`) or the recipe (`lr4e-3`: peak lr; `llr4`: local stack at 4x the lr (`locallr2`: 2x); `wd0.05`,
  `wdemb0`: weight decay; `warm50`: warm-up steps; `bf16`: CPU bf16 autocast; `muon`: Muon for the stacks'
  matrices). Block-level parts on bytelm's classes: `qknorm`, `relu2`, `zeroproj`.

Harness = benchmarks/ablation.py's one(): same batches (WindowSampler(train, 1024, 8, seed=1337)), AdamW (0.9, 0.95),
wd 0.1 on matrices, warm-up 20 steps then cosine to 10%, clip 1.0, lr 2e-3 and the local stack at 1x unless a part
says otherwise; val over 64 windows WindowSampler(val, 1024, 1, seed=2024). Seed = model init seed only.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

from benchmarks import peer, suites  # noqa: E402
from benchmarks.common import bytelm_optimizer, optimizer_step  # noqa: E402
from bytelm import Megabyte  # noqa: E402
from bytelm.data import WindowSampler, load_split  # noqa: E402
from bytelm.models import byte_loss, get_spec  # noqa: E402
from bytelm.nn import TransformerStack  # noqa: E402

from .common import RESULTS as RESULTS_ROOT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = RESULTS_ROOT / "full" / "design.jsonl"

# variant -> options. arr: paper (ours) | prefix (local model also reads the last W bytes of the previous patch)
# | offset (megabyte-pytorch's arrangement: local for patch k reads [pad, x_kP..x_kP+P-1], predicts x_kP+1..x_kP+P)
VARIANTS: dict[str, dict] = {
    "ours": {},
    "peer": {"peer": True},
    "prefix8": {"arr": "prefix", "W": 8},
    "prefix1": {"arr": "prefix", "W": 1},
    "prefix4": {"arr": "prefix", "W": 4},
    "offset": {"arr": "offset"},
    "lemb0.1": {"lemb_std": 0.1},
    "lemb1": {"lemb_std": 1.0},
    "glx0.2": {"gl_scale": 0.2},
    "sepnorm": {"sep_norm": True},
    "linnorm": {"lin_norm": True},
    "stackinit": {"per_stack": True},
    "fullproj": {"fullproj": True},
    "fullproj-sepnorm": {"fullproj": True, "sep_norm": True},
    "fullproj-glx": {"fullproj": True, "gl_scale": 1 / math.sqrt(8)},
    "tie": {"tie": True},
    "locallr2": {"local_lr": 2.0},
    "ctxglobal": {"ctx_global": True},
    "lr4e-3": {"lr": 4e-3},
    "lr3e-3": {"lr": 3e-3},
    "lr6e-3": {"lr": 6e-3},
}


# Variants of bytelm's MEGABYTE as it is (the real class, its default config; `bl`), of the peers (`peer`, `mblm`)
# and of bytelm's byte transformer (`tf`), with generic parts: lrX (peak lr X), llrX (local stack at X times the lr),
# wdX (weight decay X), WX (local_context X) and the named parts below.
VARIANTS.update({
    "bl": {"bl": True, "cfg": {"init": "gpt2"}},  # bytelm 0.2's MEGABYTE: its GPT-2 init
    "faninit": {"cfg": {"init": "fan_in"}},  # bytelm's fan_in init scheme (bytelm.nn.init): PyTorch's defaults
    "fannormal": {"init": "fannormal"},  # fan_in's variances from a normal draw (the first fan_in; erratic)
    "mblm": {"mblm": True},
    "tf": {"tf": True},
    "torchinit": {"init": "torch"},  # PyTorch's default inits (kaiming-uniform Linear, N(0, 1) embeddings)
    "noresscale": {"res_scale": "none"},  # residual projections N(0, 0.02), not / sqrt(2 * layers)
    "stackinit": {"per_stack": True, "res_scale": "stack"},
    "initx2": {"init_mult": 2.0},
    "initx0.5": {"init_mult": 0.5},
    "wdemb0": {"wd_emb": False},  # no decay on embeddings (only Linear matrices)
    "bf16": {"bf16": True},  # CPU bf16 autocast (forward), fp32 weights and optimizer
    "bias": {"cfg": {"bias": True}},
    "nonorms": {"cfg": {"local_norms": False}},
    "headbias": {"head_bias": True},  # a bias on the output head (megabyte-pytorch's has one): byte frequencies
    "gnorm": {"gnorm": True},  # LayerNorm over each patch vector before the global model (the peer's embedder ends so)
    "ctxg": {"cfg": {"context_global": True}},  # bytelm's context_global: the window's earlier bytes get theirs
    "qknorm": {"qknorm": True},  # RMS-normalised queries and keys per head (no gain), as in nanochat
    "relu2": {"relu2": True},  # MLP activation relu(x)^2 (modded-nanogpt, nanochat) instead of tanh-GELU
    "zeroproj": {"zeroproj": True},  # attention and MLP output projections start at zero (modded-nanogpt)
    "muon": {"muon": True},  # block matrices by Muon (torch.optim.Muon, AdamW-matched rms), the rest by AdamW
})


def _generic(part: str) -> dict | None:
    for prefix, key, conv in (("llr", "local_lr", float), ("lr", "lr", float), ("wd", "wd", float),
                              ("W", "W_cfg", int), ("warm", "warmup", int),
                              ("gemb", "gemb", float)):
        m = re.fullmatch(prefix + r"([0-9.e-]+)", part)
        if m:
            return {key: conv(m.group(1))}
    return None


def opts_of(variant: str) -> dict:
    o: dict = {}  # "a+b" combines variants
    for part in ([variant] if variant in VARIANTS else variant.split("+")):
        extra = VARIANTS.get(part)
        if extra is None:
            extra = _generic(part)
        if extra is None:
            raise KeyError(f"unknown variant part {part!r}")
        if "cfg" in extra and "cfg" in o:
            extra = {**extra, "cfg": {**o["cfg"], **extra["cfg"]}}
        o.update(extra)
    return o


class Exp(Megabyte):
    def __init__(self, cfg, o: dict, seed: int) -> None:
        cfg = cfg.replace(local_context=0, local_norms=False)  # variants start from the paper's design
        super().__init__(cfg)
        self.o = o
        c = cfg
        P, G, DL = c.patch_size, c.global_dim, c.local_dim
        self.arr, self.W = o.get("arr", "paper"), o.get("W", 0)
        L = {"paper": P, "prefix": self.W + P - 1, "offset": P + 1}[self.arr]
        if L != P:
            self.local_model = TransformerStack(DL, c.local_layers, c.local_heads, c.mlp_ratio, c.bias, c.dropout,
                                                L, c.pos_emb == "rope", c.rope_base)
        if o.get("fullproj"):
            self.global_to_local = nn.Linear(G, P * DL, bias=False)
        if o.get("lin_norm"):
            self.lin_norm = nn.LayerNorm(DL, bias=c.bias)
        if o.get("sep_norm"):
            self.emb_norm = nn.LayerNorm(DL, bias=c.bias)
            self.ctx_norm = nn.LayerNorm(DL, bias=c.bias)
        torch.manual_seed(seed)
        depth = max(c.global_layers, c.local_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2 and not name.endswith("_pad"):
                continue
            if name.endswith("proj.weight"):
                n = depth
                if o.get("per_stack"):
                    n = c.global_layers if name.startswith("global_model") else c.local_layers
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n))
            else:
                nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.local_embed.weight, std=o.get("lemb_std", 0.02))
        nn.init.normal_(self.global_to_local.weight, std=0.02 * o.get("gl_scale", 1.0))
        if o.get("tie"):
            self.lm_head.weight = self.local_embed.weight
        self.diag = {}

    def _to_local(self, g_out):
        P, DL = self.config.patch_size, self.config.local_dim
        if self.o.get("fullproj"):
            return self.global_to_local(g_out).unflatten(-1, (P, DL))
        return super()._to_local(g_out)

    def _combine(self, e, ctx):
        self.diag = {"emb_rms": e.pow(2).mean().sqrt().item(), "ctx_rms": ctx.pow(2).mean().sqrt().item()}
        if self.o.get("sep_norm"):
            return self.emb_norm(e) + self.ctx_norm(ctx)
        h = e + ctx
        return self.lin_norm(h) if self.o.get("lin_norm") else h

    def forward(self, x):
        x = x.long()
        B, T = x.shape
        c = self.config
        P, G, DL = c.patch_size, c.global_dim, c.local_dim
        K = -(-T // P)
        if K * P != T:
            x = F.pad(x, (0, K * P - T))
        g_in = torch.cat((self.global_pad.expand(B, 1, G), self._patch_embed(x[:, : (K - 1) * P], 0)), dim=1)
        g_out = self.global_model(g_in)
        ctx = self._to_local(g_out).reshape(B * K, P, DL)
        pad = self.local_pad.view(1, 1, DL)
        if self.arr == "paper":
            prev = torch.roll(x.reshape(B * K, P), shifts=1, dims=1)
            e = self.local_embed(prev)
            e = torch.cat((pad.expand(B * K, 1, DL), e[:, 1:]), dim=1)
            out = self.local_model(self._combine(e, ctx))
            logits = self.lm_head(out).view(B, K * P, -1)
        elif self.arr == "prefix":  # local for patch k reads x_{kP-W} .. x_{kP+P-2}; last P outputs predict patch k
            W = self.W
            e = torch.cat((pad.expand(B, W, DL), self.local_embed(x)), dim=1)  # (B, W + KP, DL)
            e = e.unfold(1, W + P - 1, P).permute(0, 1, 3, 2).reshape(B * K, W + P - 1, DL)
            if self.o.get("ctx_global"):  # context bytes get their own patch's contribution (bytelm: context_global)
                per_patch = ctx.view(B, K, P, DL)
                prev = torch.cat((per_patch.new_zeros(B, 1, P, DL), per_patch[:, :-1]), dim=1)[:, :, P - W + 1 :]
                ctx = torch.cat((prev.reshape(B * K, W - 1, DL), ctx), dim=1)
            else:
                ctx = torch.cat((ctx.new_zeros(B * K, W - 1, DL), ctx), dim=1)
            out = self.local_model(self._combine(e, ctx))[:, W - 1:]
            logits = self.lm_head(out).view(B, K * P, -1)
        else:  # offset: [pad, x_kP .. x_kP+P-1], ctx slices on positions 1..P; position j predicts x_{kP+j}
            e = torch.cat((pad.expand(B * K, 1, DL), self.local_embed(x.reshape(B * K, P))), dim=1)
            ctx = torch.cat((ctx.new_zeros(B * K, 1, DL), ctx), dim=1)
            out = self.lm_head(self.local_model(self._combine(e, ctx))).view(B, K, P + 1, -1)
            logits = torch.cat((out[:, 0, :1], out[:, :, 1:].reshape(B, K * P, -1)[:, : T - 1]), dim=1)
        return logits[:, :T]


def reinit(m: nn.Module, o: dict, depth: dict[str, int]) -> None:
    """Re-initialise bytelm's model `m` as option o asks: PyTorch's defaults (init=torch), or GPT-2's with the
    residual projections scaled by each stack's own depth (res_scale=stack) or not at all (none), times init_mult."""
    if o.get("init") == "fannormal":
        for name, p in m.named_parameters():
            if p.dim() >= 2 or name.endswith("_pad"):
                nn.init.normal_(p, std=(3 * p.shape[1]) ** -0.5 if "embed" not in name and p.dim() >= 2 else 1.0)
        return
    if o.get("init") == "torch":
        for mod in m.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                mod.reset_parameters()
        for name, p in m.named_parameters():
            if name.endswith("_pad"):
                nn.init.normal_(p)
        return
    mult = o.get("init_mult", 1.0)
    for name, p in m.named_parameters():
        if p.dim() < 2 and not name.endswith("_pad"):
            continue
        std = 0.02 * mult
        if name.endswith("proj.weight") and o.get("res_scale") != "none":
            n = next((v for k, v in depth.items() if name.startswith(k)), depth[""])
            std /= math.sqrt(2 * n)
        nn.init.normal_(p, std=std)


def build(variant: str, seed: int):
    cfg = suites.get("full").megabyte
    o = opts_of(variant)
    torch.manual_seed(seed)
    if o.get("peer"):
        return peer.build_peer(cfg, 1024), peer.peer_logits, o
    if o.get("mblm"):
        return peer.build_mblm(cfg, 1024), peer.mblm_logits, o
    if o.get("tf"):
        from bytelm import ByteTransformer

        return ByteTransformer(suites.get("full").transformer_eq), (lambda mm, x: mm(x)), o
    if o.get("bl"):
        c = cfg.replace(**o.get("cfg", {}))
        if "W_cfg" in o:
            c = c.replace(local_context=o["W_cfg"])
        m = Megabyte(c)
        if "init" in o or "res_scale" in o or "init_mult" in o:
            torch.manual_seed(seed)
            both = max(c.global_layers, c.local_layers)
            depth = ({"global_model": c.global_layers, "local_model": c.local_layers, "": both}
                     if o.get("res_scale") == "stack" else {"": both})
            reinit(m, o, depth)
        if "gemb" in o:
            nn.init.normal_(m.global_embed.weight, std=o["gemb"])
        if o.get("head_bias"):
            m.lm_head = nn.Linear(c.local_dim, 256, bias=True)
            nn.init.normal_(m.lm_head.weight, std=0.02)
            nn.init.zeros_(m.lm_head.bias)
        if o.get("fullproj"):  # megabyte-pytorch's global-to-local: one G -> P*D_L matrix, every slice from all of G
            P, DL = c.patch_size, c.local_dim
            m.global_to_local = nn.Linear(c.global_dim, P * DL, bias=False)
            nn.init.normal_(m.global_to_local.weight, std=(3 * c.global_dim) ** -0.5 if c.init == "fan_in" else 0.02)
            m._to_local = lambda g: m.local_ctx_norm(m.global_to_local(g).unflatten(-1, (P, DL)))
        _block_parts(m, o)
        if o.get("gnorm"):
            m.global_in_norm = nn.LayerNorm(c.global_dim, bias=False)
            embed = m._patch_embed
            m._patch_embed = lambda x, start: m.global_in_norm(embed(x, start))
        return m, (lambda mm, x: mm(x)), o
    return Exp(cfg, o, seed), (lambda mm, x: mm(x)), o


def _block_parts(m: nn.Module, o: dict) -> None:
    """The block-level parts (qknorm, relu2, zeroproj) on every block of m's stacks."""
    from bytelm.nn.attention import Attention
    from bytelm.nn.blocks import MLP

    for mod in m.modules():
        if isinstance(mod, Attention) and o.get("qknorm"):
            mod.forward = _qknorm_forward.__get__(mod)
        if isinstance(mod, MLP) and o.get("relu2"):
            mod.forward = (lambda self: lambda x: self.proj(F.relu(self.fc(x)).square()))(mod)
        if o.get("zeroproj") and isinstance(mod, (Attention, MLP)):
            nn.init.zeros_(mod.proj.weight)


def _qknorm_forward(self, x, rope=None, cache=None, pos=0, rows=None, span=None):
    from bytelm.nn.rotary import apply_rope

    B, T, C = x.shape
    qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
    if rope is not None:
        q, k = apply_rope(torch.stack((q, k)), *rope).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
    return self.proj(y.transpose(1, 2).reshape(B, T, C))


def optimizer(m, o, lr):
    """The benchmarks' AdamW (bytelm's make_optimizer); the local stack, ours or megabyte-pytorch's, at o["local_lr"]
    times the rate."""
    local = (*get_spec("megabyte").stacks["local"], *peer.PEER_LOCAL, *peer.MBLM_LOCAL)
    opt = bytelm_optimizer(m, lr, weight_decay=o.get("wd", 0.1), local=local, local_lr_scale=o.get("local_lr", 1.0),
                           optimizer="muon" if o.get("muon") else "adamw")
    if o.get("wd_emb") is False:  # split the embeddings out of the decayed groups
        if o.get("muon"):
            raise KeyError("wdemb0 rebuilds an AdamW from the groups: it cannot be combined with muon")
        emb = {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.Embedding)}
        groups = []
        for g in opt.param_groups:
            keep = [p for p in g["params"] if id(p) not in emb]
            out = [p for p in g["params"] if id(p) in emb]
            if keep:
                groups.append({**g, "params": keep})
            if out:
                groups.append({**g, "params": out, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    return opt


def one(variant: str, seed: int, steps: int, windows: int = 64) -> dict:
    train, val, _ = load_split(None)
    m, logits, o = build(variant, seed)
    lr_max = o.get("lr", 2e-3)
    opt = optimizer(m, o, lr_max)
    sampler = WindowSampler(train, 1024, 8, seed=1337)
    warm = o.get("warmup", 20)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(o.get("bf16")))
    t0 = time.time()
    for i in range(steps):
        lr = lr_max * min(1, (i + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * i / steps)))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x = sampler.next_batch()
        with cast:
            out = logits(m, x)
        optimizer_step(m, opt, byte_loss(out, x))
    secs = time.time() - t0
    ev = WindowSampler(val, 1024, 1, seed=2024)
    m.eval()
    with torch.no_grad():
        held_out = torch.cat([ev.next_batch() for _ in range(windows)])
        nats = F.cross_entropy(logits(m, held_out).flatten(0, 1), held_out.flatten(), reduction="none")
    P = suites.get("full").megabyte.patch_size
    by_pos = nats.view(windows, -1, P).mean(dim=(0, 1)) / math.log(2)
    return {"variant": variant, "seed": seed, "steps": steps, "lr": lr_max,
            "val_bpb": nats.mean().item() / math.log(2),
            "bpb_by_patch_position": [round(v, 4) for v in by_pos.tolist()],
            "seconds": secs, "s_per_step": secs / steps,
            "params": sum(p.numel() for p in m.parameters()), "diag": getattr(m, "diag", {})}


@torch.no_grad()
def causal_check(variant: str, T: int = 40) -> bool:
    """logits[:, t] must not change when x[:, t:] changes, for every t (incl. a T not a multiple of P)."""
    m, logits, _ = build(variant, 0)
    m.eval()
    g = torch.Generator().manual_seed(0)
    ok = True
    for TT in (T, T + 3):
        x = torch.randint(0, 256, (2, TT), generator=g)
        base = logits(m, x)
        for t in range(TT):
            y = x.clone()
            y[:, t:] = torch.randint(0, 256, (2, TT - t), generator=g)
            d = (logits(m, y)[:, : t + 1] - base[:, : t + 1]).abs().max().item()
            if d > 1e-5:
                ok = False
                print(f"  {variant}: T={TT} t={t} leak {d:.2e}")
                break
        # and it must depend on the past: changing x[:, t-1] must change logits[:, t] somewhere
    print(f"causal {variant}: {'OK' if ok else 'LEAK'}")
    return ok


DESC = {
    "ours": "bytelm MEGABYTE as committed (paper: local position 0 reads a pad)",
    "peer": "megabyte-pytorch 0.3.6 at the same shape",
    "prefix8": "local also reads the previous 8 bytes (cross-patch, W=8)",
    "prefix4": "local also reads the previous 4 bytes (W=4)",
    "prefix1": "W=1: true previous byte instead of the pad",
    "offset": "peer's arrangement: local reads [pad, x_kP..x_kP+P-1], predicts x_kP+1..x_kP+P",
    "sepnorm": "separate LayerNorms on local byte embedding and global contribution",
    "linnorm": "one LayerNorm on the summed local input",
    "lemb0.1": "local byte embedding init N(0, 0.1)",
    "glx0.2": "W_GL init x0.2",
    "stackinit": "residual init by each stack's own depth",
    "fullproj": "full global-to-local projection G -> P*D_L (peer's)",
    "fullproj-sepnorm": "full G->P*D_L projection + sepnorm",
    "fullproj-glx": "full projection, init std /sqrt(P)",
    "tie": "tied output head",
    "locallr2": "local stack, embedding, head at 2x lr",
    "lr4e-3": "lr 4e-3",
    "lr6e-3": "lr 6e-3",
    "qknorm": "RMS-normalised queries and keys",
    "relu2": "relu(x)^2 MLP",
    "zeroproj": "output projections start at zero",
    "muon": "Muon (torch.optim.Muon, AdamW-matched rms) for block matrices",
}
DESC["ctxglobal"] = "the window's earlier bytes also get their own patch's global contribution"
DESC["ours"] = "bytelm 0.1's MEGABYTE, the paper's design (local position 0 reads a pad)"


DESC.update({
    "bl": "bytelm 0.2's MEGABYTE (the real class: local_context 4, local_norms, GPT-2 init)",
    "fannormal": "fan_in's variances from a normal draw: N(0, 1/(3 fan_in)) Linear, N(0, 1) embeddings and pads",
    "faninit": "init scheme fan_in (PyTorch's kaiming-uniform Linear, N(0, 1) embeddings and pads)",
    "mblm": "mblm 0.4.2 at the same shape",
    "tf": "bytelm's byte transformer of equal parameters (256 x 8)",
    "torchinit": "PyTorch's default inits (kaiming-uniform Linear, N(0, 1) embeddings and pads)",
    "noresscale": "residual projections N(0, 0.02), not scaled by depth",
    "initx2": "every init std x2",
    "initx0.5": "every init std x0.5",
    "wdemb0": "no weight decay on embeddings",
    "bf16": "bf16 autocast (CPU)",
    "headbias": "a bias on the output head",
    "ctxg": "context_global: the window's earlier bytes also get their global contributions",
    "gnorm": "LayerNorm over each patch vector at the global model's input",
    "bias": "biases in Linear and LayerNorm",
    "nonorms": "local_norms off",
})
DESC["stackinit"] = "residual init by each stack's own depth"


def _desc_part(p: str) -> str:
    if p in DESC:
        return DESC[p]
    g = _generic(p) or {}
    names = {"lr": "lr {}", "local_lr": "local stack at {}x lr", "wd": "weight decay {}", "W_cfg": "local_context {}",
             "warmup": "warm-up {} steps",
             "gemb": "global byte embedding init N(0, {})"}
    return ", ".join(names[k].format(v) for k, v in g.items()) or p


def desc(v: str) -> str:
    return " + ".join(_desc_part(p) for p in v.split("+"))


def table() -> str:
    """design.jsonl -> a markdown table: one row per (variant, steps), mean over seeds, spread = max - min."""
    import statistics as st

    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["steps"]), []).append(r)
    out = ["# MEGABYTE design experiments (`python -m benchmarks.design`)", "",
           "Benchmark shape (P=8, global 256 x 8, local 64 x 2), batch 8 x 1,024 stdlib bytes, the same batches for "
           "every run, AdamW (0.9, 0.95), warm-up 20 steps then cosine to 10%; val bpb over the same 64 held-out "
           "windows of 1,024 bytes. Seeds are model-init seeds; spread = max - min. s/step: measured in runs that "
           "shared the machine, so noisy.", "",
           "| variant | description | steps | seeds | mean val bpb | spread | first-byte bpb | other bytes bpb | "
           "params | s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (v, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], st.mean(r["val_bpb"] for r in kv[1]))):
        b = [r["val_bpb"] for r in rs]
        first = st.mean(r["bpb_by_patch_position"][0] for r in rs)
        other = st.mean(sum(r["bpb_by_patch_position"][1:]) / 7 for r in rs)
        spread = f"{max(b) - min(b):.3f}" if len(b) > 1 else "-"
        seeds = ",".join(str(r["seed"]) for r in rs)
        out.append(f"| {v} | {desc(v)} | {n} | {seeds} | {st.mean(b):.3f} | {spread} | {first:.3f} | {other:.3f} | "
                   f"{rs[0]['params'] / 1e6:.3f}M | {st.mean(r['s_per_step'] for r in rs):.3f} |")
    return "\n".join(out) + "\n"


def main(argv):
    if argv and argv[0] == "--one":
        v, s, n = argv[1], int(argv[2]), int(argv[3])
        print(json.dumps(one(v, s, n)))
        return
    if argv and argv[0] == "--table":
        md = table()
        RESULTS.with_suffix(".md").write_text(md)
        print(md)
        return
    if argv and argv[0] == "--causal":
        for v in argv[1:]:
            causal_check(v)
        return
    for spec in argv:
        v, s, *rest = spec.split(":")
        n = int(rest[0]) if rest else 150
        opts_of(v)  # fail early on typos
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-m", "benchmarks.design", "--one", v, s, str(n)], capture_output=True,
                           text=True, cwd=ROOT, env=env)
        if r.returncode != 0:
            print(f"{spec} FAILED\n{r.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        pos = row["bpb_by_patch_position"]
        print(f"{spec}: {row['val_bpb']:.4f}  first {pos[0]:.3f} rest {sum(pos[1:]) / 7:.3f}  "
              f"{row['s_per_step']:.3f}s/step  {row['params']}  {row['diag']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

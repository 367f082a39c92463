"""Weight initialisation: two schemes.

    gpt2    N(0, 0.02) weights and embeddings, zero biases, residual output projections scaled by 1/sqrt(2 * layers)
            (Radford et al. 2019): bytelm 0.1/0.2's MEGABYTE, and the byte transformer's
    fan_in  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) Linear weights (PyTorch's default kaiming-uniform), N(0, 1) embeddings
            and learned pads, zero biases, no depth scaling: PyTorch's defaults, as megabyte-pytorch and mblm train.
            bytelm's MEGABYTE default: at the benchmark shape and its default recipe it learns more per step than
            with gpt2 (docs/logbook.md, bytelm 0.3). A normal draw of the same variance was
            measured worse and erratic (2.970 and 2.879 bpb at two seeds, against 2.842 and 2.840 for the uniform
            one), so the draw is PyTorch's own.
"""

from __future__ import annotations

import math

from torch import nn

INIT_SCHEMES = ("fan_in", "gpt2")


def init_weights(model: nn.Module, num_layers: int, scheme: str = "gpt2") -> None:
    """Initialise `model`'s Linear, Embedding and learned pad (`*_pad`, `*bos`) parameters in place; norms keep their
    defaults (ones / zeros). `num_layers` scales gpt2's residual projections (`*proj.weight`)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    fan_in = scheme == "fan_in"
    linears = {id(m.weight): m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    for name, p in model.named_parameters():
        if p.dim() < 2 and not name.endswith("_pad") and not name.endswith("bos"):
            continue  # LayerNorm weights/biases and Linear biases keep their defaults (ones / zeros)
        if fan_in and id(p) in linears:
            bound = 1.0 / math.sqrt(linears[id(p)])
            nn.init.uniform_(p, -bound, bound)
            continue
        if fan_in:
            std = 1.0
        elif name.endswith("proj.weight"):
            std = 0.02 / math.sqrt(2 * num_layers)
        else:
            std = 0.02
        nn.init.normal_(p, mean=0.0, std=std)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

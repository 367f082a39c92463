"""Weight initialisation."""

from __future__ import annotations

import math

from torch import nn


def init_weights(model: nn.Module, num_layers: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and residual output projections scaled by
    1/sqrt(2 * layers) so the residual stream's variance does not grow with depth (Radford et al. 2019)."""
    for name, p in model.named_parameters():
        if p.dim() < 2 and not name.endswith("_pad") and not name.endswith("bos"):
            continue  # LayerNorm weights/biases and Linear biases keep their defaults (ones / zeros)
        if name.endswith("proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * num_layers))
        else:
            nn.init.normal_(p, mean=0.0, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

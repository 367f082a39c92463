"""`bytelm presets`: every model type's named presets and their parameter counts."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .options import parse


@dataclass
class PresetsArgs:
    """The named model presets of every model type, with their parameter counts."""


def main(argv: list[str]) -> int:
    import torch

    from ..models import build, config_class, model_types

    parse(PresetsArgs, argv, "bytelm presets")
    for mt in model_types():
        cls = config_class(mt)
        print(f"{mt}:")
        for name in cls.presets:
            with torch.device("meta"):  # count parameters without allocating them
                n = build(cls.from_name(name)).num_params()
            print(f"  {name:<11} {n / 1e6:>8,.1f}M params  {json.dumps(cls.presets[name])}")
    return 0

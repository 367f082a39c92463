"""Bits per byte of a model over a whole input, in the paper's chunked, sliding and strided modes."""

from .bpb import MODES, EvalResult, evaluate

__all__ = ["MODES", "EvalResult", "evaluate"]

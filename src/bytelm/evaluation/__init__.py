"""Bits per byte of a model over a whole input, in the paper's chunked, sliding and strided modes, and what real
codecs make of the same bytes."""

from .bpb import MODES, EvalResult, evaluate
from .codecs import codec_bpb, per_unit

__all__ = ["MODES", "EvalResult", "codec_bpb", "evaluate", "per_unit"]

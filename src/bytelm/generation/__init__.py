"""Sampling and decoding over the model protocol (new_state / prefill / decode_step): one decoding engine for the
CLI, the server and the swarm client."""

from .decode import Decodable, as_tensor, check_request, decode, generate, stream
from .engine import SamplingParams
from .sampling import check_sampling, sample

__all__ = ["Decodable", "SamplingParams", "as_tensor", "check_request", "check_sampling", "decode", "generate",
           "sample", "stream"]

"""Sampling and decoding over the model protocol (new_state / prefill / decode_step): one decoding engine for the
CLI, the server and the swarm client."""

from .constrain import JsonSchema
from .decode import decode, generate, stream
from .engine import Engine
from .protocol import Decodable, as_tensor, check_request
from .sampling import SamplingMetadata, SamplingParams, check_sampling, sample, sample_batch

__all__ = ["Decodable", "Engine", "JsonSchema", "SamplingMetadata", "SamplingParams", "as_tensor", "check_request",
           "check_sampling", "decode", "generate", "sample", "sample_batch", "stream"]

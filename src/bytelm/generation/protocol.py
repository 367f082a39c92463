"""What the decoding loop needs of a model (the protocol bytelm.models.ByteLM implements) and the checks every
generation request passes before any work is done. Below bytelm.models: it names no model class."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..errors import GenerationError
from ..nn import Step
from .sampling import check_length, check_sampling, check_seed


class DecodeState(Protocol):
    global_steps: int  # runs of the model's big part so far (MEGABYTE: batched global steps): a serving metric


class Decodable(Protocol):
    """What generation needs of a model: exactly what the engine calls (bytelm.models.ByteLM implements it)."""

    config: Any  # .max_seq_len
    device: torch.device
    prefill_align: int  # a prompt's chunks after the first start at multiples of this (MEGABYTE: P)
    decode_period: int  # decode steps between runs of the model's big part (MEGABYTE: P; else 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, T) -> logits (B, T, 256)
    def check_state_memory(self, batch: int, max_len: int, hint: str = "") -> None: ...
    def new_state(self, batch: int, max_len: int) -> DecodeState: ...
    def compile_decode(self) -> None: ...  # capture decode_step's heavy parts with torch.compile
    # x (n, T) right padded, step: rows, byte positions, lengths -> (n, 256) after each row's last byte
    def prefill(self, x: torch.Tensor, state: DecodeState, step: Step) -> torch.Tensor: ...
    # byte (n,) at positions step.at -> (n, 256)
    def decode_step(self, byte: torch.Tensor, state: DecodeState, step: Step) -> torch.Tensor: ...


def as_tensor(model: Decodable, prompt: bytes | bytearray | torch.Tensor) -> torch.Tensor:
    """A prompt as a LongTensor (B, L) on the model's device, or a `GenerationError` saying what is wrong with it."""
    if isinstance(prompt, (bytes, bytearray)):
        return torch.tensor(list(prompt), dtype=torch.long, device=model.device).view(1, -1)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            prompt = prompt.view(1, -1)
        if prompt.dim() != 2 or prompt.shape[0] < 1:
            raise GenerationError(f"a tensor prompt must be (B, L) byte values, got shape {tuple(prompt.shape)}")
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise GenerationError(f"a tensor prompt must hold integer byte values, got dtype {prompt.dtype}")
        if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) > 255):
            raise GenerationError("a tensor prompt must hold byte values in 0..255")
        return prompt.to(device=model.device, dtype=torch.long)
    if isinstance(prompt, str):
        raise GenerationError("the prompt must be bytes, not str: encode it first, e.g. prompt.encode('utf-8')")
    raise GenerationError(f"the prompt must be bytes or a LongTensor (B, L), got {type(prompt).__name__}")


def check_request(model: Decodable, prompt_len: int, max_new_bytes: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> None:
    """Everything about a generation request that can be wrong, checked before any work is done."""
    check_sampling(temperature, top_k, top_p)
    check_seed(seed)
    check_length(prompt_len, max_new_bytes, model.config.max_seq_len)

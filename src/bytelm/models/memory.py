"""How much memory a model, its decoding state and its training activations take, measured on a skeleton: the model
built on the meta device (shapes only, nothing allocated, no initialisation), so the figures are exact for its
tensors and free to get, whatever the config says. The checks built on them (bytelm.devices.check_memory) refuse a
config.json of a 13 TB model, a --max-streams or --batch-size too large for the device, before anything is allocated.

    skeleton(config)                      the model on the meta device (cached per config and dtype)
    weights_nbytes(config)                its parameters and buffers (rope tables too), in bytes
    state_nbytes(model, batch, max_len)   what `model.new_state(batch, max_len)` allocates (its KV caches)
    training_activations(config, seq_len) what one training sequence keeps for the backward pass
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..devices import check_memory
from ..errors import ConfigError
from ..nn import Block, TransformerStack
from . import registry
from .loss import LOSS_CHUNK_BYTES

_INIT_FUNCTIONS = {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "orthogonal_"}
_LIKE_FUNCTIONS = {torch.zeros_like, torch.empty_like, torch.ones_like}


class _FusedAttention(torch.autograd.Function):
    """Shapes of a fused attention kernel (flash or memory-efficient, what SDPA runs on CUDA and on a CPU): it saves
    q, k, v, its output and a log-sum-exp per query, never the (T, S) scores that SDPA's math path, the one it takes
    on meta tensors, would save."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the meta forward is only measured
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


class _ShapesOnly(TorchFunctionMode):
    """Meta tensors without the slow paths: weight initialisation's random draws are skipped (on meta there is nothing
    to draw) and `zeros_like` & co. become `empty`; both would otherwise reach torch's Python meta kernels, whose
    first use imports torch._dynamo (a second or more, in every process that checks a size). And attention saves
    what a fused kernel saves (`_FusedAttention`), as it does on a real device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INIT_FUNCTIONS:
            return args[0] if args else kwargs.get("tensor", kwargs.get("self"))
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = args[:3]
            return _FusedAttention.apply(q, k, v, kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        if func in _LIKE_FUNCTIONS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            like = args[0]
            return torch.empty(like.shape, dtype=kwargs.get("dtype") or like.dtype, device="meta")
        return func(*args, **kwargs)


def build_skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh model of `config` on the meta device: every tensor's shape and dtype, no memory, no values. A config
    whose sizes overflow what torch can describe is a `ConfigError`."""
    cls = registry.get_spec(config.model_type).model_class
    try:
        with torch.inference_mode(False), torch.device("meta"), _ShapesOnly():
            model = cls(config)
        return model.to(dtype) if dtype != torch.float32 else model
    except (RuntimeError, OverflowError, ValueError) as e:
        raise ConfigError(f"{config.model_type} config: its sizes are too large to describe a model "
                          f"({str(e).splitlines()[0][:200]})") from None


_CACHE: OrderedDict[tuple, nn.Module] = OrderedDict()


class _NoCaches(nn.Module):
    """Stands in for a stack whose caches live elsewhere (a swarm's remote stack): none here."""

    def new_caches(self, *args, **kwargs) -> list:
        return []


def skeleton(config, dtype: torch.dtype = torch.float32, remote: tuple[str, ...] = ()) -> nn.Module:
    """`build_skeleton(config, dtype)`, cached (a few configs): shared, so do not change it. `remote`: children
    (stacks) replaced by stand-ins without caches, for a model that runs them elsewhere."""
    key = (config.model_type, json.dumps(config.to_dict(), sort_keys=True), dtype, remote)
    if key not in _CACHE:
        model = build_skeleton(config, dtype)
        for name in remote:
            setattr(model, name, _NoCaches())
        _CACHE[key] = model
        while len(_CACHE) > 8:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (persistent or not: rope tables too)."""
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))


def weights_nbytes(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a model of `config` takes in `dtype`: its parameters and buffers."""
    return module_nbytes(skeleton(config, dtype))


def _tensors(obj: Any, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from a decoding state (dataclasses, lists, objects)."""
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        if id(st) in seen:
            return 0
        seen.add(id(st))
        return st.nbytes()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensors(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(_tensors(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensors(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        return sum(_tensors(x, seen) for x in vars(obj).values())
    return 0


def state_nbytes(model: nn.Module, batch: int, max_len: int) -> int:
    """Bytes `model.new_state(batch, max_len)` allocates, from the state built on the model's skeleton. A stack the
    model runs elsewhere (bytelm.swarm's remote stack, not a TransformerStack here) holds no caches here."""
    skel = skeleton(model.config, model.dtype)
    remote = tuple(name for name, child in skel.named_children() if isinstance(child, TransformerStack)
                   and not isinstance(getattr(model, name, None), TransformerStack))
    if remote:  # its remote stacks hold no caches here
        skel = skeleton(model.config, model.dtype, remote)
    def measure(rows: int) -> int:
        try:
            with torch.inference_mode(), torch.device("meta"), _ShapesOnly():
                return _tensors(skel.new_state(rows, max_len), set())
        except (RuntimeError, OverflowError) as e:
            raise ConfigError(f"a decoding state of {rows:,} x {max_len:,} bytes is too large to describe "
                              f"({str(e).splitlines()[0][:200]})") from None

    # a state grows by the same bytes per row: measured at 1, 2 and 3 rows, not at `batch` (whose per-row host lists
    # alone could be too large to make)
    one, two, three = measure(1), measure(2), measure(3)
    if batch <= 3 or three - two != two - one:
        return measure(batch)
    return one + (batch - 1) * (two - one)


def check_state_memory(model: nn.Module, batch: int, max_len: int, hint: str = "") -> None:
    """Refuse a decoding state of `batch` rows of up to `max_len` bytes that the model's device cannot hold (a
    `MemoryLimitError` with the estimate), before `new_state` allocates it."""
    if model.device.type == "meta":
        return
    need = state_nbytes(model, batch, max_len)
    rows = f"{batch:,} stream{'s' if batch != 1 else ''}"
    check_memory(need, model.device, f"a decoding state (KV caches) for {rows} of up to {max_len:,} bytes", [],
                 hint or "decode fewer streams at once, or shorter sequences")


def lora_shapes(config, target: str, rank: int) -> dict[str, tuple[int, ...]]:
    """name -> shape of each LoRA matrix (A: rank x in, B: out x rank) that adapters of `rank` on the Linear layers
    whose names match the regex `target` (fully, as peft matches a string) add to a model of `config`."""
    pattern = re.compile(target)
    shapes = {}
    for name, m in skeleton(config).named_modules():
        if isinstance(m, nn.Linear) and pattern.fullmatch(name):
            shapes[f"{name}.lora_A.default.weight"] = (rank, m.in_features)
            shapes[f"{name}.lora_B.default.weight"] = (m.out_features, rank)
    return shapes


@dataclasses.dataclass(frozen=True)
class Activations:
    """What one training sequence of `seq_len` bytes keeps for the backward pass (batch 1: it scales with the batch),
    measured on a skeleton's forward pass and loss: every tensor autograd saves, each storage once, weights left
    out; fp32.

    With activation checkpointing (bytelm.training.enable_activation_checkpointing) the step keeps what runs outside
    the recomputed segments, and each segment's inputs; in the backward pass one segment at a time is recomputed and
    holds all it saves: a transformer block (of a stack not run in chunks), or one chunk of the chunked loss
    (`LOSS_CHUNK_BYTES` bytes of the batch: MEGABYTE's local model, the head and the cross-entropy)."""

    seq_len: int
    saved: int  # bytes saved, no activation checkpointing
    kept: int  # with checkpointing: saved outside the segments, plus every segment's inputs
    block: int  # with checkpointing: the largest block, recomputed in the backward pass
    chunk: int  # with checkpointing: the largest chunk of the chunked loss, recomputed in the backward pass
    chunk_bytes: int = LOSS_CHUNK_BYTES  # the bytes of the batch one chunk covers

    @property
    def checkpointed(self) -> int:
        """Bytes with activation checkpointing, batch 1: what is kept, plus the largest segment recomputed."""
        return min(self.kept + max(self.block, self.chunk), self.saved)

    def nbytes(self, batch: int, checkpointing: bool = False) -> int:
        if not checkpointing:
            return batch * self.saved
        # a chunk covers `chunk_bytes` of the whole batch: it grows with the batch only while the batch is smaller
        one = min(self.seq_len, self.chunk_bytes)
        chunk = self.chunk * min(batch * self.seq_len, self.chunk_bytes) // one
        return batch * self.kept + max(batch * self.block, chunk)


def _saved_by_segment(model: nn.Module, x: torch.Tensor, params: set[int], chunked: bool
                      ) -> dict[str, int]:
    """One forward pass and loss of `model` (a skeleton) on x, in bytes: all autograd saves (`total`), what it saves
    outside every segment (`outside`), the segments' inputs (`inputs`), the largest `block` and `chunk`. Segments:
    the transformer blocks, and with `chunked` the chunks of the chunked loss (measured through `ByteLM.recompute`,
    run here without checkpointing), whose inner blocks belong to the chunk."""
    saved: dict[int, tuple[torch.UntypedStorage, tuple[str, int]]] = {}  # storage -> (storage, segment)
    inputs: dict[int, int] = {}  # storage of a segment's input -> bytes (each storage once: views share one)
    current = [("", -1)]  # the segment running now (kind, index; -1: none)

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if id(st) not in params and id(st) not in saved:
            saved[id(st)] = (st, current[0])
        return t

    def enter(segment, tensors) -> tuple[str, int]:
        outer = current[0]
        if outer[1] < 0:  # a block inside a chunk belongs to the chunk
            current[0] = segment
            for t in tensors:
                inputs[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return outer

    def enter_block(module, args, i):
        enter(("block", i), args[:1])

    hooks, chunks = [], [0]
    inside = {id(b) for name in getattr(model, "chunked_stacks", ()) for b in model.get_submodule(name).modules()}
    for i, block in enumerate(m for m in model.modules() if isinstance(m, Block)):
        if chunked and id(block) in inside:
            continue
        hooks += [block.register_forward_pre_hook(functools.partial(enter_block, i=i)),
                  block.register_forward_hook(lambda module, args, out: current.__setitem__(0, ("", -1)))]
    if chunked:
        def recompute(fn, *args):
            chunks[0] += 1
            # a chunk reads the tensors it closes over (the global outputs, the windows): what checkpointing keeps
            outer = enter(("chunk", chunks[0]), [c.cell_contents for c in fn.__closure__ or ()
                                                 if isinstance(c.cell_contents, torch.Tensor)])
            try:
                return fn(*args)
            finally:
                current[0] = outer

        model.loss_chunk_bytes, model.recompute = LOSS_CHUNK_BYTES, recompute
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, loss="mean")
    finally:
        for h in hooks:
            h.remove()
        if chunked:
            del model.loss_chunk_bytes, model.recompute
    per: dict[tuple[str, int], int] = {}
    for st, segment in saved.values():
        per[segment] = per.get(segment, 0) + st.nbytes()
    total = sum(per.values())
    largest = {kind: max((n for (k, _), n in per.items() if k == kind), default=0) for kind in ("block", "chunk")}
    return dict(total=total, outside=per.get(("", -1), 0), inputs=sum(inputs.values()), **largest)


@functools.lru_cache(maxsize=16)
def _activations(config_json: str, seq_len: int, lora: tuple[str, int, float] | None) -> Activations:

    config = registry.config_from_dict(json.loads(config_json))
    model = build_skeleton(config).train()
    params = {id(p.untyped_storage()) for p in model.parameters()}
    hooks = []
    if lora is not None:  # a LoRA fine-tune: the base frozen, y = W x + B A dropout(x) on the adapted layers
        target, rank, dropout = lora
        for p in model.parameters():
            p.requires_grad_(False)
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and re.fullmatch(target, name):
                a = torch.empty(rank, m.in_features, device="meta", requires_grad=True)
                b = torch.empty(m.out_features, rank, device="meta", requires_grad=True)
                params |= {id(a.untyped_storage()), id(b.untyped_storage())}

                def adapt(module, args, out, a=a, b=b):
                    x = F.dropout(args[0], dropout) if dropout > 0 else args[0]
                    return out + F.linear(F.linear(x, a), b)

                hooks.append(m.register_forward_hook(adapt))
    x = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    try:
        with torch.inference_mode(False), torch.enable_grad(), _ShapesOnly():
            plain = _saved_by_segment(model, x, params, chunked=False)
            ckpt = _saved_by_segment(model, x, params, chunked=True)
    except (RuntimeError, OverflowError) as e:
        raise ConfigError(f"{config.model_type} config: a training sequence of {seq_len:,} bytes is too large to "
                          f"describe ({str(e).splitlines()[0][:200]})") from None
    finally:
        for h in hooks:
            h.remove()
    return Activations(seq_len, plain["total"], ckpt["outside"] + ckpt["inputs"], ckpt["block"], ckpt["chunk"])


def training_activations(config, seq_len: int, lora: tuple[str, int, float] | None = None) -> Activations:
    """What one sequence of `seq_len` bytes keeps for the backward pass of a training step of a model of `config`
    (fp32; cached). `lora`: (target regex, rank, dropout) of a LoRA fine-tune, whose base is frozen."""
    return _activations(json.dumps(config.to_dict(), sort_keys=True), seq_len, lora)


__all__ = ["Activations", "build_skeleton", "check_state_memory", "lora_shapes", "module_nbytes", "skeleton",
           "state_nbytes", "training_activations", "weights_nbytes"]

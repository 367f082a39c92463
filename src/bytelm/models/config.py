"""Typed model configs with named presets.

Two model types share one interface (see `bytelm.models.base.ByteLM`):
  - `MegabyteConfig` -> `bytelm.Megabyte` (Yu et al. 2023, arXiv 2305.07185)
  - `TransformerConfig` -> `bytelm.ByteTransformer` (plain decoder-only byte transformer, the baseline)

A config is a dataclass; `to_dict()` / `from_dict()` are what `config.json` holds, and `from_dict` checks every
field's type (see bytelm.typedconfig). Which class a `model_type` names is bytelm.models.registry's business.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..data.media import ImageFormat, Media, parse_modality
from ..errors import ConfigError
from ..nn.init import INIT_SCHEMES
from ..typedconfig import TypedConfig

VOCAB_SIZE = 256  # every byte value, 0 included; there are no special tokens
MAX_SIZE = 2**31 - 1  # the most any size of a config may be (a width, a depth, a length): beyond it no model is built
# a depth past any trained transformer's (hundreds of layers): every layer is Python modules, so a config.json of
# 100,000 layers took 80 s to build even on the meta device, before its weights could be checked against it
MAX_LAYERS = 1024
POS_EMB_CHOICES = ("rope", "learned")
PATCHING_RULES = ("fixed", "space", "entropy")  # bytelm.models.patching


@dataclass
class ModelConfig(TypedConfig):
    """What every model config has: a `model_type`, named presets, and checks that name the bad field."""

    model_type: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # field -> (the version that added it, its value for a config.json written before then: the design it had)
    added_fields: ClassVar[dict[str, tuple[str, Any]]] = {}
    # fields a saved config.json may lack, taking their defaults: those that do not matter to a loaded model
    optional_when_loading: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def kind(cls) -> str:
        return cls.model_type

    @classmethod
    def from_name(cls, name: str, **overrides: Any):
        """A named preset, optionally with some fields overridden: `MegabyteConfig.from_name("tiny", patch_size=8)`."""
        if name not in cls.presets:
            raise ConfigError(f"unknown {cls.model_type} preset {name!r}; choose one of: {', '.join(cls.presets)}")
        return cls.from_dict({**cls.presets[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any], saved: bool = False):
        """The config a dict describes. A preset's or `--model`'s dict may name some fields only (the rest take their
        defaults); a `saved` one (a config.json) must name every field, but those it predates (`added_fields`, by the
        `bytelm_version` that wrote it) and those that do not matter to a loaded model (`optional_when_loading`)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a {cls.model_type} config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        mt = d.pop("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ConfigError(f"config is for model_type {mt!r}, not {cls.model_type!r}")
        written_by = d.pop("bytelm_version", None)
        if isinstance(written_by, str):  # a saved config: fields it predates keep the design it was written with
            for name, (added_in, value) in cls.added_fields.items():
                if name not in d and _version_tuple(written_by) < _version_tuple(added_in):
                    d[name] = value
        if saved:
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in d
                       and f.name not in cls.optional_when_loading]
            if missing:
                raise ConfigError(f"{cls.model_type} config lacks field(s) {', '.join(missing)}: a saved config names "
                                  "every field of the model it describes (bytelm writes them all)")
        return cls(**cls.checked_fields(d))

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **super().to_dict()}

    def _check(self, cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{self.model_type} config: {msg}")

    def _check_common(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float):
                self._check(math.isfinite(v), f"{f.name} must be finite, got {v}")
            elif isinstance(v, int) and not isinstance(v, bool):  # past any model that can be built (that would
                self._check(v <= MAX_SIZE, f"{f.name} must be at most 2**31 - 1, got {v}")  # overflow an estimate)
        self._check(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")
        self._check(self.pos_emb in POS_EMB_CHOICES, f"pos_emb must be one of {POS_EMB_CHOICES}, got {self.pos_emb!r}")
        self._check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        self._check(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        self._check(self.rope_base > 1, f"rope_base must be > 1, got {self.rope_base}")
        try:
            media = parse_modality(self.modality)
        except ConfigError as e:
            raise ConfigError(f"{self.model_type} config: {e}") from None
        if isinstance(media, ImageFormat):
            self._check(self.max_seq_len >= media.seq_len, f"max_seq_len ({self.max_seq_len:,}) must hold a whole "
                        f"{media.height}x{media.width}x{media.channels} image ({media.seq_len:,} bytes)")

    @property
    def media(self) -> Media:
        """What the model's bytes are (bytelm.data.media): None for plain bytes, else an image or audio format."""
        return parse_modality(self.modality)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def _check_stack(cfg: ModelConfig, prefix: str, dim: int, layers: int, heads: int) -> None:
    cfg._check(1 <= layers <= MAX_LAYERS, f"{prefix}layers must be in 1..{MAX_LAYERS}, got {layers}")
    cfg._check(dim >= 1, f"{prefix}dim must be >= 1, got {dim}")
    cfg._check(heads >= 1 and dim % heads == 0, f"{prefix}dim ({dim}) must be divisible by {prefix}heads ({heads})")
    head_dim = dim // heads
    hidden = int(cfg.mlp_ratio * dim)
    cfg._check(hidden <= MAX_SIZE, f"{prefix}dim * mlp_ratio = {hidden} (the MLP's width) must be at most 2**31 - 1")
    cfg._check(head_dim % 2 == 0, f"{prefix}dim / {prefix}heads = {head_dim} must be even (rotary rotates pairs)")


@dataclass
class MegabyteConfig(ModelConfig):
    """MEGABYTE shape. Widths follow the paper's tables: `global_dim` is the global transformer's width, which is
    P * D_G (P per-byte global embeddings of size D_G concatenated into one patch vector, section 2.2.1)."""

    model_type: ClassVar[str] = "megabyte"

    patch_size: int = 8  # P: every patch's length (fixed), or the most bytes a patch may hold (space, entropy)
    # where patches end (bytelm.models.patching): "fixed" every P bytes (the paper); "space" after a word and the
    # space after it (SpaceByte); "entropy" where a small byte model's next-byte entropy jumps (BLT)
    patching: str = "fixed"
    patch_threshold: float = 0.5  # entropy: the rise in nats over the previous byte's entropy that ends a patch
    entropy_dim: int = 64  # entropy: the small byte model's width and depth
    entropy_layers: int = 1
    max_seq_len: int = 8192  # bytes
    global_dim: int = 512  # P * D_G
    global_layers: int = 4
    global_heads: int = 8
    local_dim: int = 256  # D_L
    local_layers: int = 2
    local_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    pos_emb: str = "rope"  # "rope": rotary over patches (global) and bytes (local); "learned": the paper's tables
    rope_base: float = 10000.0
    bias: bool = False  # biases in Linear and LayerNorm (OPT/GPT-2 had them; modern recipes drop them)
    # W: bytes of the previous patch the local model also reads (cross-patch attention, the paper's section 2);
    # None: half a patch (P // 2); 0: the paper's local model (a patch's first byte from the global model alone)
    local_context: int | None = None
    local_norms: bool = True  # layer-normalise byte embeddings and global contributions before adding them
    # the window's bytes before the patch also get their own patch's global contribution (experimental, off:
    # two single-seed measurements disagree on whether it helps; see the README)
    context_global: bool = False
    # how a fresh model's weights are drawn (bytelm.nn.init): "fan_in" (PyTorch's defaults, what megabyte-pytorch
    # gets; bytelm's default) or "gpt2" (N(0, 0.02), depth-scaled residual projections: bytelm 0.1/0.2). It does
    # not matter to a loaded model, so a config.json without it loads with the default.
    init: str = "fan_in"
    # what the bytes are: `bytes`, `image:HxWxC` or `audio:RATE:FORMAT` (bytelm.data.media); set from the data
    modality: str = "bytes"

    added_fields: ClassVar[dict[str, tuple[str, Any]]] = {"local_context": ("0.2.0", 0),
                                                          "local_norms": ("0.2.0", False),
                                                          "context_global": ("0.2.0", False),
                                                          "modality": ("0.5.0", "bytes"),
                                                          "patching": ("0.8.0", "fixed"),
                                                          "patch_threshold": ("0.8.0", 0.5),
                                                          "entropy_dim": ("0.8.0", 64),
                                                          "entropy_layers": ("0.8.0", 1)}
    optional_when_loading: ClassVar[tuple[str, ...]] = ("init",)

    def __post_init__(self) -> None:
        self._check_common()
        self._check(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")
        if self.local_context is None:  # half a patch: most of a whole patch's gain at a third of its cost
            self.local_context = self.patch_size // 2
        self._check(0 <= self.local_context <= self.max_seq_len,
                    f"local_context must be in 0..max_seq_len, got {self.local_context}")
        self._check(
            self.global_dim % self.patch_size == 0,
            f"global_dim ({self.global_dim}) must be a multiple of patch_size ({self.patch_size}): "
            "it is P concatenated byte embeddings of size D_G",
        )
        self._check(self.init in INIT_SCHEMES, f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        self._check(self.patching in PATCHING_RULES,
                    f"patching must be one of {PATCHING_RULES}, got {self.patching!r}")
        if self.dynamic:
            self._check(not self.context_global, f"context_global is for fixed patches, not patching={self.patching!r}")
        if self.patching == "entropy":
            _check_stack(self, "entropy_", self.entropy_dim, self.entropy_layers, max(1, self.entropy_dim // 32))
        _check_stack(self, "global_", self.global_dim, self.global_layers, self.global_heads)
        _check_stack(self, "local_", self.local_dim, self.local_layers, self.local_heads)

    @property
    def byte_dim(self) -> int:
        """D_G: size of one byte's global embedding."""
        return self.global_dim // self.patch_size

    @property
    def dynamic(self) -> bool:
        """Patches that follow the data: their lengths vary (1..P bytes)."""
        return self.patching != "fixed"

    @property
    def max_patches(self) -> int:
        """The global model's positions: a patch a position, one more for the pad (dynamic: as short as a byte)."""
        return self.max_seq_len + 1 if self.dynamic else -(-self.max_seq_len // self.patch_size)


@dataclass
class TransformerConfig(ModelConfig):
    """A plain decoder-only transformer over bytes (GPT/OPT style), built from the same blocks as MEGABYTE."""

    model_type: ClassVar[str] = "transformer"

    max_seq_len: int = 2048
    dim: int = 512
    layers: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    pos_emb: str = "rope"
    rope_base: float = 10000.0
    bias: bool = False
    modality: str = "bytes"  # as MegabyteConfig's

    added_fields: ClassVar[dict[str, tuple[str, Any]]] = {"modality": ("0.5.0", "bytes")}

    def __post_init__(self) -> None:
        self._check_common()
        _check_stack(self, "", self.dim, self.layers, self.heads)


# Presets. `tiny` runs a test on CPU in seconds; `small` is the CPU quickstart; `base` a single-GPU model; `paper-*`
# are the paper's shapes for reference (Yu et al. 2023): Table 9's generation-speed pair, with depths and heads from
# Table 13 (1.3B global D=2048 L=24 + 218M local D=1024 L=15) and Table 14 (heads: 32 at D=2048, 16 at D=1024).
# Paper presets use learned positions, biases and the paper's local model (no cross-patch context, a plain sum at its
# input), as the paper did, and GPT-2's initialisation (bytelm 0.1's).
MegabyteConfig.presets = {
    "tiny": dict(patch_size=4, max_seq_len=2048, global_dim=64, global_layers=2, global_heads=2,
                 local_dim=32, local_layers=2, local_heads=2),
    "small": dict(patch_size=8, max_seq_len=1024, global_dim=256, global_layers=4, global_heads=4,
                  local_dim=128, local_layers=2, local_heads=4),
    "base": dict(patch_size=8, max_seq_len=8192, global_dim=1024, global_layers=12, global_heads=16,
                 local_dim=512, local_layers=4, local_heads=8),
    "paper-1.3b": dict(patch_size=8, max_seq_len=8192, global_dim=2048, global_layers=24, global_heads=32,
                       local_dim=1024, local_layers=15, local_heads=16, pos_emb="learned", bias=True,
                       local_context=0, local_norms=False, init="gpt2"),
}
TransformerConfig.presets = {
    "tiny": dict(max_seq_len=2048, dim=64, layers=2, heads=2),
    "small": dict(max_seq_len=1024, dim=192, layers=4, heads=4),
    "base": dict(max_seq_len=8192, dim=768, layers=12, heads=12),
    # Table 9's baseline: 350M (Table 14: D=1024, L=24, 16 heads). The paper's ran a 1024 context; ours holds 8K so
    # that it generates 8,192 bytes without a sliding window.
    "paper-350m": dict(max_seq_len=8192, dim=1024, layers=24, heads=16, pos_emb="learned", bias=True),
}

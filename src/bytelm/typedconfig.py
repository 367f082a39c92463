"""Typed configs: dataclasses that round-trip through JSON dicts and check every field's type on the way in.

`config.json`, `run.json`, `--config FILE` and `--model FIELD=VALUE` all arrive as dicts of JSON values; a string
where a number belongs must be named as such, not fail later as a `TypeError` deep inside torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, get_args, get_origin

from .errors import ConfigError


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _check_value(t: Any, v: Any) -> tuple[bool, Any]:
    """(fits, value converted) for a JSON value v against the annotation t."""
    origin, args = get_origin(t), get_args(t)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            ok, out = _check_value(a, v)
            if ok:
                return True, out
        return False, v
    if t is Any:
        return True, v
    if t is type(None):
        return v is None, v
    if t is bool:
        return isinstance(v, bool), v
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if t is float:  # JSON writes 2.0 as 2; an int is a fine float
        return isinstance(v, (int, float)) and not isinstance(v, bool), float(v) if isinstance(v, int) else v
    if t is str:
        return isinstance(v, str), v
    if origin is list:
        if not isinstance(v, (list, tuple)):
            return False, v
        checked = [_check_value(args[0], x) if args else (True, x) for x in v]
        return all(ok for ok, _ in checked), [x for _, x in checked]
    if origin is dict:
        return isinstance(v, dict) and all(isinstance(k, str) for k in v), dict(v) if isinstance(v, dict) else v
    return True, v


def checked_value(kind: str, name: str, t: Any, v: Any) -> Any:
    """v checked against the annotation t (and an int made a float where a float belongs), or one `ConfigError`
    naming the field."""
    ok, out = _check_value(t, v)
    if not ok:
        raise ConfigError(f"{kind} config field {name} must be {_type_name(t)}, got {v!r} ({type(v).__name__})")
    return out


class TypedConfig:
    """Mixin for config dataclasses: `from_dict` refuses unknown fields and values of the wrong type (one
    `ConfigError` naming them), `to_dict` is what JSON files hold."""

    _kind: ClassVar[str] = "config"  # names the config in its errors

    @classmethod
    def kind(cls) -> str:
        """What the config is called in its errors."""
        return cls._kind

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def checked_fields(cls, d: dict[str, Any], kind: str | None = None, label: str = "") -> dict[str, Any]:
        """d with every value checked against its field's type (ints accepted as floats); unknown fields refused.
        A section of a larger config names itself by `label` ("optimizer.") and its errors by that config's kind."""
        kind = kind or cls.kind()
        if not isinstance(d, dict):
            what = f"{kind} config field {label[:-1]}" if label else f"a {kind} config"
            raise ConfigError(f"{what} must be a JSON object, got {type(d).__name__}")
        types_ = cls.field_types()
        unknown = sorted(set(d) - set(types_))
        if unknown:
            raise ConfigError(f"unknown {kind} config field(s): {', '.join(repr(label + k) for k in unknown)}; "
                              f"known: {', '.join(label + k for k in types_)}")
        return {k: checked_value(kind, label + k, types_[k], v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls(**cls.checked_fields(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

"""What the commands share: flag types that read as people write them (durations, FIELD=VALUE overrides), tyro's
parsing, and the checks of paths named on the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import tyro
from tyro.constructors import PrimitiveConstructorSpec

from ..errors import UsageError


def parse_duration(s: str) -> float:
    """'90', '90s', '5m', '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", s)
    if not m:
        raise ValueError(f"not a duration: {s!r} (use e.g. 300, 300s, 5m, 1.5h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """['key=value', ...] with each value read as JSON when it parses (numbers, true/false, null), else a string."""
    out: dict[str, Any] = {}
    for s in items:
        if "=" not in s:
            raise ValueError(f"expected FIELD=VALUE, got {s!r}")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


Duration = Annotated[float, PrimitiveConstructorSpec(
    nargs=1, metavar="DURATION", instance_from_str=lambda args: parse_duration(args[0]),
    is_instance=lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    str_from_instance=lambda x: [f"{x:g}"])]

Overrides = Annotated[dict[str, Any], PrimitiveConstructorSpec(
    nargs="+", metavar="FIELD=VALUE", instance_from_str=parse_assignments,
    is_instance=lambda x: isinstance(x, dict),
    str_from_instance=lambda d: [f"{k}={json.dumps(v)}" for k, v in d.items()] or ["{}"])]


def parse(cls, argv: list[str], prog: str, default=None):
    """tyro over a dataclass of options; a flag error exits 2 with tyro's message, like argparse."""
    return tyro.cli(cls, args=argv, prog=prog, default=default)


def readable_file(path: Path, flag: str) -> Path:
    if not path.exists():
        raise UsageError(f"{flag}: {path} not found")
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder, not a file")
    return path


def writable_file(path: Path, flag: str) -> Path:
    """A file we may create: its folder exists and it is not itself a folder (checked before any work is done)."""
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; name a file to write")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{flag}: the folder {parent} does not exist")
    return path

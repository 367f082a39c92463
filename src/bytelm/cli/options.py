"""What the commands share: tyro's parsing, and the checks of paths named on the command line (the run configs' flag
types, durations and FIELD=VALUE overrides, are bytelm.training.config's)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import tyro

from ..errors import UsageError


def parse(cls, argv: list[str], prog: str, default=None):
    """tyro over a dataclass of options. A flag tyro rejects, or a value the options' own checks refuse, is a
    `UsageError`: one line (from tyro's boxed message), exit 2, like every other error."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(cls, args=argv, prog=prog, default=default)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        raise UsageError(f"{one_line(captured.getvalue())} (`{prog} --help` lists the options)") from None


def one_line(box: str) -> str:
    """tyro's error box as one line: the message rows before its first rule, plus any flags it suggests."""
    # tyro draws the box in UTF-8 (│ sides, ─ rules) or, where stdout is not UTF-8, in ASCII (no sides, - rules);
    # either way: a title row, then the message's rows up to the next rule
    rows = [r for r in (line.strip().strip("│╭╮╰╯").strip() for line in box.splitlines()) if r][1:]
    is_rule = [set(r) <= {"─", "-"} for r in rows]
    start = next((i for i, rule in enumerate(is_rule) if not rule), len(rows))
    end = next((i for i in range(start, len(rows)) if is_rule[i]), len(rows))
    message = " ".join(" ".join(rows[start:end]).split()) or "bad arguments"
    # an error raised by the options' own checks is named after the options class: that prefix says nothing
    message = re.sub(r"^Error parsing [A-Za-z_]\w*: ", "", message)
    after = rows.index("Perhaps you meant:") + 1 if "Perhaps you meant:" in rows else len(rows)
    suggested = [r.split()[0] for r, rule in zip(rows[after:], is_rule[after:], strict=True)
                 if r.startswith("--") and not rule]
    return message + (f"; did you mean {' or '.join(dict.fromkeys(suggested))}?" if suggested else "")


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

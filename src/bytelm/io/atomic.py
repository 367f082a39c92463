"""Writes that a crash cannot leave half done: write beside the target, fsync, rename over it, fsync the folder.

Files get the permissions of any other file the user creates (0666 less the umask), not `mkstemp`'s 0600, so a
server running as another user can read a model it is pointed at.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable. A no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; nothing more can be done there
    finally:
        os.close(fd)


def finish_folder(folder: str | Path) -> None:
    """Give every file in a folder (not recursive) the umask's permissions and fsync it, then fsync the folder:
    for folders filled by other writers (safetensors, peft) before they are renamed into place."""
    folder = Path(folder)
    mode = 0o666 & ~current_umask()
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, mode)
            fsync_file(p)
    fsync_dir(folder)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells (/proc), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    """A fresh name beside `path` for its temporary copy (hidden, unique)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), which creates the file, then rename it over `path`: a kill mid-write leaves the old file
    (or none), never half of one; after a power loss the rename is durable too (the folder is fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # writers may create 0600 files (safetensors does)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))

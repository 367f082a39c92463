"""Device names as users give them (`auto`, `cpu`, `cuda:1`) -> torch devices, with a clear error; and the memory a
device has left, so that a model, batch or cache too large for it is refused before it is allocated."""

from __future__ import annotations

import os
import re

import torch

from .errors import ConfigError, MemoryLimitError


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; anything else must name a device torch can use."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


# --- memory: what a device has left, and refusing what cannot fit before it is allocated ----------------------------
MEMORY_LIMIT_ENV = "BYTELM_MEMORY_LIMIT"  # "8GB", "512MiB", "1.5e9", or "off": the escape hatch from the checks
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_NO_LIMIT = ("off", "none", "unlimited", "no")


def parse_size(text: str, what: str = MEMORY_LIMIT_ENV) -> int:
    """A size as people write it: `8GB`, `8 GiB`, `512M`, `1.5e9` (bytes); decimal units, KiB/MiB/GiB binary."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"{what}={text!r} is not a size (write e.g. 8GB, 512MiB or a number of bytes, or off)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: float) -> str:
    """Bytes as a short decimal figure: 331 MB, 21.3 GB, 13.2 TB (three significant digits)."""
    if n >= 1e18:
        return f"{float(n):.3g} bytes"
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:,.0f} {unit}"
    return f"{int(n)} bytes"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit
    except OSError:
        return None


def _cgroup_available() -> int | None:
    """What this process's memory cgroup (a container's limit) has left, v2 or v1; None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes ~2**63 for "no limit"
            return max(limit - usage, 0)
    return None


def _address_space_left() -> int | None:
    """What a soft RLIMIT_AS (ulimit -v) leaves this process: the limit less its virtual size; None without one."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return max(soft - int(line.split()[1]) * 1024, 0)
        return soft
    except (ImportError, OSError, ValueError):
        return None


def available_memory(device: str | torch.device) -> tuple[int | None, str]:
    """(bytes `device` can still allocate, where that figure comes from); None when unknown (no check is made).

    BYTELM_MEMORY_LIMIT, when set, is the answer for every device (`off`: unknown, so nothing is refused). On the CPU:
    MemAvailable of /proc/meminfo, or less where a container's memory cgroup or a `ulimit -v` leaves less. On CUDA:
    the device's free memory plus what torch's caching allocator holds unused."""
    env = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if env:
        if env.lower() in _NO_LIMIT:
            return None, MEMORY_LIMIT_ENV
        return parse_size(env), MEMORY_LIMIT_ENV
    dev = torch.device(device)
    if dev.type == "cpu":
        found = [(n, why) for n, why in ((_meminfo_available(), "MemAvailable"),
                                         (_cgroup_available(), "its memory cgroup's limit"),
                                         (_address_space_left(), "ulimit -v")) if n is not None]
        return min(found, key=lambda f: f[0]) if found else (None, "")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return free + cached, "free memory"
    return None, ""


def check_memory(need: int, device: str | torch.device, what: str, parts: list[tuple[str, int]] = (),
                 hint: str = "", error: type[Exception] = MemoryLimitError) -> None:
    """Refuse (one `error` line with the estimate and what is available) a `need` in bytes that `device` cannot hold,
    before it is allocated. `what`: "this run", ...; `parts`: (label, bytes) making up the estimate (a `{}` in
    a label is where its size goes); `hint`: what to lower. Nothing is refused where the available memory is unknown."""
    avail, source = available_memory(device)
    if avail is None or need <= avail:
        return
    detail = ", ".join(label.format(format_bytes(n)) if "{}" in label else f"{label} {format_bytes(n)}"
                       for label, n in parts if n)
    where = "cpu" if torch.device(device).type == "cpu" else str(device)
    limited = f" ({source})" if source and source not in ("MemAvailable", "free memory") else ""
    raise error(f"{what} needs about {format_bytes(need)}{f' ({detail})' if detail else ''} but {where} has "
                f"{format_bytes(avail)} available{limited}; {hint + ' ' if hint else ''}({MEMORY_LIMIT_ENV} overrides "
                "the check)")

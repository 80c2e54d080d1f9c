"""The size of the CPU cache that one chunk's patch matrix should fit in, read once from the OS.

The patch matrix of a whole batch is kH*kW times the input: written to main memory by im2col and
read back by the matrix product (and again, with its gradient, in the backward pass). Split into
chunks of samples whose patch matrix fits in the core's L2 cache, each chunk's patches are read
back from the cache instead (measured on NumPy: docs/benchmarks.md, "Chunk size").
"""

from __future__ import annotations

import functools
from pathlib import Path

# Where Linux describes the caches of the first CPU: index*/level, type and size ("1024K").
_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")

# When the OS does not say (not Linux, or a container hiding /sys): a typical per-core L2 of
# current x86 and ARM server cores.
FALLBACK_L2_BYTES = 2**20

_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}


def _parse_size(text: str) -> int | None:
    """Bytes from sysfs's ``"1024K"`` / ``"32M"`` / ``"512"``; None for anything else."""
    text = text.strip().upper()
    scale = _SUFFIXES.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in _SUFFIXES else text
    return int(digits) * scale if digits.isdigit() and int(digits) > 0 else None


@functools.lru_cache(maxsize=1)
def l2_cache_bytes() -> int:
    """The first CPU's L2 (data or unified) cache in bytes, or :data:`FALLBACK_L2_BYTES`."""
    try:
        for index in sorted(_SYSFS.glob("index*")):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if level == "2" and kind in ("Unified", "Data"):
                size = _parse_size((index / "size").read_text())
                if size is not None:
                    return size
    except OSError:
        pass
    return FALLBACK_L2_BYTES

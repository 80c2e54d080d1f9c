"""How much scratch memory one call may use, and how the work is split to stay under it.

The scratch of a convolution is dominated by the patch matrix (C*kH*kW values per output
position) and, in the backward pass, its gradient. Both grow with the batch, so the work is split
over the batch, and over output rows when one sample alone does not fit.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from ._geometry import Geometry

ENV_VAR = "CONV2D_MAX_WORKSPACE"
DEFAULT_BYTES = 2**30

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str, source: str, minimum: int = 1) -> int:
    """Bytes from ``"512MB"``, ``"1GiB"``, ``"1.5gb"`` or a plain number of bytes (at least `minimum`)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(
            f"{source} must be a size such as '512MB', '1GiB' or a number of bytes, got {text!r} "
            f"(units: {', '.join(u for u in _UNITS if u)})"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < minimum:
        raise ValueError(f"{source} must be at least {minimum} byte{'s' if minimum != 1 else ''}, got {text!r}")
    return size


def resolve_limit(max_workspace_bytes: int | None) -> int:
    """The argument if given, else ``CONV2D_MAX_WORKSPACE`` (read at each call), else 1 GiB."""
    if max_workspace_bytes is not None:
        # NumPy integers are welcome, as for stride; True is a bug, not one byte.
        if isinstance(max_workspace_bytes, bool) or not isinstance(max_workspace_bytes, numbers.Integral):
            raise TypeError(f"max_workspace_bytes must be an int number of bytes, got {max_workspace_bytes!r}")
        if max_workspace_bytes < 1:
            raise ValueError(f"max_workspace_bytes must be positive, got {max_workspace_bytes!r}")
        return int(max_workspace_bytes)
    text = os.environ.get(ENV_VAR, "").strip()
    return parse_size(text, f"the {ENV_VAR} environment variable") if text else DEFAULT_BYTES


def bytes_per_item(array: Any) -> int:
    """Bytes per element of a floating `array` of any array API library (the standard has no ``itemsize``).

    ``finfo`` of a complex dtype describes its real and imaginary parts: a complex element is two of them.
    """
    xp = array_namespace(array)
    parts = 2 if xp.isdtype(array.dtype, "complex floating") else 1
    return parts * xp.finfo(array.dtype).bits // 8


@dataclass(frozen=True)
class Chunk:
    """Samples [start, stop) and output rows [row_start, row_stop) computed together."""

    start: int
    stop: int
    row_start: int
    row_stop: int


def _readers_per_pixel(geom: Geometry) -> int:
    """The most patch elements that read one input pixel.

    Along one axis, taps ``k`` reading a pixel satisfy ``k * dilation = const (mod stride)``: one in
    every ``stride / gcd(stride, dilation)`` taps.
    """
    per_axis = [
        -(-kernel // (stride // math.gcd(stride, dilation)))
        for kernel, stride, dilation in zip((geom.kernel_h, geom.kernel_w), geom.stride, geom.dilation)
    ]
    return per_axis[0] * per_axis[1]


def scratch_bytes(geom: Geometry, samples: int, rows: int, itemsize: int) -> int:
    """Scratch of one chunk, in bytes: an upper bound over both algorithms and both passes.

    Per sample: a padded copy of its input; four patch-matrix-sized arrays (the patches, their
    gradient, a reordered copy of one of them, and the gather's flat indices, counted at the item
    size: an upper bound for int32 and int64 alike); the deterministic gather's gathered gradient
    (:func:`_readers_per_pixel` for each input pixel the rows read); two output-sized arrays
    (the product before it is placed in NCHW order, and the reordered output gradient). Per chunk:
    one weight gradient.
    """
    top, bottom, left, right = geom.padding
    padded_input = geom.in_channels * (geom.height + top + bottom) * (geom.width + left + right) + 1
    patches = geom.in_channels * geom.kernel_h * geom.kernel_w * rows * geom.out_w
    read_rows = max(0, min(geom.height, (rows - 1) * geom.stride[0] + (geom.kernel_h - 1) * geom.dilation[0] + 1))
    readers = geom.in_channels * read_rows * geom.width * _readers_per_pixel(geom)
    outputs = geom.out_channels * rows * geom.out_w
    weight = geom.out_channels * geom.patch_size
    return itemsize * (samples * (padded_input + 4 * patches + readers + 2 * outputs) + weight)


def _most_rows(geom: Geometry, itemsize: int, limit: int) -> int:
    """The most output rows of one sample whose scratch fits in `limit` (0: not even one), below ``out_h``.

    A binary search, as scratch grows with the rows: a scan row by row took seconds for a padding
    of 10**6 (hours for 10**9) before it could say that nothing fits.
    """
    fits, too_many = 0, geom.out_h  # the whole sample is known not to fit
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        if scratch_bytes(geom, 1, middle, itemsize) <= limit:
            fits = middle
        else:
            too_many = middle
    return fits


def plan_chunks(geom: Geometry, batch: int, itemsize: int, limit: int) -> list[Chunk]:
    """Split a batch so that each chunk's scratch fits in `limit` bytes (MemoryError if none can)."""
    if batch == 0 or scratch_bytes(geom, batch, geom.out_h, itemsize) <= limit:
        return [Chunk(0, batch, 0, geom.out_h)]
    if scratch_bytes(geom, 1, geom.out_h, itemsize) <= limit:
        fixed = scratch_bytes(geom, 0, geom.out_h, itemsize)
        size = (limit - fixed) // (scratch_bytes(geom, 1, geom.out_h, itemsize) - fixed)
        return [Chunk(s, min(s + size, batch), 0, geom.out_h) for s in range(0, batch, size)]
    rows = _most_rows(geom, itemsize, limit)
    if rows == 0:
        raise MemoryError(
            f"one output row of one sample needs {scratch_bytes(geom, 1, 1, itemsize):,} bytes of scratch, more than "
            f"the workspace limit of {limit:,} bytes; raise it with max_workspace_bytes= or {ENV_VAR} "
            "(e.g. CONV2D_MAX_WORKSPACE=2GB)"
        )
    return [
        Chunk(s, s + 1, r, min(r + rows, geom.out_h)) for s in range(batch) for r in range(0, geom.out_h, rows)
    ]


def sample_ranges(batch: int, size: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) ranges of at most `size` samples that cover the batch; one empty
    range for an empty batch (so that a call still runs once and returns empty results).

    `size` is at least 1 here whatever the caller computed: a chunk size evened out over an empty
    batch comes to 0, which ``range`` refuses."""
    size = max(1, size)
    return [(start, min(start + size, batch)) for start in range(0, batch, size)] or [(0, 0)]


class WholeSamples:
    """For algorithms that take whole samples (``direct``, ``winograd``, ``pointwise``): `fits` when
    one sample's scratch, by the class's ``sample_scratch(geom, itemsize)``, is within the limit;
    where not, ``_conv`` runs ``slices``, which can split a sample's output rows."""

    sample_scratch: Callable[[Geometry, int], int]

    @classmethod
    def fits(cls, geom: Geometry, itemsize: int, limit: int) -> bool:
        return cls.sample_scratch(geom, itemsize) <= limit

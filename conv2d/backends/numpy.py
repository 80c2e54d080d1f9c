"""NumPy on the CPU: the default backend."""

from __future__ import annotations

from typing import Any

from array_api_compat import is_numpy_array

from . import _numba
from ._base import Backend, BackendUnavailableError
from ._cpu_cache import l2_cache_bytes

LIBRARY = "numpy"
INSTALL_HINT = "pip install numpy"


def is_array(obj: Any) -> bool:
    return is_numpy_array(obj)


def check_plain(array: Any, argument: str) -> None:
    """TypeError for an ndarray subclass whose arithmetic is not ndarray's (masked arrays, np.matrix).

    They pass as NumPy arrays, but a mask would be dropped or misapplied and a matrix multiplies
    differently, so the result would be silently wrong or fail deep inside. A memory map is a plain
    array on a file: accepted.
    """
    import numpy as np

    if type(array) in (np.ndarray, np.memmap):
        return
    kind = f"{type(array).__module__}.{type(array).__qualname__}"
    masked = isinstance(array, np.ma.MaskedArray)
    fix = f"{argument}.filled(value) to choose what masked entries become" if masked else f"np.asarray({argument})"
    raise TypeError(
        f"{argument} is a {kind}, a NumPy array subclass whose arithmetic differs from a plain ndarray's; "
        f"conv2d takes plain arrays: pass {fix}"
    )


def device_spec(array: Any) -> str | None:
    return None


def build(device: str | None) -> Backend:
    import array_api_compat.numpy as xp
    import numpy as np

    if device not in (None, "cpu"):
        raise BackendUnavailableError(
            f"NumPy runs on the CPU only, got device {device!r}; use 'numpy' or 'numpy:cpu'"
        )

    def scatter_add(target, indices, values):
        # The unbuffered ufunc.at accumulates duplicates; on 1-D indices NumPy 2 makes it fast
        # (measured here faster than np.bincount, which also forces a float64 result).
        np.add.at(target, indices, values)
        return target

    return Backend(
        name="numpy",
        spec="numpy",
        device="cpu",
        xp=xp,
        _native_asarray=lambda obj, dtype: np.asarray(obj, dtype=dtype),
        _to_numpy=np.asarray,
        _scatter_add=scatter_add,
        _owns=is_array,
        cache_bytes=l2_cache_bytes(),
        # Compiled CPU kernels where Numba is installed (conv2d[cpu]); Numba itself loads on their first run.
        kernels=_numba.NumbaKernels() if _numba.available() else None,
    )

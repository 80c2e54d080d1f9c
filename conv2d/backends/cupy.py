"""CuPy arrays on an NVIDIA GPU (``cupy``, ``cupy:1``)."""

from __future__ import annotations

from typing import Any

from array_api_compat import is_cupy_array

from ._base import Backend, BackendUnavailableError

LIBRARY = "cupy"
INSTALL_HINT = "pip install 'conv2d[cuda12]' (or 'conv2d[cuda13]' for CUDA 13)"


def is_array(obj: Any) -> bool:
    return is_cupy_array(obj)


def device_spec(array: Any) -> str | None:
    return str(array.device.id)


def build(device: str | None) -> Backend:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"CuPy is not installed ({exc})") from exc

    try:
        index = 0 if device is None else int(device.removeprefix("cuda:"))
    except ValueError:
        raise BackendUnavailableError(
            f"{device!r} is not a CUDA device number; use e.g. 'cupy', 'cupy:0', 'cupy:1'"
        ) from None
    # A successful import says nothing about a GPU: ask the driver, then allocate.
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no runtime: the reason is in the message
        raise BackendUnavailableError(
            f"CuPy finds no usable CUDA driver or device ({exc}); it needs an NVIDIA GPU with its driver, "
            f"and a CuPy built for that CUDA version: {INSTALL_HINT}"
        ) from exc
    if not 0 <= index < count:
        raise BackendUnavailableError(f"no CUDA device {index}: CuPy sees {count}")
    dev = cupy.cuda.Device(index)
    try:
        with dev:
            cupy.empty(1)
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailableError(f"cannot allocate on CUDA device {index}: {exc}") from exc
    import array_api_compat.cupy as xp
    import cupyx

    def native_asarray(obj, dtype):
        with dev:
            return cupy.asarray(obj, dtype=dtype)

    def scatter_add(target, indices, values):
        # Atomic adds: duplicates accumulate, float sums may vary in the last bits between runs.
        with target.device:
            cupyx.scatter_add(target, indices, values)
        return target

    return Backend(
        name="cupy",
        spec=f"cupy:{index}",
        device=dev,
        xp=xp,
        _native_asarray=native_asarray,
        _to_numpy=cupy.asnumpy,
        _scatter_add=scatter_add,
        _owns=is_array,
    )

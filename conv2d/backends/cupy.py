"""CuPy arrays on an NVIDIA GPU (``cupy``, ``cupy:1``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import is_cupy_array

from . import _cuda_source
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
    except Exception as exc:
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
    except Exception as exc:
        raise BackendUnavailableError(f"cannot allocate on CUDA device {index}: {exc}") from exc
    import array_api_compat.cupy as xp
    import cupyx

    def native_asarray(obj, dtype):
        with dev:
            return cupy.asarray(obj, dtype=dtype)

    def scatter_add(target, indices, values):
        # Atomic adds: duplicates accumulate, float sums may vary in the last bits between runs.
        with target.device:
            if target.dtype.kind == "c":
                scatter_add_parts(cupy, cupyx.scatter_add, target, indices, values)
            else:
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
        deterministic_scatter=False,
        kernels=CupyKernels(cupy, dev),
    )


def scatter_add_parts(xp: Any, scatter_add: Any, target: Any, indices: Any, values: Any) -> None:
    """Scatter-add complex `values` into the flat, contiguous complex `target` as two real sums.

    The real and imaginary parts go through `target` seen as interleaved reals (2k and 2k+1), with
    the real `scatter_add` (CUDA's real atomicAdd), which every CUDA GPU has for float and double.
    `xp` is ``cupy`` (NumPy in the tests).
    """
    parts = target.view(target.real.dtype)
    pairs = xp.stack([2 * indices, 2 * indices + 1], axis=-1).reshape(-1)
    scatter_add(parts, pairs, xp.ascontiguousarray(values).view(parts.dtype))


class CupyKernels:
    """The ``"kernels"`` algorithm's im2col and col2im (``_cuda_source.py``), compiled on first use.

    ``cupy.ElementwiseKernel`` compiles once per dtype and caches the binary (in memory and on
    disk), so a call costs one launch. Arrays are passed flat and C-contiguous: the sources index
    them by hand. ``ci/nvrtc-check`` runs this class with a stand-in for ``cupy`` (real
    ``ElementwiseKernel``, recorded launches) to find every variant it can launch; a new use of
    ``cupy`` here fails that check until its stand-in learns it.
    """

    def __init__(self, cupy: Any, device: Any) -> None:
        self._cupy = cupy
        self._device = device  # a context manager: kernels launch on the backend's device
        self._built: dict[tuple[str, str, str], Any] = {}

    def prefers(self, geom: Any) -> bool:
        """True: ``auto`` runs the kernels on CuPy for every layer (and for the pooling layers' patches)."""
        return True

    def _kernel(self, name: str, dtype: Any, index: str) -> Any:
        key = (name, _cuda_source.accumulator_label(np.dtype(dtype).name), index)  # CuPy's dtypes are NumPy's
        if key not in self._built:
            # ElementwiseKernel specialises T per dtype itself; the accumulator and index types are
            # spelled into the source, so float16 and float32 share one (summing in float).
            in_params, out_params, body = _cuda_source.kernel_source(name, np.dtype(dtype).name, index)
            self._built[key] = self._cupy.ElementwiseKernel(
                in_params, out_params, body, name=f"conv2d_{name}_{key[1]}_{index}"
            )
        return self._built[key]

    def _launch(self, name: str, source: Any, target: Any, args: tuple[int, ...]) -> Any:
        if target.size:  # an empty launch is an error in CUDA
            index = _cuda_source.index_width(source.size, target.size)
            with self._device:
                self._kernel(name, target.dtype, index)(
                    self._cupy.ascontiguousarray(source).reshape(-1), *args, target,
                    size=_cuda_source.launch_size(name, target.size, args),
                )
        return target

    def im2col(self, x: Any, cols: Any, args: tuple[int, ...]) -> Any:
        """Fill the flat patch matrix `cols` from the input chunk `x` (n, C, H, W)."""
        return self._launch("im2col", x, cols, args)

    def col2im(self, grad_cols: Any, grad_x: Any, args: tuple[int, ...]) -> Any:
        """Add each pixel's share of the patch gradient `grad_cols` into the flat `grad_x`."""
        return self._launch("col2im", grad_cols, grad_x, args)

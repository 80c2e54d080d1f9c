"""conv2d: one 2-D convolution (im2col + matrix product + scatter-add) for NumPy, CuPy, torch, JAX
and any array API library, chosen by ``CONV2D_BACKEND`` or by the arrays you pass in."""

import sys as _sys
from typing import Any as _Any

from . import _dispatch, nn, optim
from ._cache import clear_caches
from ._conv1d import conv1d, conv1d_backward
from ._functional import conv2d, conv2d_backward
from ._transposed import conv_transpose2d, conv_transpose2d_backward
from .algorithms import ALGORITHMS as _ALGORITHM_TABLE
from .backends import (
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .nn._convolution import ConvolutionLayer
from .nn._transposed import TransposedConvolutionLayer

__version__ = "0.1.0"


def _dask_handoff(function: str, arrays: tuple[_Any, ...], options: dict[str, _Any]) -> _Any:
    """A call with a dask array among its arrays goes to conv2d.distributed (one ordinary call per chunk).

    Registered here, at the top of the import graph, so that the core imports neither dask nor
    conv2d.distributed, and a user need not import conv2d.distributed before passing a dask array.
    """
    dask_array = _sys.modules.get("dask.array")  # asked without importing dask, an optional dependency
    if dask_array is None or not any(isinstance(array, dask_array.Array) for array in arrays):
        return NotImplemented
    from . import distributed  # imports dask, already loaded: a dask array exists

    if function == "conv2d":
        x, weight, bias = arrays
        return distributed.forward(x, weight, bias, options)
    grad_out, x, weight = arrays
    return distributed.backward(grad_out, x, weight, options)


_dispatch.register_handoff(_dask_handoff)

#: Names accepted by ``algorithm=`` besides "auto".
ALGORITHMS: tuple[str, ...] = tuple(_ALGORITHM_TABLE)

__all__ = [
    "ALGORITHMS",
    "Backend",
    "BackendUnavailableError",
    "ConvolutionLayer",
    "TransposedConvolutionLayer",
    "available_backends",
    "clear_caches",
    "conv1d",
    "conv1d_backward",
    "conv2d",
    "conv2d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "get_backend",
    "nn",
    "optim",
    "set_backend",
    "use_backend",
]

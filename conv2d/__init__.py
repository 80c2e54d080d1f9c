"""conv2d: one 2-D convolution (im2col + matrix product + scatter-add) for NumPy, CuPy, torch, JAX
and any array API library, chosen by ``CONV2D_BACKEND`` or by the arrays you pass in."""

from .algorithms import ALGORITHMS as _ALGORITHM_TABLE
from ._cache import clear_caches
from ._functional import conv2d, conv2d_backward
from .backends import (
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from . import nn, optim
from .nn._convolution import ConvolutionLayer

__version__ = "0.1.0"

#: Names accepted by ``algorithm=`` besides "auto".
ALGORITHMS: tuple[str, ...] = tuple(_ALGORITHM_TABLE)

__all__ = [
    "ALGORITHMS",
    "Backend",
    "BackendUnavailableError",
    "ConvolutionLayer",
    "nn",
    "optim",
    "available_backends",
    "clear_caches",
    "conv2d",
    "conv2d_backward",
    "get_backend",
    "set_backend",
    "use_backend",
]

"""How every kernel of this package is compiled: Numba's ``njit``, cached on disk, without the GIL.

- ``nogil=True``: the kernels run on the worker threads of :mod:`._threads` at once.
- ``cache=True``: compiled once per kernel and dtype, then loaded from disk (a few milliseconds)
  by every later process. Numba writes its cache beside this file where it may, and in the user's
  cache folder (``~/.cache``, or ``NUMBA_CACHE_DIR``) where the install is read-only.
- ``error_model="numpy"``: no check for a division by zero in the inner loops (there is none).

Only the kernel modules import this one, and only :class:`~._kernels.NumbaKernels` imports them,
on the first call that runs a kernel: ``import conv2d`` never loads Numba.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])


def kernel(function: F) -> F:
    """`function` compiled by Numba on its first call for each dtype, and cached on disk."""
    return cast(F, numba.njit(nogil=True, cache=True, error_model="numpy")(function))


def reduction(function: F) -> F:
    """:func:`kernel` for a loop that sums into scalars: the additions may be reassociated (``fastmath``'s
    ``reassoc`` only: no assumption about infs, NaNs or signed zeros), which lets LLVM vectorise the sum
    with several partial sums. The order is fixed by the compiled code, so a result is the same on every
    run; it differs from a left-to-right sum by rounding."""
    return cast(F, numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc"})(function))

"""The object every backend module builds: what the convolution needs beyond the array API standard."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import is_array_api_obj

from .._cache import ByteCache

# The registry (conv2d.backends) imports this module and fills these in when it loads, before it builds
# any Backend: a Backend looks up another array's backend (asarray) and an unpickled one its spec,
# without this module importing the registry back.
_registry: dict[str, Callable[..., Backend]] = {}


def connect_registry(backend_of: Callable[..., Backend], get_backend: Callable[..., Backend]) -> None:
    """Called once by conv2d.backends: the lookups that Backend objects need from it."""
    _registry.update(backend_of=backend_of, get_backend=get_backend)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name, but its library or device cannot be used here."""


@dataclass(frozen=True, eq=False)
class Backend:
    """One array library on one device, as the convolution code sees it.

    Attributes
    ----------
    name : str
        Registry name: ``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"`` or ``"array_api_strict"``.
    spec : str
        The full spec that selects this backend again, e.g. ``"torch:cuda:0"``.
    device : object
        The library's own device object; new arrays are created there.
    xp : module
        The array API namespace (what ``array_api_compat.array_namespace`` returns for this library).
    deterministic_scatter : bool
        Whether :meth:`scatter_add` sums duplicates in the same order on every run (bitwise
        reproducible). False where it uses atomic adds (CuPy, torch on CUDA, JAX on a GPU).
    kernels : object or None
        Compiled kernels for the ``"kernels"`` algorithm, where the backend has them; None elsewhere.
        CuPy's are device kernels (im2col and a gather-style col2im, run by ``Kernels``'s chunk
        loop); NumPy's, where Numba is installed, bring a whole-call algorithm of their own as
        ``algorithm``. Both say with ``prefers(geom)`` whether ``auto`` should run them on a layer
        (`geom` None: the pooling layers' patch builder).
    native : object or None
        The library's own convolution for the ``"native"`` algorithm (torch, JAX): an object with
        ``forward(x, weight, bias, geom, deterministic)`` and ``backward(grad_out, x, weight, geom,
        deterministic)``, ``prefers(geom)`` (whether ``auto`` should pick it for that layer) and
        a ``deterministic`` attribute, whether it can honour ``deterministic=True`` (see
        ``backends/torch.py``); None where the library has none.
    cache_bytes : int or None
        The CPU cache (bytes) that one chunk's patch matrix should fit in: the batch is then split
        into chunks that small (see ``_conv.cache_limit``). None: chunks as large as the workspace
        limit allows (GPUs, and backends not measured with small chunks).
    """

    name: str
    spec: str
    device: Any
    xp: Any
    _native_asarray: Callable[[Any, Any], Any] = field(repr=False)
    _to_numpy: Callable[[Any], np.ndarray] = field(repr=False)
    _scatter_add: Callable[[Any, Any, Any], Any] = field(repr=False)
    _owns: Callable[[Any], bool] = field(repr=False)
    deterministic_scatter: bool = True
    kernels: Any = field(default=None, repr=False)
    native: Any = field(default=None, repr=False)
    cache_bytes: int | None = None
    _slice_add: Callable[[Any, Any, Any], Any] | None = field(default=None, repr=False)
    # Host array -> concrete device array even while a function transformation traces the caller
    # (JAX's jit/grad/vmap); None: _native_asarray, which never traces.
    _constant_asarray: Callable[[np.ndarray], Any] | None = field(default=None, repr=False)
    _traced: Callable[[Any], bool] | None = field(default=None, repr=False)
    # What to do about a dtype this backend lacks, e.g. JAX's switch for 64-bit types ("" if nothing).
    _dtype_hint: Callable[[str], str] = field(default=lambda name: "", repr=False)
    _constants: ByteCache = field(default_factory=ByteCache, repr=False)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # A backend holds a module, a lock and device arrays: it travels as its spec and becomes
        # the receiving process's registry object for that spec (one object per library and device).
        return _backend_from_spec, (self.spec,)

    def owns(self, array: Any) -> bool:
        """Whether `array` belongs to this backend's library (any device)."""
        return self._owns(array)

    def traced(self, array: Any) -> bool:
        """Whether `array` is a placeholder of a function transformation (JAX's jit), whose values cannot be read."""
        return self._traced is not None and self._traced(array)

    def asarray(self, obj: Any, dtype: Any = None) -> Any:
        """Return `obj` as an array of this backend, on its device.

        `obj` may be a nested sequence, a NumPy array, or an array of another supported library
        (copied through host memory). `dtype` is a dtype of this library or a name such as
        ``"float32"``.
        """
        if is_array_api_obj(obj):
            source = _registry["backend_of"](obj, "obj")  # also refuses a masked array, whose mask would be lost here
            if not self._owns(obj):
                obj = source.to_numpy(obj)
        if isinstance(dtype, str):
            dtype = self.dtype(dtype)
        return self._native_asarray(obj, dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy `array` (of this backend) to a NumPy array in host memory."""
        return self._to_numpy(array)

    def scatter_add(self, target: Any, indices: Any, values: Any) -> Any:
        """Return `target` with ``values[k]`` added at ``indices[k]`` for every k.

        All three are 1-D; duplicate indices accumulate. Where the library allows it (NumPy, CuPy,
        torch) `target` is updated in place and returned; JAX and array-api-strict return a new
        array. Always use the returned array, and pass a `target` you own.
        """
        return self._scatter_add(target, indices, values)

    def slice_add(self, target: Any, key: Any, values: Any) -> Any:
        """Return `target` with `values` added to ``target[key]`` (basic indexing: ints and slices).

        In place where the library allows it; JAX returns a new array. Always use the result.
        """
        if self._slice_add is not None:
            return self._slice_add(target, key, values)
        target[key] += values
        return target

    def dtype(self, name: str) -> Any:
        """The library's dtype called `name` (``"float32"``, ``"float64"``, ...)."""
        dtypes = self.xp.__array_namespace_info__().dtypes(device=self.device)
        if name == "float16" and hasattr(self.xp, "float16"):
            # Outside the standard's list, but NumPy, CuPy, torch and JAX have it (array-api-strict not).
            dtypes = {**dtypes, "float16": self.xp.float16}
        if name not in dtypes:
            hint = self._dtype_hint(name)
            raise TypeError(
                f"dtype {name!r} is not available on backend {self.spec!r}; "
                f"{hint + ', or ' if hint else ''}choose one of {sorted(dtypes)}"
            )
        return dtypes[name]

    def constant(self, key: Hashable, make_host_array: Callable[[], np.ndarray]) -> Any:
        """A read-only array built on the host once per `key`, kept on this backend's device.

        Gather plans are pure functions of the geometry, so they are built and transferred
        once and reused by every call with the same geometry, as long as they fit in the
        backend's cache (``CONV2D_PLAN_CACHE`` bytes, see :func:`conv2d.clear_caches`). They are
        concrete arrays even when the caller is being traced (``jax.jit``): a traced program embeds
        them as constants.
        """

        def make() -> tuple[Any, int]:
            host = make_host_array()
            # A traced value must never enter the cache: the next call, traced or not, would get a
            # tracer of a finished trace. The hook builds a concrete array whatever the caller is doing.
            asarray = self._constant_asarray or (lambda array: self._native_asarray(array, None))
            return asarray(host), host.nbytes

        return self._constants.get(key, make)


def _backend_from_spec(spec: str) -> Backend:
    """What an unpickled Backend becomes: the registry's backend for `spec` in this process."""
    return _registry["get_backend"](spec)

"""Backend registry and selector.

A backend is chosen by a spec string, ``NAME`` or ``NAME:DEVICE`` (``"numpy"``, ``"torch:cuda:1"``,
``"cupy:1"``), or ``"auto"``. For new arrays (a layer's weights) the active backend is, in order:
the innermost :func:`use_backend` block of the current thread or task, else :func:`set_backend`,
else the ``CONV2D_BACKEND`` environment variable (read when a backend is first needed, and again
after ``set_backend(None)``), else ``"numpy"``. The functional API does not use the active backend:
it works in the library and on the device of its input arrays.

Backend modules are imported only when asked for, and an array's library is recognised without
importing any library that is not already loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from ._base import Backend, BackendUnavailableError, connect_registry

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "backend_of",
    "get_backend",
    "set_backend",
    "use_backend",
]

ENV_VAR = "CONV2D_BACKEND"
DEFAULT_SPEC = "numpy"

# name -> module under conv2d.backends; each module has LIBRARY, INSTALL_HINT, is_array,
# device_spec and build (see numpy.py for the smallest one), and may have check_plain(array, argument).
_MODULES = {
    "numpy": "numpy",
    "cupy": "cupy",
    "torch": "torch",
    "jax": "jax",
    "array_api_strict": "array_api_strict",
}
_ALIASES = {"array-api-strict": "array_api_strict"}
CHOICES = (*_MODULES, "auto")

_built: dict[tuple[str, str | None], Backend] = {}
_build_lock = threading.Lock()
_scoped: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("conv2d_backend", default=None)
_process_backend: Backend | None = None  # set_backend(): shared by all threads
_env_backend: Backend | None = None  # CONV2D_BACKEND, parsed on first need


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def _choices_text() -> str:
    return ", ".join(CHOICES) + " (optionally with a device: 'torch:cuda', 'torch:cuda:1', 'cupy:1')"


def _split(spec: str, source: str) -> tuple[str, str | None]:
    if not isinstance(spec, str):
        raise TypeError(
            f"backend spec from {source} must be a string such as 'numpy' or 'torch:cuda', "
            f"got {type(spec).__name__} {spec!r}"
        )
    # Names and devices alike ignore case: 'jax:CPU', 'Torch:CUDA'.
    name, _, device = (part.strip().lower() for part in spec.strip().partition(":"))
    name = _ALIASES.get(name, name)
    if name not in CHOICES:
        raise ValueError(f"unknown conv2d backend {spec!r} (from {source}); choose one of: {_choices_text()}")
    if name == "auto" and device:
        raise ValueError(f"backend 'auto' takes no device, got {spec!r} (from {source})")
    return name, device or None


def _build(name: str, device: str | None) -> Backend:
    """The backend for (name, device), built once; BackendUnavailableError carries the bare reason."""
    key = (name, device)
    with _build_lock:
        if key in _built:
            return _built[key]
        backend = _module(name).build(device)
        # One object per library and device, however it was spelled ("torch", "torch:cpu"):
        # the canonical spec's entry wins if it was built first.
        backend = _built.setdefault(_split(backend.spec, "canonical spec"), backend)
        _built[key] = backend
        return backend


def _unavailable(name: str, spec: str, source: str, reason: BackendUnavailableError) -> BackendUnavailableError:
    """The user-facing error: what was asked, from where, why not, and what to do instead."""
    module = _module(name)
    installed = module.LIBRARY in sys.modules or importlib.util.find_spec(module.LIBRARY) is not None
    install = "" if installed else f" Install it with {module.INSTALL_HINT}."
    usable = ", ".join(n for n, ok in available_backends().items() if ok is True)
    return BackendUnavailableError(
        f"conv2d backend {spec!r} (from {source}) cannot be used here: {reason}.{install} "
        f"Usable here: {usable}; choose one with {ENV_VAR}=NAME or conv2d.set_backend('NAME')."
    )


def _resolve(spec: str | Backend, source: str) -> Backend:
    if isinstance(spec, Backend):
        return spec
    name, device = _split(spec, source)
    if name == "auto":
        try:
            return _build("cupy", None)
        except BackendUnavailableError:
            return _build("numpy", None)
    try:
        return _build(name, device)
    except BackendUnavailableError as exc:
        raise _unavailable(name, spec, source, exc) from exc


def get_backend(spec: str | Backend | None = None) -> Backend:
    """Return the named backend, or the active one.

    Parameters
    ----------
    spec : str or Backend, optional
        ``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"``, ``"array_api_strict"`` or ``"auto"``,
        optionally with a device (``"torch:cuda:1"``, ``"cupy:1"``, ``"jax:cpu"``). None gives
        the active backend: the innermost :func:`use_backend`, else :func:`set_backend`, else
        ``CONV2D_BACKEND``, else NumPy.

    Returns
    -------
    Backend
        The same object for the same library and device.

    Raises
    ------
    ValueError
        Unknown name; the message lists the valid ones.
    BackendUnavailableError
        The library is not installed or the device does not answer; the message says how to fix it.

    Examples
    --------
    >>> import conv2d
    >>> conv2d.get_backend("numpy").name
    'numpy'
    """
    global _env_backend
    if spec is not None:
        return _resolve(spec, "get_backend()")
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _process_backend is not None:
        return _process_backend
    if _env_backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        _env_backend = _resolve(env, f"the {ENV_VAR} environment variable") if env else _resolve(DEFAULT_SPEC, "default")
    return _env_backend


def set_backend(spec: str | Backend | None) -> Backend | None:
    """Make `spec` the active backend for the whole process (all threads).

    ``set_backend(None)`` clears it: the next call reads ``CONV2D_BACKEND`` again.
    A :func:`use_backend` block still takes precedence inside it. The spec is checked at once,
    so a bad or unusable choice fails here, not at the first convolution.

    Returns
    -------
    Backend or None
        The backend now set, or None after clearing.
    """
    global _process_backend, _env_backend
    if spec is None:
        _process_backend = None
        _env_backend = None
        return None
    _process_backend = _resolve(spec, "set_backend()")
    return _process_backend


@contextlib.contextmanager
def use_backend(spec: str | Backend) -> Iterator[Backend]:
    """Make `spec` the active backend inside a ``with`` block, for this thread or task only.

    Examples
    --------
    >>> import conv2d
    >>> with conv2d.use_backend("numpy") as backend:
    ...     backend.name
    'numpy'
    """
    backend = _resolve(spec, "use_backend()")
    token = _scoped.set(backend)
    try:
        yield backend
    finally:
        _scoped.reset(token)


def available_backends() -> dict[str, bool | str]:
    """Which backends can be used here: name -> True, or the reason it cannot.

    Probes each library's default device (importing the library if it is installed).
    """
    report: dict[str, bool | str] = {}
    for name in _MODULES:
        try:
            if (name, None) not in _built:
                _module(name).build(None)
            report[name] = True
        except BackendUnavailableError as exc:
            report[name] = f"{exc} (install: {_module(name).INSTALL_HINT})"
        except Exception as exc:
            report[name] = f"probing it failed: {type(exc).__name__}: {exc}"
    return report


def compiler_op(function: str) -> Any:
    """`function` ("conv2d" or "conv2d_backward") as an opaque operator of the graph compiler that is
    tracing the caller now (``torch.compile``), or None when none is."""
    if "torch" in sys.modules:
        from . import torch as torch_backend  # loaded with torch; imports nothing new

        if torch_backend.compiling():
            return (torch_backend.OPS or torch_backend.compiler_ops())[function]
    return None


def backend_of(array: Any, argument: str = "array") -> Backend:
    """The backend of `array`'s library and device; TypeError if it is no supported array."""
    for name in _MODULES:
        module = _module(name)
        if module.LIBRARY in sys.modules and module.is_array(array):
            if hasattr(module, "check_plain"):  # a subclass that changes the arithmetic is refused by name
                module.check_plain(array, argument)
            return _build(name, module.device_spec(array))
    raise TypeError(
        f"{argument} must be an array of one of {', '.join(_MODULES)}, got {type(array).__module__}."
        f"{type(array).__qualname__}; convert it first, e.g. conv2d.get_backend().asarray({argument})"
    )


connect_registry(backend_of, get_backend)

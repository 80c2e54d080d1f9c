"""What every layer shares about its parameters: listing, replacing, checkpointing and pickling them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from array_api_compat import is_array_api_obj, is_numpy_array

from ..backends import Backend, backend_of


def host_copy(array: Any) -> np.ndarray:
    """A NumPy copy of `array` (of any supported library) in host memory, never a view of it."""
    if is_array_api_obj(array) and not is_numpy_array(array):
        array = backend_of(array, "array").to_numpy(array)
    return np.array(array, copy=True)


def check_parameter(name: str, value: Any, shape: tuple[int, ...], dtype: Any, backend: Any) -> None:
    """Refuse a parameter the layer cannot use as it is, naming it (`name`) and what it must be.

    `value` must be an array of `backend`'s library, on its device, of exactly `shape` and `dtype`:
    a weight of the right size but another shape would otherwise be reinterpreted silently by a
    reshape, and one of another size fail deep inside with a message naming nothing.
    """
    expected = f"a {backend.name} array of shape {tuple(shape)} and dtype {dtype}"
    try:
        owner = backend_of(value, name)
    except TypeError:
        raise TypeError(
            f"{name} must be {expected}, got {type(value).__module__}.{type(value).__qualname__}; "
            f"convert it with layer.backend.asarray(value, dtype={str(dtype).rpartition('.')[2]!r})"
        ) from None
    if owner.name != backend.name:
        raise TypeError(
            f"{name} is a {owner.name} array but the layer lives on backend {backend.spec!r}: it must be {expected}; "
            "convert it with layer.backend.asarray(value)"
        )
    if owner.spec != backend.spec:  # by spec: a backend copied with other hooks (tests' kernels) is the same place
        raise ValueError(f"{name} is on device {owner.spec!r} but the layer lives on {backend.spec!r}; move it there")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.dtype != dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but the layer computes in {dtype}: it must be {expected}")


def unknown_keys(what: str, given: Any, known: Any) -> None:
    """KeyError naming the keys of `given` that are not in `known`, and the valid ones."""
    extra = sorted(set(given) - set(known))
    if extra:
        raise KeyError(f"{what} has unknown key(s) {extra}; the layer's parameters are {sorted(known)}")


def dtype_name(backend: Any, dtype: Any) -> str:
    """The NumPy name ("float32") of a dtype of `backend`'s library, for files and messages."""
    return host_copy(backend.xp.zeros((0,), dtype=dtype, device=backend.device)).dtype.name


class Parameterized:
    """Mixin of the layers: parameters named by ``PARAMETERS`` (attributes on the layer's ``backend``).

    ``TRANSIENT`` names the attributes holding what the last forwardpass kept for the backward
    pass: they are not pickled (they may be large, and hold arrays of a finished batch).
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ()
    TRANSIENT: ClassVar[tuple[str, ...]] = ("_saved",)
    backend: Backend  # set by each layer's constructor
    dtype: Any

    def parameters(self) -> dict[str, Any]:
        """The trainable arrays by name (``{}`` for a layer without any); the layer's own arrays, not copies."""
        return {name: getattr(self, name) for name in self.PARAMETERS}

    def set_parameters(self, mapping: Mapping[str, Any]) -> None:
        """Replace the parameters named in `mapping` (some or all of :meth:`parameters`).

        Each new array must be of the layer's library, with the shape and dtype of the one it
        replaces; nothing is replaced unless all pass. Raises KeyError, TypeError or ValueError
        naming the offending key.
        """
        self._check_parameters(mapping, "")
        for key, value in mapping.items():
            setattr(self, key, value)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each parameter must have (in the layer's ``dtype``); ``{}`` without parameters."""
        return {}

    def _check_parameters(self, mapping: Mapping[str, Any], prefix: str) -> None:
        shapes = self.parameter_shapes()
        unknown_keys("set_parameters()", [prefix + key for key in mapping], [prefix + key for key in shapes])
        for key, value in mapping.items():
            # Named as the user wrote it: "ConvolutionLayer.weights", or "0.weights" inside a Sequential.
            name = prefix + key if prefix else f"{type(self).__name__}.{key}"
            check_parameter(name, value, shapes[key], self.dtype, self.backend)

    def _check_current_parameters(self) -> None:
        """The parameters as they are now (they may have been assigned directly) fit the layer."""
        self._check_parameters(self.parameters(), "")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host (NumPy) copies of :meth:`parameters`, for saving or for another backend."""
        return {name: host_copy(value) for name, value in self.parameters().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set the parameters from `state` (NumPy or any backend's arrays), as :meth:`state_dict` gives.

        Every key of :meth:`parameters` must be present, with its shape and dtype; the arrays are
        copied to the layer's backend. Raises KeyError, TypeError or ValueError naming the key.
        """
        self._load_state_dict(state, "")

    def _load_state_dict(self, state: Mapping[str, Any], prefix: str) -> None:
        current = self.parameters()
        missing = sorted(set(current) - set(state))
        if missing:
            raise KeyError(f"state has no {[prefix + key for key in missing]}; it needs {[prefix + k for k in current]}")
        unknown_keys("state", [prefix + key for key in state], [prefix + key for key in current])
        new = {}
        for key, value in state.items():
            host = host_copy(value)
            expected = host_copy(current[key]).dtype  # the dtype's NumPy name, whatever the library
            if host.shape != tuple(current[key].shape):
                raise ValueError(f"state[{prefix + key!r}] has shape {host.shape}, the layer needs {tuple(current[key].shape)}")
            if host.dtype != expected:
                raise TypeError(f"state[{prefix + key!r}] has dtype {host.dtype}, the layer needs {expected}")
            new[key] = self.backend.asarray(host)
        self.set_parameters(new)

    def __getstate__(self) -> dict[str, Any]:
        # Parameters travel as host copies (a GPU array unpickles on whatever device its library picks);
        # the backend pickles as its spec (see Backend.__reduce__).
        state = self.__dict__.copy()
        for name in self.TRANSIENT:
            if name in state:
                state[name] = None
        for name in self.PARAMETERS:
            state[name] = host_copy(state[name])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in self.PARAMETERS:
            setattr(self, name, self.backend.asarray(state[name]))

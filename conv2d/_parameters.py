"""What every layer shares about its parameters: listing, replacing, checkpointing and pickling them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from array_api_compat import is_array_api_obj, is_numpy_array

from .backends import backend_of


def host_copy(array: Any) -> np.ndarray:
    """A NumPy copy of `array` (of any supported library) in host memory, never a view of it."""
    if is_array_api_obj(array) and not is_numpy_array(array):
        array = backend_of(array, "array").to_numpy(array)
    return np.array(array, copy=True)


def check_parameter(key: str, value: Any, current: Any, backend: Any) -> None:
    """`value` may replace parameter `key` (now `current`): same library, shape and dtype, or an error naming `key`."""
    if not backend.owns(value):
        raise TypeError(
            f"parameter {key!r} must be a {backend.name} array like the layer's, got {type(value).__module__}."
            f"{type(value).__qualname__}; convert it with layer.backend.asarray(value)"
        )
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f"parameter {key!r} must have shape {tuple(current.shape)}, got {tuple(value.shape)}")
    if value.dtype != current.dtype:
        raise TypeError(f"parameter {key!r} must have dtype {current.dtype}, got {value.dtype}; cast it first")


def unknown_keys(what: str, given: Any, known: Any) -> None:
    """KeyError naming the keys of `given` that are not in `known`, and the valid ones."""
    extra = sorted(set(given) - set(known))
    if extra:
        raise KeyError(f"{what} has unknown key(s) {extra}; the layer's parameters are {sorted(known)}")


class Parameterized:
    """Mixin of the layers: parameters named by ``PARAMETERS`` (attributes on the layer's ``backend``).

    ``TRANSIENT`` names the attributes holding what the last forwardpass kept for the backward
    pass: they are not pickled (they may be large, and hold arrays of a finished batch).
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ()
    TRANSIENT: ClassVar[tuple[str, ...]] = ("_saved",)

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

    def _check_parameters(self, mapping: Mapping[str, Any], prefix: str) -> None:
        current = self.parameters()
        unknown_keys("set_parameters()", [prefix + key for key in mapping], [prefix + key for key in current])
        for key, value in mapping.items():
            check_parameter(prefix + key, value, current[key], self.backend)

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

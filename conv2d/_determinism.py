"""Deterministic mode: ``deterministic=`` or ``CONV2D_DETERMINISTIC``.

The forward pass and the weight and bias gradients are matrix products and sums, reproducible
run to run on every backend. Only the input gradient can vary: the ``gather`` algorithm sums
overlapping patches with the backend's scatter-add, which uses atomic adds on CuPy, torch on CUDA
and JAX on a GPU, so the order of a float sum (and its last bits) changes between runs. In
deterministic mode ``gather`` sums them by a gather instead (``_algorithms.GatherTransposed``).
``slices`` and ``kernels`` never use atomics, so they are deterministic in both modes.
"""

from __future__ import annotations

import os

import numpy as np

ENV_VAR = "CONV2D_DETERMINISTIC"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def resolve_deterministic(deterministic: bool | None) -> bool:
    """The argument if given, else ``CONV2D_DETERMINISTIC`` (read at each call), else False."""
    if deterministic is not None:
        if not isinstance(deterministic, (bool, np.bool_)):  # NumPy's bools too, as NumPy ints for stride
            raise TypeError(f"deterministic must be True, False or None, got {deterministic!r}")
        return bool(deterministic)
    text = os.environ.get(ENV_VAR, "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(
        f"the {ENV_VAR} environment variable must be one of {', '.join(_TRUE)} (on) or "
        f"{', '.join(repr(v) for v in _FALSE)} (off), got {os.environ[ENV_VAR]!r}"
    )

"""Float32 on a GPU means float32: no TF32 on either side (torch, CuPy, JAX settings while benchmarking)."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ...backends import Backend
from .timing import _on_gpu


@contextlib.contextmanager
def gpu_precision(backend: Backend) -> Iterator[dict[str, Any]]:
    """While active, float32 matrix products and convolutions on the GPU run in float32, not TF32.

    Since Ampere, cuBLAS and cuDNN may round float32 inputs to TF32 (10-bit mantissa) on tensor
    cores: several times faster and much less accurate, so a comparison where one side does it
    would not compare the same work. PyTorch's own convolution picks its fastest cuDNN algorithm
    (``cudnn.benchmark``), as a user timing a network would. Yields what was set (for the JSON),
    empty on a CPU backend, and restores the previous settings on exit.
    """
    if not _on_gpu(backend):
        yield {}
        return
    settings: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_torch_precision(settings))
        if backend.name == "cupy":
            stack.enter_context(_cupy_precision(settings))
        elif backend.name == "jax":
            stack.enter_context(_jax_precision(settings))
        yield settings


@contextlib.contextmanager
def _torch_precision(settings: dict[str, Any]) -> Iterator[None]:
    """torch's flags (the reference runs on CUDA for every GPU backend): no TF32, cuDNN autotuning."""
    try:
        import torch
    except ImportError:
        settings["torch"] = "not installed"
        yield
        return
    flags: tuple[tuple[Any, str, bool], ...] = (  # (owner, attribute, value while benchmarking)
        (torch.backends.cuda.matmul, "allow_tf32", False),
        (torch.backends.cudnn, "allow_tf32", False),
        (torch.backends.cudnn, "benchmark", True),
    )
    before = [getattr(owner, name) for owner, name, _ in flags]
    try:
        for owner, name, value in flags:
            setattr(owner, name, value)
        settings["torch.backends.cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        settings["torch.backends.cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
        settings["torch.backends.cudnn.benchmark"] = torch.backends.cudnn.benchmark
        settings["torch.backends.cudnn.deterministic"] = torch.backends.cudnn.deterministic
        yield
    finally:
        for (owner, name, _), value in zip(flags, before, strict=True):
            setattr(owner, name, value)


@contextlib.contextmanager
def _cupy_precision(settings: dict[str, Any]) -> Iterator[None]:
    """CuPy's float32 GEMMs in plain FP32 (CUBLAS_COMPUTE_32F).

    CuPy reads ``CUPY_TF32`` once, at its first float32 matrix product, and uses TF32 when it is
    above 0 (the default, unset, is plain FP32). Setting it here covers a product not made yet;
    the compute type, set through CuPy's private ``_routines_linalg`` where it exists, covers one
    made before (with CUPY_TF32=1 in the environment).
    """
    env_before = os.environ.get("CUPY_TF32")
    os.environ["CUPY_TF32"] = "0"
    settings["CUPY_TF32"] = "0"
    settings["CUPY_TF32_before"] = env_before
    linalg, compute_before = None, None
    try:
        linalg = importlib.import_module("cupy._core._routines_linalg")
        compute_before = linalg.get_compute_type(np.float32)
        linalg.set_compute_type(np.float32, getattr(linalg, "COMPUTE_TYPE_DEFAULT", 1))
        settings["cupy_float32_compute_type"] = linalg.compute_type_to_str(linalg.get_compute_type(np.float32))
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        linalg = None
        settings["cupy_float32_compute_type"] = f"unknown ({type(exc).__name__}: {exc}); CUPY_TF32=0 only"
    try:
        yield
    finally:
        if env_before is None:
            os.environ.pop("CUPY_TF32", None)
        else:
            os.environ["CUPY_TF32"] = env_before
        if linalg is not None:
            linalg.set_compute_type(np.float32, compute_before)


@contextlib.contextmanager
def _jax_precision(settings: dict[str, Any]) -> Iterator[None]:
    """JAX's float32 matrix products on a GPU at full precision (its default there may be TF32)."""
    import jax

    settings["jax_default_matmul_precision"] = "highest"
    with jax.default_matmul_precision("highest"):
        yield

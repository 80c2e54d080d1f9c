"""``python -m conv2d bench``: time conv2d against PyTorch, the bare matrix products and the seed.

For each shape, in one process and on the same data, it measures (median of ``--repeat`` timed
calls after a warm-up call):

- ours: :func:`conv2d.conv2d`, :func:`conv2d.conv2d_backward` and the two in a row;
- the floor: the bare matrix products a convolution of that size cannot avoid, on the same backend
  (forward ``W @ patches`` per group; backward ``grad_y @ patches^T`` and ``W^T @ grad_y``);
- PyTorch: ``torch.nn.functional.conv2d`` forward, and forward plus autograd backward, when torch is
  importable (CPU tensors, or CUDA tensors when the backend is on a GPU);
- the seed: a NumPy reimplementation of the algorithm this project grew from (float64, patches gathered
  with three index arrays, one matrix product, ``np.add.at`` with four index arrays), the baseline
  users come from;
- the peak extra memory of one forward+backward, with the default workspace limit and with 64 MB.

Optional libraries (torch, matplotlib, threadpoolctl, cupy, jax) are imported inside the functions
that need them: ``python -m conv2d info`` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from ._functional import conv2d, conv2d_backward
from .backends import Backend, BackendUnavailableError, get_backend

__all__ = ["PRESETS", "Shape", "add_arguments", "measure", "parse_shape", "parse_shapes", "run"]

# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    """One convolution to time: batch, input, filters and their arguments, as PyTorch defines them.

    Square stride, padding and dilation (one int each) are enough for a benchmark and keep the
    command-line form short: ``N,C,H,W,O,KH,KW,stride,pad[,dilation,groups]``.
    """

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    groups: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        label = self.name or self.spec
        for key in ("n", "c", "h", "w", "o", "kh", "kw", "stride", "dilation", "groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"shape {label!r}: {key.upper()}={value!r} must be a positive integer")
        if not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"shape {label!r}: PAD={self.pad!r} must be a non-negative integer")
        for key in ("c", "o"):
            if getattr(self, key) % self.groups:
                raise ValueError(
                    f"shape {label!r}: {key.upper()}={getattr(self, key)} is not divisible by groups={self.groups}"
                )
        if self.out_h < 1 or self.out_w < 1:
            raise ValueError(
                f"shape {label!r}: the kernel {self.kh}x{self.kw} (dilation {self.dilation}) does not fit in "
                f"the padded input {self.h + 2 * self.pad}x{self.w + 2 * self.pad}"
            )

    @property
    def out_h(self) -> int:
        return (self.h + 2 * self.pad - self.dilation * (self.kh - 1) - 1) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.w + 2 * self.pad - self.dilation * (self.kw - 1) - 1) // self.stride + 1

    @property
    def spec(self) -> str:
        """The command-line form, ``N,C,H,W,O,KH,KW,stride,pad,dilation,groups``."""
        return ",".join(str(getattr(self, key)) for key in _SHAPE_FIELDS)

    @property
    def label(self) -> str:
        return self.name or self.spec

    @property
    def conv_kwargs(self) -> dict[str, int]:
        return {"stride": self.stride, "padding": self.pad, "dilation": self.dilation, "groups": self.groups}

    @property
    def gemm(self) -> tuple[int, int, int, int]:
        """(groups, O/groups, C/groups*KH*KW, N*OH*OW): the sizes of the forward's matrix product."""
        g = self.groups
        return g, self.o // g, self.c // g * self.kh * self.kw, self.n * self.out_h * self.out_w

    @property
    def forward_flops(self) -> int:
        g, m, k, p = self.gemm
        return 2 * g * m * k * p


_SHAPE_FIELDS = ("n", "c", "h", "w", "o", "kh", "kw", "stride", "pad", "dilation", "groups")
SHAPE_FORMAT = "N,C,H,W,O,KH,KW,stride,pad[,dilation,groups]"

# The seed's own layer: N=64 samples of 32x32x32, 64 filters 3x3, stride 1, no padding. A target of
# the project is measured on it in float64, so every preset that can afford it includes it.
SEED_SHAPE = Shape(64, 32, 32, 32, 64, 3, 3, 1, 0, name="seed 32->64 3x3")

# Sized so that the whole "cpu" preset runs in well under 3 minutes on a 2-core machine with the
# default --repeat; one shape per kind of layer the issue names.
PRESETS: dict[str, tuple[Shape, ...]] = {
    "cpu": (
        Shape(32, 3, 64, 64, 32, 3, 3, 1, 1, name="first 3->32 3x3"),
        Shape(32, 64, 16, 16, 64, 3, 3, 1, 1, name="mid 64 3x3 16x16"),
        Shape(32, 128, 8, 8, 128, 3, 3, 1, 1, name="mid 128 3x3 8x8"),
        SEED_SHAPE,
        Shape(32, 16, 32, 32, 32, 5, 5, 1, 2, name="5x5 16->32"),
        Shape(32, 64, 32, 32, 128, 3, 3, 2, 1, name="down 64->128 s2"),
        Shape(32, 128, 16, 16, 128, 1, 1, 1, 0, name="pointwise 128 1x1"),
        Shape(32, 64, 32, 32, 64, 3, 3, 1, 1, 1, 64, name="depthwise 64 3x3"),
        Shape(32, 32, 32, 32, 32, 3, 3, 1, 2, 2, name="dilated 32 d2"),
    ),
    "gpu": (
        Shape(64, 3, 224, 224, 64, 7, 7, 2, 3, name="stem 3->64 7x7 s2"),
        Shape(128, 64, 56, 56, 64, 3, 3, 1, 1, name="mid 64 3x3 56x56"),
        Shape(128, 128, 28, 28, 128, 3, 3, 1, 1, name="mid 128 3x3 28x28"),
        Shape(128, 256, 14, 14, 256, 3, 3, 1, 1, name="mid 256 3x3 14x14"),
        SEED_SHAPE,
        Shape(128, 64, 28, 28, 128, 5, 5, 1, 2, name="5x5 64->128"),
        Shape(128, 128, 56, 56, 256, 3, 3, 2, 1, name="down 128->256 s2"),
        Shape(128, 256, 28, 28, 256, 1, 1, 1, 0, name="pointwise 256 1x1"),
        Shape(128, 256, 28, 28, 256, 3, 3, 1, 1, 1, 256, name="depthwise 256 3x3"),
        Shape(128, 128, 28, 28, 128, 3, 3, 1, 2, 2, name="dilated 128 d2"),
    ),
    "seed": (SEED_SHAPE,),
}


def parse_shape(text: str) -> Shape:
    """A shape from its command-line form ``N,C,H,W,O,KH,KW,stride,pad[,dilation,groups]``.

    Raises
    ------
    ValueError
        Naming the string and the field that is wrong.

    Examples
    --------
    >>> parse_shape("8,3,32,32,16,3,3,1,1").out_h
    32
    """
    parts = [part.strip() for part in text.split(",")]
    if not 9 <= len(parts) <= 11:
        raise ValueError(
            f"shape {text!r}: expected {SHAPE_FORMAT} (9 to 11 integers), got {len(parts)} fields"
        )
    values = []
    for key, part in zip(_SHAPE_FIELDS, parts, strict=False):  # fewer parts: dilation and groups default to 1
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"shape {text!r}: {key.upper()}={part!r} is not an integer") from None
    return Shape(*values, name=text.replace(" ", ""))


def parse_shapes(text: str) -> list[Shape]:
    """A preset name (``cpu``, ``gpu``, ``seed``) or one custom shape; the ``--shapes`` argument type."""
    if text in PRESETS:
        return list(PRESETS[text])
    if "," not in text:
        raise ValueError(
            f"shapes {text!r}: not a preset ({', '.join(PRESETS)}) nor a custom shape {SHAPE_FORMAT}"
        )
    return [parse_shape(text)]


# --------------------------------------------------------------------------------------------------
# Timing


def time_calls(calls: dict[str, Callable[[], Any]], repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds taken by each call, `repeat` times each, after `warmup` untimed calls of each.

    The calls take turns (a, b, c, a, b, c, ...) so that a burst of load from other processes on
    a shared machine slows all of them alike instead of one; the median then drops the outliers.
    Each call must return only when its work is done (see :func:`_sync`).
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return samples


def _sync(backend: Backend, result: Any = None) -> Any:
    """Wait for the device to finish: GPU libraries return before the work is done."""
    if backend.name == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif backend.name == "torch" and backend.device.type == "cuda":
        import torch

        torch.cuda.synchronize(backend.device)
    elif backend.name == "jax":
        import jax

        jax.block_until_ready(result)
    return result


def _synced(backend: Backend, fn: Callable[[], Any]) -> Callable[[], Any]:
    return lambda: _sync(backend, fn())


# --------------------------------------------------------------------------------------------------
# The data of one measurement


@dataclass
class Case:
    """One shape's data on the backend, and the same values on the host for the seed and torch."""

    backend: Backend
    shape: Shape
    dtype: str
    host: dict[str, np.ndarray]
    arrays: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # algorithm=, when one is asked for

    @classmethod
    def make(cls, backend: Backend, shape: Shape, dtype: str, extra: dict[str, Any] | None = None) -> Case:
        # Random data, never zeros or ones: a GEMM library may shortcut those.
        rng = np.random.default_rng(0)
        s = shape
        sizes = {
            "x": (s.n, s.c, s.h, s.w),
            "weight": (s.o, s.c // s.groups, s.kh, s.kw),
            "bias": (s.o,),
            "grad_out": (s.n, s.o, s.out_h, s.out_w),
        }
        host = {key: rng.standard_normal(size).astype(dtype) for key, size in sizes.items()}
        arrays = {key: backend.asarray(value, dtype=dtype) for key, value in host.items()}
        return cls(backend, shape, dtype, host, arrays, dict(extra or {}))

    @property
    def kwargs(self) -> dict[str, Any]:
        return {**self.shape.conv_kwargs, **self.extra}

    def nbytes(self, *shapes: Sequence[int]) -> int:
        return sum(math.prod(size) for size in shapes) * np.dtype(self.dtype).itemsize


# --------------------------------------------------------------------------------------------------
# The measured things: each returns the calls to time (or the reason there are none)


def ours_calls(case: Case) -> dict[str, Callable[[], Any]]:
    """conv2d forward, backward (all three gradients) and forward then backward."""
    a, kw = case.arrays, case.kwargs

    def forward() -> Any:
        return conv2d(a["x"], a["weight"], a["bias"], **kw)

    def backward() -> Any:
        return conv2d_backward(a["grad_out"], a["x"], a["weight"], **kw)

    def forward_backward() -> Any:
        return forward(), backward()

    backend = case.backend
    return {
        "ours_fwd": _synced(backend, forward),
        "ours_bwd": _synced(backend, backward),
        "ours_fwdbwd": _synced(backend, forward_backward),
    }


def floor_calls(case: Case) -> dict[str, Callable[[], Any]]:
    """The bare matrix products of the convolution's sizes, one per group, batched over groups.

    What no im2col convolution can avoid: forward ``W (O/g x K) @ patches (K x N*OH*OW)`` with
    ``K = C/g*KH*KW``, and for the backward ``grad_y @ patches^T`` and ``W^T @ grad_y``. Their sum
    is the floor for forward+backward.
    """
    backend, xp = case.backend, case.backend.xp
    g, m, k, p = case.shape.gemm
    rng = np.random.default_rng(1)

    def operand(*size: int) -> Any:
        return backend.asarray(rng.standard_normal(size).astype(case.dtype), dtype=case.dtype)

    weight, cols, grad_y = operand(g, m, k), operand(g, k, p), operand(g, m, p)
    return {
        "floor_fwd": _synced(backend, lambda: xp.matmul(weight, cols)),
        "floor_grad_w": _synced(backend, lambda: xp.matmul(grad_y, xp.matrix_transpose(cols))),
        "floor_grad_cols": _synced(backend, lambda: xp.matmul(xp.matrix_transpose(weight), grad_y)),
    }


def _on_gpu(backend: Backend) -> bool:
    if backend.name == "cupy":
        return True
    if backend.name == "torch":
        return backend.device.type == "cuda"
    return backend.name == "jax" and getattr(backend.device, "platform", "cpu") in ("gpu", "cuda", "rocm")


def _torch_device(backend: Backend) -> tuple[Any, str | None]:
    """The torch device to compare with, or None and why: CPU for CPU backends, CUDA for GPU ones."""
    import torch

    if backend.name == "torch":
        return backend.device, None
    if not _on_gpu(backend):
        return torch.device("cpu"), None
    if not torch.cuda.is_available():
        return None, "the backend is on a GPU but this torch has no CUDA"
    index = backend.device.id if backend.name == "cupy" else 0
    return torch.device("cuda", index), None


def torch_calls(case: Case) -> dict[str, Callable[[], Any]] | str:
    """torch.nn.functional.conv2d forward, and forward + autograd backward, on the same values."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    device, reason = _torch_device(case.backend)
    if device is None:
        return reason or "no torch device"
    t = {key: torch.as_tensor(value, device=device) for key, value in case.host.items()}
    kw = case.shape.conv_kwargs
    conv = torch.nn.functional.conv2d
    leaves = [t["x"].clone().requires_grad_(), t["weight"].clone().requires_grad_(), t["bias"].clone().requires_grad_()]

    def forward() -> Any:
        return conv(t["x"], t["weight"], t["bias"], **kw)

    def forward_backward() -> Any:
        y = conv(*leaves, **kw)
        # autograd.grad rather than .backward(): fresh gradients, no accumulation into .grad between repeats.
        return torch.autograd.grad(y, leaves, t["grad_out"])

    def sync(fn: Callable[[], Any]) -> Callable[[], Any]:
        if device.type != "cuda":
            return fn
        return lambda: (fn(), torch.cuda.synchronize(device))

    return {"torch_fwd": sync(forward), "torch_fwdbwd": sync(forward_backward)}


# The seed is slow (np.add.at with four index arrays): it is timed with fewer repeats, and only where
# its float64 patch matrix stays this small, which keeps the run bounded and off the swap.
SEED_REPEAT = 3
SEED_MAX_PATCH_BYTES = 256 * 2**20


def seed_indices(c: int, kh: int, kw: int, out_h: int, out_w: int, stride: int) -> tuple[np.ndarray, ...]:
    """The seed's index arrays: input depth, row and column of every (patch row, output position).

    Patch rows run depth-major, then kernel row, then kernel column; output positions row-major.
    ``k`` is a column, broadcast against the (rows, positions) ``i`` and ``j``, as in the seed.
    """
    kernel_rows = np.tile(np.repeat(np.arange(kh), kw), c)[:, None]
    kernel_cols = np.tile(np.arange(kw), kh * c)[:, None]
    out_rows = stride * np.repeat(np.arange(out_h), out_w)[None, :]
    out_cols = stride * np.tile(np.arange(out_w), out_h)[None, :]
    depth = np.repeat(np.arange(c), kh * kw)[:, None]
    return depth, kernel_rows + out_rows, kernel_cols + out_cols


def seed_forward(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int, pad: int, indices: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The seed's forward without its sigmoid: returns (y, patches), patches kept for the backward.

    Padding, which the seed lacks, is a padded copy of the input made first, as a user of the seed
    would add it.
    """
    n = x.shape[0]
    o = weight.shape[0]
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k, i, j = indices
    out_h = (x.shape[2] - weight.shape[2]) // stride + 1
    out_w = (x.shape[3] - weight.shape[3]) // stride + 1
    # (n, rows, positions) -> (rows, positions * n): columns ordered by position, then sample.
    patches = x[:, k, i, j].transpose(1, 2, 0).reshape(k.shape[0], -1)
    y = weight.reshape(o, -1) @ patches + bias.reshape(-1, 1)
    return y.reshape(o, out_h, out_w, n).transpose(3, 0, 1, 2), patches


def seed_backward(
    grad_out: np.ndarray, x_shape: Sequence[int], weight: np.ndarray, patches: np.ndarray, pad: int,
    indices: tuple[np.ndarray, ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed's backward for the pre-activation gradient: (grad_x, grad_weight, grad_bias)."""
    n, c, h, w = x_shape
    o = weight.shape[0]
    k, i, j = indices
    grad_flat = grad_out.transpose(1, 2, 3, 0).reshape(o, -1)
    grad_patches = (weight.reshape(o, -1).T @ grad_flat).reshape(k.shape[0], -1, n).transpose(2, 0, 1)
    grad_x = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=grad_patches.dtype)
    # The seed's scatter: a pixel read by several patches receives the sum of their gradients.
    np.add.at(grad_x, (slice(None), k, i, j), grad_patches)
    if pad:
        grad_x = grad_x[:, :, pad:-pad, pad:-pad]
    grad_weight = (grad_flat @ patches.T).reshape(weight.shape)
    grad_bias = np.sum(grad_out, axis=(0, 2, 3))
    return grad_x, grad_weight, grad_bias


def seed_skip_reason(shape: Shape) -> str | None:
    """Why the seed cannot (or should not) run `shape`, or None."""
    if shape.groups != 1 or shape.dilation != 1:
        return "the seed has no groups and no dilation"
    _, _, k, p = shape.gemm
    if k * p * 8 > SEED_MAX_PATCH_BYTES:
        return f"its float64 patch matrix ({k * p * 8 / 2**20:.0f} MB) is over {SEED_MAX_PATCH_BYTES // 2**20} MB"
    return None


def seed_calls(case: Case) -> dict[str, Callable[[], Any]] | str:
    """The seed's forward, and forward then backward, in NumPy float64 whatever the dtype (as the seed)."""
    reason = seed_skip_reason(case.shape)
    if reason is not None:
        return reason
    s = case.shape
    h = {key: value.astype(np.float64) for key, value in case.host.items()}
    indices = seed_indices(s.c, s.kh, s.kw, s.out_h, s.out_w, s.stride)

    def forward() -> Any:
        return seed_forward(h["x"], h["weight"], h["bias"], s.stride, s.pad, indices)

    def forward_backward() -> Any:
        y, patches = forward()
        return y, seed_backward(h["grad_out"], h["x"].shape, h["weight"], patches, s.pad, indices)

    return {"seed_fwd": forward, "seed_fwdbwd": forward_backward}


# --------------------------------------------------------------------------------------------------
# Peak memory

SMALL_LIMIT = 64 * 2**20
LIMITS = {"default": None, "64MB": SMALL_LIMIT}  # label -> max_workspace_bytes (None: the default)


class _PeakTracker:
    """Peak bytes allocated on the backend's device while it is active, above what was there before.

    Only where the allocations can be seen: NumPy reports its data allocations to tracemalloc (and
    array-api-strict wraps NumPy arrays), torch on CUDA keeps a peak counter, CuPy takes hooks.
    torch's and JAX's CPU allocators are invisible from Python.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.peak = 0
        if backend.name in ("numpy", "array_api_strict"):
            self.kind: str | None = "tracemalloc"
        elif backend.name == "torch" and backend.device.type == "cuda":
            self.kind = "torch_cuda"
        elif backend.name == "cupy":
            self.kind = "cupy"
        else:
            self.kind = None

    def __enter__(self) -> _PeakTracker:
        if self.kind == "tracemalloc":
            self._was_tracing = tracemalloc.is_tracing()
            if not self._was_tracing:
                tracemalloc.start()
            self._start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        elif self.kind == "torch_cuda":
            import torch

            torch.cuda.synchronize(self.backend.device)
            self._start = torch.cuda.memory_allocated(self.backend.device)
            torch.cuda.reset_peak_memory_stats(self.backend.device)
        elif self.kind == "cupy":
            self._hook = _cupy_peak_hook()
            self._hook.__enter__()
        else:
            raise NotImplementedError(f"peak memory is not measured on {self.backend.spec}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "tracemalloc":
            self.peak = tracemalloc.get_traced_memory()[1] - self._start
            if not self._was_tracing:
                tracemalloc.stop()
        elif self.kind == "torch_cuda":
            import torch

            torch.cuda.synchronize(self.backend.device)
            self.peak = torch.cuda.max_memory_allocated(self.backend.device) - self._start
        else:
            import cupy

            cupy.cuda.get_current_stream().synchronize()
            self._hook.__exit__(*exc)
            self.peak = self._hook.peak


def _cupy_peak_hook() -> Any:
    """A CuPy memory hook that follows the bytes taken from the memory pool and keeps their peak."""
    import cupy

    class PeakHook(cupy.cuda.MemoryHook):
        name = "conv2d_bench_peak"

        def __init__(self) -> None:
            self.current = self.peak = 0

        def malloc_postprocess(self, **kwargs: Any) -> None:
            self.current += kwargs["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kwargs: Any) -> None:
            self.current -= kwargs["mem_size"]

    return PeakHook()


def peak_memory(case: Case) -> dict[str, int | None] | str:
    """Peak extra bytes of one forward+backward (output and gradients included), per workspace limit.

    Returns the reason instead where the backend's allocations cannot be seen.
    """
    if _PeakTracker(case.backend).kind is None:
        return f"not measured on {case.backend.spec} (its allocations are invisible from Python)"
    a = case.arrays
    peaks: dict[str, int | None] = {}
    for label, limit in LIMITS.items():
        kw = dict(case.kwargs)
        if limit is not None:
            kw["max_workspace_bytes"] = limit
        gc.collect()
        with _PeakTracker(case.backend) as tracker:
            result = conv2d(a["x"], a["weight"], a["bias"], **kw)
            result = result, conv2d_backward(a["grad_out"], a["x"], a["weight"], **kw)
            _sync(case.backend, result)
            del result
        peaks[label] = tracker.peak
    return peaks


# --------------------------------------------------------------------------------------------------
# One shape, all of it


# How the repeats of one call are summarised. The median is the default; on a shared machine the
# fastest call is the one least disturbed by other processes.
STATISTICS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def measure(case: Case, repeat: int, stat: str = "median") -> dict[str, Any]:
    """Every number for one shape: times (ms), ratios, peak memory, what was skipped.

    ``ms`` and the ratios use `stat` (a key of :data:`STATISTICS`); the median, the minimum and
    every sample are kept beside them.
    """
    torch, seed = torch_calls(case), seed_calls(case)
    skipped = {label: made for label, made in (("torch", torch), ("seed", seed)) if isinstance(made, str)}
    calls = {**ours_calls(case), **floor_calls(case), **({} if isinstance(torch, str) else torch)}
    samples = time_calls(calls, repeat)
    if not isinstance(seed, str):
        samples.update(time_calls(seed, min(repeat, SEED_REPEAT)))
    ms = {name: STATISTICS[stat](values) * 1e3 for name, values in samples.items()}
    ms["floor_fwdbwd"] = ms["floor_fwd"] + ms["floor_grad_w"] + ms["floor_grad_cols"]

    peaks = peak_memory(case)
    if isinstance(peaks, str):
        skipped["memory"] = peaks
        peaks = dict.fromkeys(LIMITS)
    s = case.shape
    return {
        "shape": {**{key: getattr(s, key) for key in _SHAPE_FIELDS}, "name": s.label, "spec": s.spec,
                  "out_h": s.out_h, "out_w": s.out_w},
        "forward_gflop": s.forward_flops / 1e9,
        "ms": ms,
        "median_ms": {name: statistics.median(values) * 1e3 for name, values in samples.items()},
        "min_ms": {name: min(values) * 1e3 for name, values in samples.items()},
        "samples_ms": {name: [t * 1e3 for t in values] for name, values in samples.items()},
        "ratios": {
            "ours_over_torch": _ratio(ms["ours_fwdbwd"], ms.get("torch_fwdbwd")),
            "ours_fwd_over_torch_fwd": _ratio(ms["ours_fwd"], ms.get("torch_fwd")),
            "fwd_over_floor": _ratio(ms["ours_fwd"], ms["floor_fwd"]),
            "fwdbwd_over_floor": _ratio(ms["ours_fwdbwd"], ms["floor_fwdbwd"]),
            "seed_over_ours": _ratio(ms.get("seed_fwdbwd"), ms["ours_fwdbwd"]),
        },
        "peak_bytes": peaks,
        # What any call must hold: y, grad_x, grad_weight, grad_bias. The workspace limit bounds the rest.
        "outputs_bytes": case.nbytes((s.n, s.o, s.out_h, s.out_w), (s.n, s.c, s.h, s.w),
                                     (s.o, s.c // s.groups, s.kh, s.kw), (s.o,)),
        "skipped": skipped,
    }


# --------------------------------------------------------------------------------------------------
# The table

_COLUMNS = (  # header, width, how to get the text from a result
    ("fwd ms", 9, lambda r: _num(r["ms"]["ours_fwd"])),
    ("bwd ms", 9, lambda r: _num(r["ms"]["ours_bwd"])),
    ("f+b ms", 9, lambda r: _num(r["ms"]["ours_fwdbwd"])),
    ("torch f+b", 9, lambda r: _num(r["ms"].get("torch_fwdbwd"))),
    ("ours/torch", 10, lambda r: _num(r["ratios"]["ours_over_torch"], 2)),
    ("fwd/floor", 9, lambda r: _num(r["ratios"]["fwd_over_floor"], 2)),
    ("f+b/floor", 9, lambda r: _num(r["ratios"]["fwdbwd_over_floor"], 2)),
    ("seed/ours", 9, lambda r: _num(r["ratios"]["seed_over_ours"], 2)),
    ("peak MB dflt/64MB", 17, lambda r: "/".join(_mb(v) for v in r["peak_bytes"].values())),
)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def table_header(name_width: int) -> str:
    head = f"{'shape':<{name_width}}" + "".join(f" {title:>{width}}" for title, width, _ in _COLUMNS)
    return f"{head}\n{'-' * len(head)}"


def table_row(result: dict[str, Any], name_width: int) -> str:
    return f"{result['shape']['name']:<{name_width}}" + "".join(
        f" {get(result):>{width}}" for _, width, get in _COLUMNS
    )


# The project's targets (issue #3), printed beside the numbers they are read from.
TARGETS = {
    "ours_over_torch": "target <= 1.5 in float32",
    "fwd_over_floor": "target <= 1.3",
    "seed_shape": "target >= 3 in float64",
}


def summary(results: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
    """The numbers the targets are read from: medians over shapes, the worst shape, the memory check.

    With an odd number of shapes the median is the value of one shape, "the median shape".
    """
    out: dict[str, Any] = {}
    for key in ("ours_over_torch", "fwd_over_floor", "fwdbwd_over_floor", "seed_over_ours"):
        values = sorted((r["ratios"][key], r["shape"]["name"]) for r in results if r["ratios"][key] is not None)
        if values:
            # For seed/ours the worst shape is the one we beat the seed by least.
            worst = values[0] if key == "seed_over_ours" else values[-1]
            out[key] = {"median": statistics.median(v for v, _ in values), "worst": worst[0], "worst_shape": worst[1]}
    seed_rows = [r for r in results if r["shape"]["spec"] == SEED_SHAPE.spec and r["ratios"]["seed_over_ours"] is not None]
    if seed_rows:
        out["seed_shape"] = {"seed_over_ours": seed_rows[0]["ratios"]["seed_over_ours"], "ours_dtype": dtype}
    limited = [r for r in results if r["peak_bytes"].get("64MB") is not None]
    if limited:
        # Target: one forward+backward at a 64 MB limit peaks below 64 MB plus its output and gradients.
        extra = {r["shape"]["name"]: r["peak_bytes"]["64MB"] - r["outputs_bytes"] for r in limited}
        out["limit_64MB"] = {
            "shapes": len(limited),
            "max_extra_bytes": max(extra.values()),
            "over_limit": [name for name, value in extra.items() if value > SMALL_LIMIT],
        }
    return out


def summary_lines(summ: dict[str, Any]) -> list[str]:
    """The summary under the table, each number with the target it is read against."""
    lines = []
    for key, label in (
        ("ours_over_torch", "fwd+bwd ours/torch"),
        ("fwd_over_floor", "fwd/floor"),
        ("fwdbwd_over_floor", "fwd+bwd/floor"),
        ("seed_over_ours", "fwd+bwd seed/ours"),
    ):
        if key in summ:
            t = summ[key]
            target = f" ({TARGETS[key]})" if key in TARGETS else ""
            worst = "least" if key == "seed_over_ours" else "worst"
            lines.append(
                f"{label}: median {t['median']:.2f}{target}, {worst} {t['worst']:.2f} ({t['worst_shape']})"
            )
    if "seed_shape" in summ:
        t = summ["seed_shape"]
        note = "" if t["ours_dtype"] == "float64" else (
            f"; ours ran in {t['ours_dtype']}, rerun with --shapes seed --dtype float64 for the target"
        )
        lines.append(f"seed geometry fwd+bwd seed/ours: {t['seed_over_ours']:.2f} ({TARGETS['seed_shape']}{note})")
    if "limit_64MB" in summ:
        m = summ["limit_64MB"]
        over = f"over 64 MB on {len(m['over_limit'])} of" if m["over_limit"] else "within 64 MB on all"
        names = f" ({', '.join(m['over_limit'])})" if m["over_limit"] else ""
        lines.append(
            f"peak at the 64 MB limit minus output and gradients: at most {m['max_extra_bytes'] / 2**20:.1f} MB, "
            f"{over} {m['shapes']} shape{'s' if m['shapes'] != 1 else ''}{names}"
        )
    return lines


# --------------------------------------------------------------------------------------------------
# Machine details, JSON and plot

_DISTRIBUTIONS = ("numpy", "array-api-compat", "torch", "jax", "jaxlib", "cupy-cuda12x", "cupy-cuda13x",
                  "array-api-strict", "threadpoolctl", "matplotlib")


def _cpu_model() -> str | None:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    for line in lscpu.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def machine_info(backend: Backend) -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, BLAS and its threads, library versions, device."""
    versions = {"conv2d": __version__}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "versions": versions,
        "backend": backend.spec,
        "env": {key: os.environ[key] for key in ("CONV2D_MAX_WORKSPACE", "OMP_NUM_THREADS",
                                                  "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if key in os.environ},
    }
    try:
        import threadpoolctl

        info["threadpools"] = threadpoolctl.threadpool_info()
    except ImportError:
        info["threadpools"] = "threadpoolctl is not installed (pip install 'conv2d[bench]')"
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name()
    if backend.name == "cupy":
        import cupy

        info["cuda_device"] = cupy.cuda.runtime.getDeviceProperties(backend.device.id)["name"].decode()
    return info


def _load_average() -> float | None:
    """The 1-minute load average, where the OS has one: it says how much else was running."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _other_load(load: dict[str, float | None], cores: int | None) -> float | None:
    """Roughly how many cores other processes kept busy throughout, or None where unknown.

    This run itself adds up to `cores` to the load after it; the load before it may still be that
    of the previous command. Busy on both counts means busy throughout.
    """
    if load["before"] is None or load["after"] is None or not cores:
        return None
    return max(0.0, min(load["before"], load["after"] - cores))


def _blas_line(info: dict[str, Any]) -> str:
    pools = info.get("threadpools")
    if not isinstance(pools, list):
        return "BLAS: unknown (no threadpoolctl)"
    blas = [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
            for p in pools if p.get("user_api") == "blas"]
    return "BLAS: " + (", ".join(blas) or "none found")


def write_plot(results: list[dict[str, Any]], path: str, title: str, stat: str = "median") -> None:
    """A grouped bar chart, forward+backward ms per shape: ours, torch, the floor (log scale)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI; Agg draws the PNG

    series = (("ours", "ours_fwdbwd"), ("torch", "torch_fwdbwd"), ("floor (GEMMs)", "floor_fwdbwd"))
    names = [r["shape"]["name"] for r in results]
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for index, (label, key) in enumerate(series):
        values = [r["ms"].get(key, math.nan) for r in results]
        ax.bar([pos + (index - 1) * width for pos in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"forward+backward, ms ({stat})")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------
# Command line


def _shapes_arg(text: str) -> list[Shape]:
    try:
        return parse_shapes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m conv2d bench``."""
    parser.add_argument("--backend", default=None,
                        help="backend spec (numpy, torch, torch:cuda, cupy, jax, ...); default: the active one")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="dtype of ours, torch and the floor (the seed is always float64); default float32")
    parser.add_argument("--shapes", nargs="+", type=_shapes_arg, default=None, metavar="SHAPES",
                        help=f"presets ({', '.join(PRESETS)}) and/or custom shapes {SHAPE_FORMAT}; default cpu, "
                             "or gpu on a GPU backend")
    parser.add_argument("--repeat", type=_positive_arg, default=5,
                        help=f"timed calls per measurement, summarised by --stat (seed: at most {SEED_REPEAT}); default 5")
    parser.add_argument("--stat", default="median", choices=tuple(STATISTICS),
                        help="summary of the repeats: median (default), or min, the least disturbed on a busy machine")
    parser.add_argument("--algorithm", default="auto",
                        help="conv2d's algorithm= (one of conv2d.ALGORITHMS, or auto); default auto")
    parser.add_argument("--json", metavar="PATH", help="write every number and the machine's details here")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) here; needs matplotlib")


def _algorithm_extra(algorithm: str) -> dict[str, Any]:
    """conv2d keyword arguments for --algorithm ("auto", the default, adds none)."""
    if algorithm == "auto":
        return {}
    # A one-pixel call checks the name now, with conv2d's own message listing the choices,
    # rather than after the first shape's data is made.
    pixel = np.ones((1, 1, 1, 1))
    conv2d(pixel, pixel, algorithm=algorithm)
    return {"algorithm": algorithm}


def run(args: argparse.Namespace) -> int:
    """Run ``python -m conv2d bench``: print the table, write the JSON and plot if asked; exit code."""
    started = time.perf_counter()
    load_before = _load_average()
    try:
        backend = get_backend(args.backend)
        backend.dtype(args.dtype)  # fails now, with the reason, rather than at the first shape
        extra = _algorithm_extra(args.algorithm)
    except (ValueError, TypeError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.shapes is None:
        shapes = list(PRESETS["gpu" if _on_gpu(backend) else "cpu"])
    else:
        shapes = [shape for group in args.shapes for shape in group]
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before the long run, not after it
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'conv2d[bench]'", file=sys.stderr)
            return 2

    info = machine_info(backend)
    print(f"conv2d {__version__} bench: backend {backend.spec}, {args.dtype}, algorithm {args.algorithm}; "
          f"{args.stat} of {args.repeat} (seed: {min(args.repeat, SEED_REPEAT)}, float64) after 1 warm-up")
    print(f"CPU: {info['cpu_model'] or info['processor'] or info['machine']}, {info['cpus_usable']} usable cores; "
          f"{_blas_line(info)}")
    name_width = max(len("shape"), *(len(s.label) for s in shapes))
    print(table_header(name_width), flush=True)
    results = []
    for shape in shapes:
        result = measure(Case.make(backend, shape, args.dtype, extra), args.repeat, args.stat)
        results.append(result)
        print(table_row(result, name_width), flush=True)
    skipped = sorted({f"{what}: {why}" for r in results for what, why in r["skipped"].items()})
    for line in skipped:
        print(f"  '-' {line}")
    summ = summary(results, args.dtype)
    for line in summary_lines(summ):
        print(line)
    info = machine_info(backend)  # again: torch is imported by now, so its threads are known
    elapsed = time.perf_counter() - started
    load = {"before": load_before, "after": _load_average()}
    print(f"total {elapsed:.0f} s; times in ms, ratios of the {args.stat} times; peak MB: one forward+backward "
          "including its output and gradients, at the default workspace limit and at 64 MB")
    others = _other_load(load, info["cpus_usable"])
    if others is not None and others >= 1:
        # Other processes competing for the cores make multi-threaded BLAS calls many times slower.
        print(f"warning: about {others:.1f} cores were busy with other work (load average {load['before']:.1f} "
              f"before, {load['after']:.1f} after, on {info['cpus_usable']} cores): the times are noisy; "
              "rerun, or use --stat min")

    if args.json:
        report = {
            "command": sys.argv,
            "settings": {"backend": backend.spec, "dtype": args.dtype, "repeat": args.repeat,
                         "seed_repeat": min(args.repeat, SEED_REPEAT), "warmup": 1, "stat": args.stat,
                         "algorithm": args.algorithm,
                         "small_limit_bytes": SMALL_LIMIT},
            "machine": info,
            "results": results,
            "summary": summ,
            "total_seconds": elapsed,
            "load_average_1min": load,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    if args.plot:
        title = f"conv2d {__version__} on {backend.spec}, {args.dtype}: {info['cpu_model']}"
        write_plot(results, args.plot, title, args.stat)
    return 0


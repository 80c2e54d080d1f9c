"""``python -m conv2d bench``: time conv2d against PyTorch, the bare matrix products and the seed.

For each shape, in one process and on the same data, it measures (median of ``--repeat`` timed
calls after a warm-up call, three on a GPU):

- ours: :func:`conv2d.conv2d`, :func:`conv2d.conv2d_backward` and the two in a row; with
  ``--deterministic``, also the two in a row with ``deterministic=True`` (where conv2d has it);
- the floor: the bare matrix products a convolution of that size cannot avoid, on the same backend
  (forward ``W @ patches`` per group; backward ``grad_y @ patches^T`` and ``W^T @ grad_y``);
- PyTorch: ``torch.nn.functional.conv2d`` forward, and forward plus autograd backward, when torch is
  importable (CPU tensors, or CUDA tensors when the backend is on a GPU);
- the seed: a NumPy reimplementation of the algorithm this project grew from (float64, patches gathered
  with three index arrays, one matrix product, ``np.add.at`` with four index arrays), the baseline
  users come from;
- the peak extra memory of one forward+backward, with the default workspace limit and with 64 MB.

On a GPU (CuPy, torch on CUDA) each call is timed by two CUDA events around it, on the device's own
clock, and TF32 is off on both sides (PyTorch's and CuPy's float32 matrix products, cuDNN's
convolutions) so that float32 is compared with float32; PyTorch picks its fastest cuDNN algorithm
(``torch.backends.cudnn.benchmark``). The JSON records these settings.

Optional libraries (torch, matplotlib, threadpoolctl, cupy, jax) are imported inside the functions
that need them: ``python -m conv2d info`` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from ._functional import conv2d, conv2d_backward
from .backends import Backend, BackendUnavailableError, get_backend

__all__ = ["PRESETS", "TARGETS", "EventTimer", "Shape", "Target", "add_arguments", "measure", "parse_shape",
           "parse_shapes", "run", "time_calls", "wall_timer"]

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
# default --repeat; one shape per kind of layer the issue names. An odd number of shapes each, so
# that the median over a preset, which the targets are read from, is the value of one shape.
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


# A timer runs one call and returns the seconds until its work is done.
Timer = Callable[[Callable[[], Any]], float]


def wall_timer(sync: Callable[[Any], Any] | None = None) -> Timer:
    """A timer reading ``time.perf_counter`` around the call and `sync` of its result.

    `sync` waits for the device (see :func:`_sync`); without it the call must return only when
    its work is done, as NumPy's and torch's CPU functions do.
    """

    def timed(call: Callable[[], Any]) -> float:
        start = time.perf_counter()
        result = call()
        if sync is not None:
            sync(result)
        return time.perf_counter() - start

    return timed


class EventTimer:
    """A timer reading the GPU's clock: CUDA events recorded on the stream before and after the call.

    The time is the device's, from the start event to the end event (kernels queued by the call,
    and any gap while Python queues them), without the host's synchronisation latency that a
    ``perf_counter`` around a synchronize adds to every sample. The library is given by two
    functions, so that the same code serves CuPy, torch and a stand-in in the tests:

    Parameters
    ----------
    new_event : callable
        ``new_event()`` makes an event that can be timed; it has ``record(stream)`` and
        ``synchronize()``.
    elapsed_ms : callable
        ``elapsed_ms(start, end)``: milliseconds between two recorded, completed events.
    stream : object, optional
        Passed to ``record``; None is the current stream of the current device.
    """

    def __init__(self, new_event: Callable[[], Any], elapsed_ms: Callable[[Any, Any], float],
                 stream: Any = None) -> None:
        self.new_event = new_event
        self.elapsed_ms = elapsed_ms
        self.stream = stream

    def __call__(self, call: Callable[[], Any]) -> float:
        start, end = self.new_event(), self.new_event()
        start.record(self.stream)
        call()
        end.record(self.stream)
        end.synchronize()  # the end event completes after every kernel queued before it
        return self.elapsed_ms(start, end) / 1e3


def _event_timer(library: str, device: Any) -> EventTimer:
    """CUDA-event timer of CuPy (`device` a ``cupy.cuda.Device``) or torch (a CUDA ``torch.device``)."""
    if library == "cupy":
        import cupy

        with device:  # the current stream of the backend's device, whatever device is current later
            stream = cupy.cuda.get_current_stream()
        return EventTimer(cupy.cuda.Event, cupy.cuda.get_elapsed_time, stream)
    import torch

    return EventTimer(lambda: torch.cuda.Event(enable_timing=True), lambda start, end: start.elapsed_time(end),
                      torch.cuda.current_stream(device))


def backend_timer(backend: Backend) -> Timer:
    """How to time calls on `backend`: CUDA events for CuPy and torch on CUDA, else the wall clock."""
    if backend.name == "cupy":
        return _event_timer("cupy", backend.device)
    if backend.name == "torch" and backend.device.type == "cuda":
        return _event_timer("torch", backend.device)
    return wall_timer(lambda result: _sync(backend, result))  # JAX (any device) returns before it is done


def _torch_timer(device: Any) -> Timer:
    """How to time the PyTorch reference on `device` (a ``torch.device``)."""
    return _event_timer("torch", device) if device.type == "cuda" else wall_timer()


def time_calls(calls: dict[str, Callable[[], Any]], repeat: int, warmup: int = 1,
               timer: Timer | Mapping[str, Timer] | None = None) -> dict[str, list[float]]:
    """Seconds taken by each call, `repeat` times each, after `warmup` untimed calls of each.

    The calls take turns (a, b, c, a, b, c, ...) so that a burst of load from other processes on
    a shared machine slows all of them alike instead of one; the median then drops the outliers.
    `timer` times one call (one for all, or one per call name); the default is the wall clock
    around a call that returns only when its work is done. Warm-up calls go through the timer
    too, so that they also wait for the device.
    """
    default = wall_timer()
    timers = {name: (timer.get(name, default) if isinstance(timer, Mapping) else timer or default)
              for name in calls}
    for _ in range(warmup):
        for name, call in calls.items():
            timers[name](call)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            samples[name].append(timers[name](call))
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


# More warm-up calls on a GPU: the first calls compile CuPy's kernels, and PyTorch's first calls of a
# shape try every cuDNN algorithm (cudnn.benchmark) and keep the fastest.
WARMUP = {"cpu": 1, "gpu": 3}


def default_warmup(backend: Backend) -> int:
    """Untimed calls before the timed ones on `backend`: :data:`WARMUP` of its kind of device."""
    return WARMUP["gpu" if _on_gpu(backend) else "cpu"]


# --------------------------------------------------------------------------------------------------
# Float32 on a GPU means float32: no TF32 on either side


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
    flags = (  # (owner, attribute, value while benchmarking)
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
        # Random data, never zeros or ones: a GEMM library may shortcut those. Drawn in the dtype
        # itself: the GPU preset's arrays are large, and float64 draws would take twice the time.
        rng = np.random.default_rng(0)
        s = shape
        sizes = {
            "x": (s.n, s.c, s.h, s.w),
            "weight": (s.o, s.c // s.groups, s.kh, s.kw),
            "bias": (s.o,),
            "grad_out": (s.n, s.o, s.out_h, s.out_w),
        }
        host = {key: rng.standard_normal(size, dtype=np.dtype(dtype)) for key, size in sizes.items()}
        arrays = {key: backend.asarray(value, dtype=dtype) for key, value in host.items()}
        return cls(backend, shape, dtype, host, arrays, dict(extra or {}))

    @property
    def kwargs(self) -> dict[str, Any]:
        return {**self.shape.conv_kwargs, **self.extra}

    def nbytes(self, *shapes: Sequence[int]) -> int:
        return sum(math.prod(size) for size in shapes) * np.dtype(self.dtype).itemsize


# --------------------------------------------------------------------------------------------------
# The measured things: each returns the calls to time (or the reason there are none)


def deterministic_supported() -> bool:
    """Whether this conv2d takes ``deterministic=`` (in both functions): the bench runs before and after it."""
    return all("deterministic" in inspect.signature(fn).parameters for fn in (conv2d, conv2d_backward))


def ours_calls(case: Case, deterministic: bool = False) -> dict[str, Callable[[], Any]]:
    """conv2d forward, backward (all three gradients) and forward then backward.

    With `deterministic` (where :func:`deterministic_supported`), also forward then backward with
    ``deterministic=True``, "ours_fwdbwd_det", to read the price of reproducible sums beside the
    default (which follows ``CONV2D_DETERMINISTIC``).
    """
    a = case.arrays

    def forward_backward(**kw: Any) -> Callable[[], Any]:
        def call() -> Any:
            return (conv2d(a["x"], a["weight"], a["bias"], **kw),
                    conv2d_backward(a["grad_out"], a["x"], a["weight"], **kw))

        return call

    kw = case.kwargs
    calls = {
        "ours_fwd": lambda: conv2d(a["x"], a["weight"], a["bias"], **kw),
        "ours_bwd": lambda: conv2d_backward(a["grad_out"], a["x"], a["weight"], **kw),
        "ours_fwdbwd": forward_backward(**kw),
    }
    if deterministic:
        calls["ours_fwdbwd_det"] = forward_backward(**kw, deterministic=True)
    return calls


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
        return backend.asarray(rng.standard_normal(size, dtype=np.dtype(case.dtype)), dtype=case.dtype)

    weight, cols, grad_y = operand(g, m, k), operand(g, k, p), operand(g, m, p)
    return {
        "floor_fwd": lambda: xp.matmul(weight, cols),
        "floor_grad_w": lambda: xp.matmul(grad_y, xp.matrix_transpose(cols)),
        "floor_grad_cols": lambda: xp.matmul(xp.matrix_transpose(weight), grad_y),
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
    """torch.nn.functional.conv2d forward, and forward + autograd backward, on the same values.

    On CUDA they return before the work is done: time them with :func:`_torch_timer`.
    """
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

    return {"torch_fwd": forward, "torch_fwdbwd": forward_backward}


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


def _device_scope(backend: Backend) -> contextlib.AbstractContextManager[Any]:
    """The backend's GPU as the current device (events and streams belong to one), else nothing."""
    if backend.name == "cupy":
        return backend.device
    if backend.name == "torch" and backend.device.type == "cuda":
        import torch

        return torch.cuda.device(backend.device)
    return contextlib.nullcontext()


def _timers(case: Case, names: Sequence[str]) -> dict[str, Timer]:
    """The timer of each call: the backend's for ours and the floor, the reference device's for torch."""
    ours = backend_timer(case.backend)
    timers = {name: ours for name in names if not name.startswith("torch_")}
    if any(name.startswith("torch_") for name in names):
        torch_timer = _torch_timer(_torch_device(case.backend)[0])
        timers.update({name: torch_timer for name in names if name.startswith("torch_")})
    return timers


def _time_all(case: Case, repeat: int, warmup: int, deterministic: bool,
              with_seed: bool = True) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds of every call of one shape, and what was skipped and why."""
    torch, seed = torch_calls(case), seed_calls(case) if with_seed else "not asked for (--no-seed)"
    skipped = {label: made for label, made in (("torch", torch), ("seed", seed)) if isinstance(made, str)}
    if deterministic and not deterministic_supported():
        skipped["deterministic"] = "this conv2d has no deterministic= argument"
        deterministic = False
    calls = {**ours_calls(case, deterministic), **floor_calls(case), **({} if isinstance(torch, str) else torch)}
    with _device_scope(case.backend):
        samples = time_calls(calls, repeat, warmup, _timers(case, list(calls)))
    if not isinstance(seed, str):
        # NumPy on the CPU, and slow: one warm-up call whatever the device, and fewer repeats.
        samples.update(time_calls(seed, min(repeat, SEED_REPEAT)))
    return samples, skipped


def measure(case: Case, repeat: int, stat: str = "median", warmup: int | None = None,
            deterministic: bool = False, with_seed: bool = True) -> dict[str, Any]:
    """Every number for one shape: times (ms), ratios, peak memory, what was skipped.

    Parameters
    ----------
    case : Case
        The shape and its data on the backend.
    repeat : int
        Timed calls of each measured thing (the seed: at most :data:`SEED_REPEAT`).
    stat : str
        How ``ms`` and the ratios summarise the repeats, a key of :data:`STATISTICS`; the median,
        the minimum and every sample are kept beside them.
    warmup : int, optional
        Untimed calls of each thing first; default :func:`default_warmup` of the backend.
    deterministic : bool
        Also time forward+backward with ``deterministic=True`` ("ours_fwdbwd_det" and the ratio
        "det_over_default"), where conv2d takes that argument; skipped with the reason where not.
    with_seed : bool
        Time the seed (NumPy, float64, on the CPU) where it can run the shape.
    """
    warmup = default_warmup(case.backend) if warmup is None else warmup
    samples, skipped = _time_all(case, repeat, warmup, deterministic, with_seed)
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
            "det_over_default": _ratio(ms.get("ours_fwdbwd_det"), ms["ours_fwdbwd"]),
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
    ("det/dflt", 8, lambda r: _num(r["ratios"].get("det_over_default"), 2)),
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


@dataclass(frozen=True)
class Target:
    """A project target on one summary number: ``number <op> value``, printed with its note."""

    op: str  # "<=" or ">="
    value: float
    note: str = ""

    def met(self, number: float) -> bool:
        return number <= self.value if self.op == "<=" else number >= self.value

    @property
    def text(self) -> str:
        return f"target {self.op} {self.value:g}{self.note}"


# The project's targets, printed beside the numbers they are read from: issue #3 on the CPU, issue #4
# on a GPU. The ratios' targets apply to their median over the preset, with an odd preset the value
# of its median shape; "seed_shape" to the seed's own layer alone.
TARGETS: dict[str, dict[str, Target]] = {
    "cpu": {
        "ours_over_torch": Target("<=", 1.5, " in float32"),
        "fwd_over_floor": Target("<=", 1.3),
        "det_over_default": Target("<=", 1.3),
        "seed_shape": Target(">=", 3, " in float64"),
    },
    "gpu": {
        "ours_over_torch": Target("<=", 1.5, " in float32, median shape of the gpu preset"),
        "fwd_over_floor": Target("<=", 1.3, ", median shape of the gpu preset"),
        "det_over_default": Target("<=", 1.3),
    },
}

# Summary key -> the label of its line; ratios where the worst shape is the largest, but for seed/ours.
_SUMMARISED = {
    "ours_over_torch": "fwd+bwd ours/torch",
    "fwd_over_floor": "fwd/floor",
    "fwdbwd_over_floor": "fwd+bwd/floor",
    "det_over_default": "fwd+bwd deterministic/default",
    "seed_over_ours": "fwd+bwd seed/ours",
}


def _ratio_summary(results: list[dict[str, Any]], key: str, target: Target | None) -> dict[str, Any] | None:
    """Median and worst of one ratio over the shapes that have it, and the target's verdict."""
    values = sorted((r["ratios"].get(key), r["shape"]["name"]) for r in results if r["ratios"].get(key) is not None)
    if not values:
        return None
    # For seed/ours the worst shape is the one we beat the seed by least.
    worst = values[0] if key == "seed_over_ours" else values[-1]
    median = statistics.median(v for v, _ in values)
    out: dict[str, Any] = {"median": median, "worst": worst[0], "worst_shape": worst[1], "shapes": len(values)}
    if len(values) % 2:
        out["median_shape"] = values[len(values) // 2][1]
    if target is not None:
        out.update(target=target.text, met=target.met(median))
    return out


def summary(results: list[dict[str, Any]], dtype: str, on_gpu: bool = False) -> dict[str, Any]:
    """The numbers the targets are read from: medians over shapes, the worst shape, the memory check.

    With an odd number of shapes the median is the value of one shape, "the median shape". The
    targets are those of :data:`TARGETS` for the GPU when `on_gpu`, else for the CPU; each number
    with a target carries its text and ``met``.
    """
    device = "gpu" if on_gpu else "cpu"
    targets = TARGETS[device]
    out: dict[str, Any] = {"targets_for": device}
    for key in _SUMMARISED:
        entry = _ratio_summary(results, key, targets.get(key))
        if entry is not None:
            out[key] = entry
    seed_rows = [r for r in results if r["shape"]["spec"] == SEED_SHAPE.spec and r["ratios"]["seed_over_ours"] is not None]
    if seed_rows:
        value = seed_rows[0]["ratios"]["seed_over_ours"]
        out["seed_shape"] = {"seed_over_ours": value, "ours_dtype": dtype}
        if "seed_shape" in targets:
            target = targets["seed_shape"]
            # Only float64 against the seed's float64 counts for the target.
            out["seed_shape"].update(target=target.text, met=target.met(value) if dtype == "float64" else None)
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


def _verdict(entry: dict[str, Any], note: str = "") -> str:
    """" (target <= 1.3: met)", or "NOT met", or no verdict where there is none; empty without a target."""
    if "target" not in entry:
        return ""
    verdict = {True: ": met", False: ": NOT met", None: ""}[entry["met"]]
    return f" ({entry['target']}{verdict}{note})"


def summary_lines(summ: dict[str, Any]) -> list[str]:
    """The summary under the table, each number with the target it is read against."""
    lines = []
    for key, label in _SUMMARISED.items():
        if key in summ:
            t = summ[key]
            worst = "least" if key == "seed_over_ours" else "worst"
            median_shape = f" ({t['median_shape']})" if "median_shape" in t else ""
            lines.append(
                f"{label}: median {t['median']:.2f}{median_shape}{_verdict(t)}, "
                f"{worst} {t['worst']:.2f} ({t['worst_shape']})"
            )
    if "seed_shape" in summ:
        t = summ["seed_shape"]
        note = "" if t["ours_dtype"] == "float64" else (
            f"; ours ran in {t['ours_dtype']}, rerun with --shapes seed --dtype float64 for the target"
        )
        lines.append(f"seed geometry fwd+bwd seed/ours: {t['seed_over_ours']:.2f}{_verdict(t, note)}")
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


# The environment variables that change what is measured, recorded where set.
_ENV_VARS = ("CONV2D_BACKEND", "CONV2D_MAX_WORKSPACE", "CONV2D_DETERMINISTIC", "OMP_NUM_THREADS",
             "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUPY_TF32", "NVIDIA_TF32_OVERRIDE",
             "CUBLAS_WORKSPACE_CONFIG")


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
        "env": {key: os.environ[key] for key in _ENV_VARS if key in os.environ},
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
    # No pyplot: no global backend, no GUI; Agg draws the PNG.
    from matplotlib.figure import Figure

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


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
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
    parser.add_argument("--warmup", type=_count_arg, default=None,
                        help=f"untimed calls of each measured thing first (seed: 1); default {WARMUP['cpu']}, "
                             f"{WARMUP['gpu']} on a GPU backend (kernel compilation, cuDNN autotuning)")
    parser.add_argument("--stat", default="median", choices=tuple(STATISTICS),
                        help="summary of the repeats: median (default), or min, the least disturbed on a busy machine")
    parser.add_argument("--algorithm", default="auto",
                        help="conv2d's algorithm= (one of conv2d.ALGORITHMS, or auto); default auto")
    parser.add_argument("--deterministic", action="store_true",
                        help="also time forward+backward with deterministic=True, and its cost over the default "
                             "(column det/dflt), where conv2d has that argument")
    parser.add_argument("--no-seed", dest="seed", action="store_false",
                        help="do not time the seed (NumPy on the CPU, seconds per call on the seed's layer): "
                             "a GPU run's targets do not read it")
    parser.add_argument("--json", metavar="PATH", help="write every number and the machine's details here")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) here; needs matplotlib")


def _algorithm_extra(algorithm: str, backend: Backend, dtype: str) -> dict[str, Any]:
    """conv2d keyword arguments for --algorithm ("auto", the default, adds none)."""
    if algorithm == "auto":
        return {}
    # A one-pixel call on the backend checks the name now, with conv2d's own message listing the
    # choices, rather than after the first shape's data is made; on the backend, because an
    # algorithm may exist for one library only (CuPy's "kernels").
    pixel = backend.asarray(np.ones((1, 1, 1, 1)), dtype=dtype)
    conv2d(pixel, pixel, algorithm=algorithm)
    return {"algorithm": algorithm}


def _gpu_line(info: dict[str, Any], precision: dict[str, Any]) -> str:
    """What a GPU run's numbers mean: the device, the clock, the float32 settings of both sides."""
    cupy_type = precision.get("cupy_float32_compute_type")
    cupy = f", CuPy {cupy_type}" if cupy_type else ""
    return (f"GPU: {info.get('cuda_device', 'unknown')}; times from CUDA events; TF32 off (torch matmul "
            f"allow_tf32={precision.get('torch.backends.cuda.matmul.allow_tf32')}, cuDNN "
            f"allow_tf32={precision.get('torch.backends.cudnn.allow_tf32')}{cupy}); torch cudnn.benchmark="
            f"{precision.get('torch.backends.cudnn.benchmark')}")


def _print_header(args: argparse.Namespace, backend: Backend, info: dict[str, Any], warmup: int,
                  precision: dict[str, Any]) -> None:
    det = "; also deterministic=True" if args.deterministic else ""
    seed = f"seed: {min(args.repeat, SEED_REPEAT)} after 1, float64" if args.seed else "no seed"
    print(f"conv2d {__version__} bench: backend {backend.spec}, {args.dtype}, algorithm {args.algorithm}{det}; "
          f"{args.stat} of {args.repeat} after {warmup} warm-up{'s' if warmup != 1 else ''} ({seed})")
    print(f"CPU: {info['cpu_model'] or info['processor'] or info['machine']}, {info['cpus_usable']} usable cores; "
          f"{_blas_line(info)}")
    if _on_gpu(backend):
        print(_gpu_line(info, precision))
    if args.deterministic and os.environ.get("CONV2D_DETERMINISTIC"):
        print(f"note: the default follows CONV2D_DETERMINISTIC={os.environ['CONV2D_DETERMINISTIC']!r}, "
              "so det/dflt may compare deterministic with itself")


def _measure_all(args: argparse.Namespace, backend: Backend, shapes: list[Shape], extra: dict[str, Any],
                 warmup: int) -> list[dict[str, Any]]:
    """The table: one row per shape, printed as soon as it is measured."""
    name_width = max(len("shape"), *(len(s.label) for s in shapes))
    print(table_header(name_width), flush=True)
    results = []
    for shape in shapes:
        case = Case.make(backend, shape, args.dtype, extra)
        result = measure(case, args.repeat, args.stat, warmup, args.deterministic, args.seed)
        del case  # free the device memory of this shape before the next one is made
        results.append(result)
        print(table_row(result, name_width), flush=True)
    for line in sorted({f"{what}: {why}" for r in results for what, why in r["skipped"].items()}):
        print(f"  '-' {line}")
    return results


def run(args: argparse.Namespace) -> int:
    """Run ``python -m conv2d bench``: print the table, write the JSON and plot if asked; exit code."""
    started = time.perf_counter()
    load_before = _load_average()
    try:
        backend = get_backend(args.backend)
        backend.dtype(args.dtype)  # fails now, with the reason, rather than at the first shape
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
    warmup = default_warmup(backend) if args.warmup is None else args.warmup

    with gpu_precision(backend) as precision:
        try:
            extra = _algorithm_extra(args.algorithm, backend, args.dtype)
        except (ValueError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _print_header(args, backend, machine_info(backend), warmup, precision)
        results = _measure_all(args, backend, shapes, extra, warmup)
    summ = summary(results, args.dtype, _on_gpu(backend))
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
                         "seed_repeat": min(args.repeat, SEED_REPEAT), "warmup": warmup, "seed_warmup": 1,
                         "stat": args.stat, "algorithm": args.algorithm, "on_gpu": _on_gpu(backend),
                         "timer": "cuda_events" if isinstance(backend_timer(backend), EventTimer) else "perf_counter",
                         "gpu_precision": precision, "deterministic": args.deterministic, "seed": args.seed,
                         "deterministic_supported": deterministic_supported(),
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

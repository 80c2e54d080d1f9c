"""The data of one measurement (:class:`Case`) and the measured things: ours, the floor, torch, the seed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..._functional import conv2d, conv2d_backward
from ..._geometry import make_geometry
from ..._transposed import conv_transpose2d, conv_transpose2d_backward
from ...algorithms import ALGORITHMS
from ...backends import Backend
from .shapes import Shape
from .timing import _on_gpu


@dataclass
class Case:
    """One shape's data on the backend, and the same values on the host for the seed and torch."""

    backend: Backend
    shape: Shape
    dtype: str
    host: dict[str, np.ndarray]
    arrays: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # algorithm=, when one is asked for
    op: str = "conv2d"  # or "conv_transpose2d": the shape's convolution transposed (see transposed_kwargs)

    @classmethod
    def make(cls, backend: Backend, shape: Shape, dtype: str, extra: dict[str, Any] | None = None,
             op: str = "conv2d") -> Case:
        # Random data, never zeros or ones: a GEMM library may shortcut those. Drawn in the dtype
        # itself: the GPU preset's arrays are large, and float64 draws would take twice the time.
        rng = np.random.default_rng(0)
        s = shape
        sizes = {
            "x": (s.n, s.c, s.h, s.w),
            "weight": (s.o, s.c // s.groups, s.kh, s.kw),
            "bias": (s.o,),
            "grad_out": (s.n, s.o, s.out_h, s.out_w),
            "bias_t": (s.c,),  # the transposed convolution's bias (--op conv_transpose2d)
        }
        host = {key: rng.standard_normal(size, dtype=np.dtype(dtype)) for key, size in sizes.items()}
        arrays = {key: backend.asarray(value, dtype=dtype) for key, value in host.items()}
        return cls(backend, shape, dtype, host, arrays, dict(extra or {}), op)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {**self.shape.conv_kwargs, **self.extra}

    def nbytes(self, *shapes: Sequence[int]) -> int:
        return sum(math.prod(size) for size in shapes) * np.dtype(self.dtype).itemsize


# --------------------------------------------------------------------------------------------------
# The measured things: each returns the calls to time (or the reason there are none)


def ours_calls(case: Case, deterministic: bool = False,
               as_layer: bool = True) -> dict[str, Callable[[], Any]] | str:
    """conv2d forward, backward (all three gradients) and forward then backward; or why not (an
    ``--algorithm`` that does not compute this layer).

    With `deterministic`, also forward then backward with
    ``deterministic=True``, "ours_fwdbwd_det", to read the price of reproducible sums beside the
    default (which follows ``CONV2D_DETERMINISTIC``). With `as_layer` (the seed is timed too), and
    where the seed can run the layer, also the layer class's forward then backward,
    "ours_layer_fwdbwd", which the seed is compared with.
    """
    a = case.arrays
    algorithm = ALGORITHMS.get(case.extra.get("algorithm", "auto"))
    check = getattr(algorithm, "check", None)  # an algorithm for some layers only ("winograd", "pointwise")
    if check is not None:
        s = case.shape
        try:
            check(make_geometry((s.n, s.c, s.h, s.w), (s.o, s.c // s.groups, s.kh, s.kw), None,
                                          **s.conv_kwargs))
        except ValueError as error:
            return str(error).split(";")[0]

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
    if as_layer and seed_skip_reason(case.shape) is None:
        calls["ours_layer_fwdbwd"] = _layer_forward_backward(case)
    return calls


def transposed_kwargs(shape: Shape) -> dict[str, Any]:
    """The arguments of the shape's convolution transposed: from its output (N, O, OH, OW) back to (N, C, H, W).

    The weight (O, C/groups, KH, KW) is read as the transposed convolution's (C_in, C_out/groups, KH, KW);
    `output_padding` restores the rows and columns that the strided convolution dropped.
    """
    reach_h, reach_w = (shape.dilation * (k - 1) + 1 for k in (shape.kh, shape.kw))
    extra = ((shape.h + 2 * shape.pad - reach_h) % shape.stride, (shape.w + 2 * shape.pad - reach_w) % shape.stride)
    return {**shape.conv_kwargs, "output_padding": extra}


def transposed_calls(case: Case) -> dict[str, Callable[[], Any]]:
    """conv_transpose2d forward, backward and forward then backward (x: the convolution's output gradient)."""
    a = case.arrays
    kw = {**transposed_kwargs(case.shape), **case.extra}

    def forward() -> Any:
        return conv_transpose2d(a["grad_out"], a["weight"], a["bias_t"], **kw)

    def backward() -> Any:
        return conv_transpose2d_backward(a["x"], a["grad_out"], a["weight"], **kw)

    return {"ours_fwd": forward, "ours_bwd": backward, "ours_fwdbwd": lambda: (forward(), backward())}


def _layer_forward_backward(case: Case) -> Callable[[], Any]:
    """Forward then backward of a ``ConvolutionLayer`` without activation on the case's data: what the
    seed's layer does, keeping what it needs from the forward pass for the backward pass (where that
    is faster than rebuilding it, ``_conv.forward``). The seed's goal is read from this one."""
    from ...nn._convolution import ConvolutionLayer

    s, a = case.shape, case.arrays
    layer = ConvolutionLayer((s.c, s.h, s.w), (s.kh, s.kw), s.o, s.stride, padding=s.pad, dilation=s.dilation,
                             activation=None, dtype=case.dtype, backend=case.backend, **case.extra)
    layer.set_parameters({"weights": a["weight"], "biases": a["bias"]})

    def call() -> Any:
        return layer.forwardpass(a["x"]), layer.backward(a["x"], a["grad_out"])

    return call


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
    kw: dict[str, Any] = dict(case.shape.conv_kwargs)
    conv: Callable[..., Any] = torch.nn.functional.conv2d
    x, bias, grad_out = t["x"], t["bias"], t["grad_out"]
    if case.op == "conv_transpose2d":  # as transposed_calls: the roles of x and grad_out swapped
        kw = transposed_kwargs(case.shape)
        conv = torch.nn.functional.conv_transpose2d
        x, bias, grad_out = t["grad_out"], t["bias_t"], t["x"]
    leaves = [x.clone().requires_grad_(), t["weight"].clone().requires_grad_(), bias.clone().requires_grad_()]

    def forward() -> Any:
        return conv(x, t["weight"], bias, **kw)

    def forward_backward() -> Any:
        y = conv(leaves[0], leaves[1], leaves[2], **kw)
        # autograd.grad rather than .backward(): fresh gradients, no accumulation into .grad between repeats.
        return torch.autograd.grad(y, leaves, grad_out)

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
    np.add.at(grad_x, (slice(None), k, i, j), grad_patches)  # type: ignore[arg-type]  # NumPy's stubs lack tuple keys
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

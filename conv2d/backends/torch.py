"""PyTorch tensors, on the CPU or a CUDA device (``torch``, ``torch:cuda``, ``torch:cuda:1``)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from array_api_compat import is_torch_array

from ._base import Backend, BackendUnavailableError

LIBRARY = "torch"
INSTALL_HINT = "pip install 'conv2d[torch]'"


def is_array(obj: Any) -> bool:
    return is_torch_array(obj)


def device_spec(array: Any) -> str | None:
    return str(array.device)


class TorchNative:
    """``algorithm="native"``: PyTorch's own convolution (oneDNN on the CPU, cuDNN on CUDA).

    The backward pass is ``aten.convolution_backward``, the operator that autograd and
    ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` call: one call for all three gradients.
    Asymmetric padding ("same" with an even kernel) is a padded copy of the input first, since
    PyTorch pads both sides alike; so is the padding of an input with no rows or no columns, which
    PyTorch refuses but our other algorithms compute (an output of the bias alone).
    """

    def __init__(self, torch: Any, on_cuda: bool) -> None:
        self.torch = torch
        self.on_cuda = on_cuda
        # Whether deterministic=True can be honoured (``_conv.auto_algorithm`` reads it): on CUDA
        # by cuDNN's deterministic algorithms, on the CPU always.
        self.deterministic = True

    def prefers(self, geom: Any) -> bool:
        """Whether ``auto`` should run this for `geom`: always (measured 1.2x to 10x faster than
        ``slices`` on torch's CPU on every layer of the cpu preset; docs/benchmarks.md)."""
        return True

    def _arguments(self, x: Any, geom: Any) -> tuple[Any, list[int]]:
        top, bottom, left, right = geom.padding
        # PyTorch refuses an input with an empty row or column axis ("Only zero batch or zero
        # channel inputs are supported") even where its padding makes room for the kernel; the
        # padded copy is not empty (the geometry checked that the kernel fits it).
        if top == bottom and left == right and x.shape[2] and x.shape[3]:
            return x, [top, left]
        return self.torch.nn.functional.pad(x, (left, right, top, bottom)), [0, 0]

    def _flags(self, deterministic: bool) -> Any:
        # On CUDA, cuDNN's fastest backward algorithms sum with atomics: deterministic mode asks
        # cuDNN for its deterministic ones (and no autotuning) for this call only. PyTorch's CPU
        # convolutions use no atomics: deterministic in both modes.
        if self.on_cuda and deterministic:
            return self.torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                   allow_tf32=self.torch.backends.cudnn.allow_tf32)
        return contextlib.nullcontext()

    def forward(self, x: Any, weight: Any, bias: Any, geom: Any, deterministic: bool = False) -> Any:
        x, padding = self._arguments(x, geom)
        with self._flags(deterministic):
            return self.torch.nn.functional.conv2d(x, weight, bias, list(geom.stride), padding, list(geom.dilation),
                                                   geom.groups)

    def backward(self, grad_out: Any, x: Any, weight: Any, geom: Any, deterministic: bool = False,
                 needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any, Any]:
        """The three gradients, those of x and weight only where `needs` names them (else None); without
        "weight", `x` is read for its shape only."""
        padded, padding = self._arguments(x, geom)

        def raw(grad_out: Any, x: Any, weight: Any, mask: list[bool]) -> tuple[Any, Any, Any]:
            return self.torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]], list(geom.stride), padding, list(geom.dilation),
                False, [0, 0], geom.groups, mask,
            )

        with self._flags(deterministic):
            if grad_out.is_complex():
                grad_x, grad_w, grad_b = self._complex_backward(raw, grad_out, padded, weight)
            else:
                grad_x, grad_w, grad_b = raw(grad_out, padded, weight, ["x" in needs, "weight" in needs, True])
        if padded is not x and grad_x is not None:
            top, _, left, _ = geom.padding
            grad_x = grad_x[:, :, top : top + geom.height, left : left + geom.width]
        return grad_x, grad_w, grad_b

    def _complex_backward(self, raw: Callable[..., Any], grad_out: Any, x: Any, weight: Any) -> tuple[Any, Any, Any]:
        """The raw (unconjugated) gradients of complex tensors from four real ``convolution_backward`` calls.

        PyTorch's ``aten.convolution_backward`` has no complex kernels (CPU: "not implemented for
        'ComplexDouble'"; cuDNN has none either), while its forward and autograd split a complex
        convolution into real ones. The raw gradients are bilinear: grad_x in (grad_out, weight) and
        grad_w in (grad_out, x), so each real call with real parts (r) or imaginary parts (i) gives
        one term of both: (g_r, x_r, w_r), (g_i, x_i, w_i), (g_r, x_i, w_i), (g_i, x_r, w_r). Four
        products, not Gauss's three, keep the rounding of a true complex product.
        """
        g_r, g_i = grad_out.real.contiguous(), grad_out.imag.contiguous()
        x_r, x_i = x.real.contiguous(), x.imag.contiguous()
        w_r, w_i = weight.real.contiguous(), weight.imag.contiguous()
        both = [True, True, False]
        rr, ii = raw(g_r, x_r, w_r, both), raw(g_i, x_i, w_i, both)
        ri, ir = raw(g_r, x_i, w_i, both), raw(g_i, x_r, w_r, both)
        grad_x = self.torch.complex(rr[0] - ii[0], ri[0] + ir[0])
        grad_w = self.torch.complex(rr[1] - ii[1], ri[1] + ir[1])
        return grad_x, grad_w, grad_out.sum(dim=(0, 2, 3))


def build(device: str | None) -> Backend:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(f"PyTorch is not installed ({exc})") from exc
    import array_api_compat.torch as xp

    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as exc:
        raise BackendUnavailableError(
            f"{device!r} is not a torch device ({exc}); use e.g. 'torch:cpu', 'torch:cuda', 'torch:cuda:1'"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "this PyTorch build sees no CUDA device; 'torch:cuda' needs an NVIDIA GPU and a CUDA build of PyTorch"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"no CUDA device {dev.index}: PyTorch sees {torch.cuda.device_count()}"
            )
    elif dev.type != "cpu":
        raise BackendUnavailableError(f"device type {dev.type!r} is not supported; use cpu or cuda")
    try:
        torch.empty(1, device=dev)  # a build can list a device it cannot allocate on
    except Exception as exc:
        raise BackendUnavailableError(f"cannot allocate on {dev}: {exc}") from exc

    compiler_ops()  # before any torch.compile traces conv2d

    def native_asarray(obj, dtype):
        # torch.asarray shares a NumPy array's memory, and torch tensors are always writable:
        # a read-only array (a cached plan, a caller's frozen input) is copied instead.
        copy = True if getattr(getattr(obj, "flags", None), "writeable", True) is False else None
        return torch.asarray(obj, dtype=dtype, device=dev, copy=copy)

    def to_numpy(array):
        return array.detach().cpu().numpy()

    def scatter_add(target, indices, values):
        # index_add_ accumulates duplicates (atomics on CUDA, so float sums may vary in the last bits).
        return target.index_add_(0, indices, values)

    return Backend(
        name="torch",
        spec=f"torch:{dev}",
        device=dev,
        xp=xp,
        _native_asarray=native_asarray,
        _to_numpy=to_numpy,
        _scatter_add=scatter_add,
        _owns=is_array,
        deterministic_scatter=dev.type == "cpu",  # CUDA's index_add_ uses atomics
        native=TorchNative(torch, dev.type == "cuda"),
    )


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller now (False when torch is not even loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


# conv2d's custom operators, registered once torch is loaded (see _register_ops).
OPS: dict[str, Callable[..., Any]] | None = None


def _register_ops() -> dict[str, Callable[..., Any]]:
    """conv2d and conv2d_backward as two PyTorch custom operators, for ``torch.compile``.

    The convolution is Python over cached host-built plans and array-API dispatch, which Dynamo
    cannot trace without breaking the graph many times. As custom operators it is one opaque node
    of the graph (``fullgraph=True`` works); the node runs the eager code, and autograd through it
    uses conv2d_backward. The options travel as ints, bools and strings, as an operator's
    schema needs; the geometry is rebuilt from them inside.
    """
    import torch

    from .. import _dispatch, _geometry

    def options(stride, padding, padding_mode, dilation, groups, algorithm, max_workspace_bytes, deterministic):
        return dict(
            stride=tuple(stride), padding=padding_mode or tuple(padding), dilation=tuple(dilation), groups=groups,
            algorithm=algorithm, max_workspace_bytes=max_workspace_bytes, deterministic=deterministic,
        )

    options_schema = (
        "int[] stride, int[] padding, str padding_mode, int[] dilation, int groups, str algorithm, "
        "int max_workspace_bytes, bool deterministic"
    )

    @torch.library.custom_op(
        "conv2d::conv2d", mutates_args=(), schema=f"(Tensor x, Tensor weight, Tensor? bias, {options_schema}) -> Tensor"
    )
    def forward(x, weight, bias, stride, padding, padding_mode, dilation, groups, algorithm, max_workspace_bytes,
                deterministic):
        opts = options(stride, padding, padding_mode, dilation, groups, algorithm, max_workspace_bytes, deterministic)
        return _dispatch.eager("conv2d")(x, weight, bias, **opts)

    @forward.register_fake
    def _(x, weight, bias, stride, padding, padding_mode, dilation, groups, algorithm, max_workspace_bytes,
          deterministic):
        geom = _geometry.make_geometry(
            tuple(x.shape), tuple(weight.shape), None if bias is None else tuple(bias.shape),
            stride=tuple(stride), padding=padding_mode or tuple(padding), dilation=tuple(dilation), groups=groups,
        )
        return x.new_empty((x.shape[0], geom.out_channels, geom.out_h, geom.out_w))

    @torch.library.custom_op(
        "conv2d::conv2d_backward", mutates_args=(),
        schema=f"(Tensor grad_out, Tensor x, Tensor weight, {options_schema}) -> (Tensor, Tensor, Tensor)",
    )
    def backward(grad_out, x, weight, stride, padding, padding_mode, dilation, groups, algorithm, max_workspace_bytes,
                 deterministic):
        opts = options(stride, padding, padding_mode, dilation, groups, algorithm, max_workspace_bytes, deterministic)
        return tuple(_dispatch.eager("conv2d_backward")(grad_out, x, weight, **opts))

    @backward.register_fake
    def _(grad_out, x, weight, *args):
        return torch.empty_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0],))

    def setup_context(ctx, inputs, output):
        x, weight, bias, *rest = inputs
        ctx.save_for_backward(x, weight)
        ctx.rest, ctx.has_bias = rest, bias is not None

    def forward_grad(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = backward(grad_y, x, weight, *ctx.rest)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, *([None] * len(ctx.rest))

    forward.register_autograd(forward_grad, setup_context=setup_context)

    def call(op):
        def with_options(*arrays, stride, padding, dilation, groups, algorithm, max_workspace_bytes, deterministic):
            mode = padding if isinstance(padding, str) else ""
            pair = [0, 0] if mode else list(_geometry.int_pair("padding", padding, minimum=0))
            return op(
                *arrays, list(_geometry.int_pair("stride", stride, minimum=1)), pair, mode,
                list(_geometry.int_pair("dilation", dilation, minimum=1)), groups, algorithm, max_workspace_bytes,
                deterministic,
            )

        return with_options

    return {"conv2d": call(forward), "conv2d_backward": call(backward)}


def compiler_ops() -> dict[str, Callable[..., Any]]:
    """The custom operators, registered on first need; torch must be loaded."""
    global OPS
    if OPS is None:
        # Outside any trace when possible (build(), or this module loading after torch): Dynamo
        # would otherwise trace the registration; it runs it eagerly at the cost of a graph break.
        import torch

        OPS = torch.compiler.disable(_register_ops)()
    return OPS


if "torch" in sys.modules:  # torch loaded first (the usual order): register now, never under a trace
    compiler_ops()

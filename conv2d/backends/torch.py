"""PyTorch tensors, on the CPU or a CUDA device (``torch``, ``torch:cuda``, ``torch:cuda:1``)."""

from __future__ import annotations

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
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable", with its reason
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

    from .. import _functional, _geometry  # imported late: they import this package

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
        return _functional.conv2d(x, weight, bias, **opts)

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
        return tuple(_functional.conv2d_backward(grad_out, x, weight, **opts))

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

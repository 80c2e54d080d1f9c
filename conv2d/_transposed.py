"""Transposed convolution: the input gradient of a convolution, run as a function of its own.

``y = conv_transpose2d(x, w)`` is the map ``_conv.backward`` applies to an output gradient: the
convolution ``conv`` whose *input* has y's shape, with the same stride, padding, dilation and
groups and the weight as it is, ``(C_in, C_out // groups, kH, kW)`` read as ``(O, C // groups, kH,
kW)``, has x's shape as its output. So the forward pass is conv's raw input gradient of x, and the
backward pass is conv itself (the gradient of x) and conv's weight gradient with the roles swapped
(the transposed output's gradient as conv's input, x as conv's output gradient). Every algorithm
and ``auto``'s per-shape rule apply unchanged, to conv's geometry.

``output_padding`` adds rows and columns at the bottom and right of y, as in PyTorch. Where it is
at least the stride (allowed when it is smaller than the dilation), conv's output has more rows
than x: x is padded with zeros to conv's output size in the forward pass (those positions
contribute nothing) and conv's result is cropped to x's size in the backward pass.

Complex inputs follow PyTorch's convention, as :func:`conv2d.conv2d_backward` does: the forward pass
is the raw bilinear map, and each gradient conjugates the other operand.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from . import _conv
from ._complex import conj
from ._determinism import resolve_deterministic
from ._functional import check_algorithm, check_arrays
from ._geometry import Geometry, IntPair, int_pair, make_geometry, positive_int
from ._workspace import resolve_limit
from .backends import Backend


def _shape_text(shape: tuple[int, ...]) -> str:
    return str(tuple(int(s) for s in shape))


def transposed_geometry(
    x_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
    *,
    stride: IntPair,
    padding: IntPair,
    output_padding: IntPair,
    dilation: IntPair,
    groups: int,
) -> Geometry:
    """The geometry of the convolution whose input gradient is this transposed convolution (checked)."""
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D (N, C_in, H, W), got shape {_shape_text(x_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(
            f"weight must be 4-D (in_channels, out_channels/groups, kH, kW), got shape {_shape_text(weight_shape)}"
        )
    if isinstance(padding, str):
        raise TypeError(
            f"padding of a transposed convolution must be a non-negative int or a pair of them, got {padding!r} "
            "(PyTorch's conv_transpose2d has no 'same' or 'valid')"
        )
    if x_shape[1] != weight_shape[0]:
        raise ValueError(
            f"x has {x_shape[1]} channels but weight has {weight_shape[0]} input channels (weight.shape[0]); "
            "a transposed convolution's weight is (in_channels, out_channels/groups, kH, kW)"
        )
    stride_pair = int_pair("stride", stride, minimum=1)
    dilation_pair = int_pair("dilation", dilation, minimum=1)
    pad = int_pair("padding", padding, minimum=0)
    extra = int_pair("output_padding", output_padding, minimum=0)
    for axis, (e, s, d) in enumerate(zip(extra, stride_pair, dilation_pair)):
        if e >= s and e >= d:
            raise ValueError(
                f"output_padding must be smaller than the stride or the dilation (as in PyTorch), got "
                f"output_padding={output_padding!r} with stride={stride!r} and dilation={dilation!r} "
                f"({'rows' if axis == 0 else 'columns'}: {e} >= {s} and >= {d})"
            )
    groups = positive_int("groups", groups)
    if weight_shape[0] % groups:
        raise ValueError(
            f"groups={groups} must divide the input channels (weight.shape[0]={weight_shape[0]})"
        )
    kernel = weight_shape[2:]
    size = [
        (x_shape[2 + a] - 1) * stride_pair[a] - 2 * pad[a] + dilation_pair[a] * (kernel[a] - 1) + extra[a] + 1
        for a in range(2)
    ]
    if min(size) < 1:
        raise ValueError(
            f"the transposed convolution's output would be {size[0]}x{size[1]}: x is "
            f"{x_shape[2]}x{x_shape[3]}, kernel {kernel[0]}x{kernel[1]}, stride {stride_pair}, padding {pad}, "
            f"dilation {dilation_pair}; use less padding"
        )
    conv_input = (x_shape[0], weight_shape[1] * groups, size[0], size[1])
    if bias_shape is not None and tuple(bias_shape) != (conv_input[1],):
        raise ValueError(
            f"bias must have shape ({conv_input[1]},) (one per output channel), got {_shape_text(bias_shape)}"
        )
    return make_geometry(conv_input, weight_shape, None, stride=stride_pair, padding=pad,
                         dilation=dilation_pair, groups=groups)


def _zero_extend(backend: Backend, a: Any, rows: int, cols: int) -> Any:
    """`a` (N, C, h, w) with zeros after it to (N, C, rows, cols); `a` itself where nothing is added."""
    if (a.shape[2], a.shape[3]) == (rows, cols):
        return a
    xp = array_namespace(a)
    out = xp.zeros((a.shape[0], a.shape[1], rows, cols), dtype=a.dtype, device=device_of(a))
    return backend.slice_add(out, (..., slice(0, a.shape[2]), slice(0, a.shape[3])), a)


def _options(stride, padding, output_padding, dilation, groups, algorithm, max_workspace_bytes, deterministic):
    return dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups,
                algorithm=check_algorithm(algorithm), limit=resolve_limit(max_workspace_bytes),
                deterministic=resolve_deterministic(deterministic))


def conv_transpose2d(
    x: Any,
    weight: Any,
    bias: Any | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    algorithm: str = "auto",
    max_workspace_bytes: int | None = None,
    deterministic: bool | None = None,
) -> Any:
    """2-D transposed convolution ("deconvolution"), as :func:`torch.nn.functional.conv_transpose2d`.

    It is the gradient of :func:`conv2d` with respect to its input, computed by the same algorithms.

    Parameters
    ----------
    x : array, shape (N, C_in, H, W)
        Input batch, a floating array of NumPy, CuPy, torch, JAX or array-api-strict.
    weight : array, shape (C_in, C_out // groups, kH, kW)
        Filters, laid out as PyTorch's (input channels first); same library, device and dtype as `x`.
    bias : array, shape (C_out,), optional
        Added to every output position of each output channel.
    stride, dilation : int or (int, int), default 1
        As in the convolution this transposes: the step between the input's positions in the output,
        and between kernel taps.
    padding : int or (int, int), default 0
        ``dilation * (k - 1) - padding`` zeros are added around x, as in PyTorch: more padding,
        a smaller output.
    output_padding : int or (int, int), default 0
        Extra rows and columns at the bottom and right of the output (choosing among the output sizes
        that a strided convolution maps to one input size); smaller than the stride or the dilation.
    groups : int, default 1
        Split channels into this many independent transposed convolutions.
    algorithm, max_workspace_bytes, deterministic
        As :func:`conv2d_backward`'s, applied to the convolution this transposes: ``auto`` chooses
        for that convolution's shape. ``"winograd"`` applies to 3x3 kernels with stride 1,
        ``"pointwise"`` to 1x1 kernels.

    Returns
    -------
    array, shape (N, C_out, OH, OW)
        ``OH = (H - 1)*stride - 2*padding + dilation*(kH - 1) + output_padding + 1`` (likewise OW).

    Raises
    ------
    TypeError, ValueError
        As :func:`conv2d`; also for an `output_padding` not smaller than the stride or the dilation,
        a string padding, or an output size below 1.

    Examples
    --------
    >>> import numpy as np, conv2d
    >>> x = np.ones((1, 4, 5, 5))
    >>> w = np.ones((4, 2, 3, 3))
    >>> conv2d.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1).shape
    (1, 2, 10, 10)
    """
    named = {"x": x, "weight": weight} if bias is None else {"x": x, "weight": weight, "bias": bias}
    backend = check_arrays(named)
    o = _options(stride, padding, output_padding, dilation, groups, algorithm, max_workspace_bytes, deterministic)
    geom = transposed_geometry(tuple(x.shape), tuple(weight.shape), None if bias is None else tuple(bias.shape),
                               stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
                               groups=groups)
    x_wide = _zero_extend(backend, x, geom.out_h, geom.out_w)
    y, _, _ = _conv.backward(backend, x_wide, None, weight, geom, o["algorithm"], o["limit"],
                             deterministic=o["deterministic"], needs=("x",))
    if bias is not None:
        xp = array_namespace(y)
        y = y + xp.reshape(bias, (1, geom.in_channels, 1, 1))
    return y


def conv_transpose2d_backward(
    grad_out: Any,
    x: Any,
    weight: Any,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    algorithm: str = "auto",
    max_workspace_bytes: int | None = None,
    deterministic: bool | None = None,
) -> tuple[Any, Any, Any]:
    """Gradients of a loss through :func:`conv_transpose2d`, given the gradient of its output.

    Parameters
    ----------
    grad_out : array, shape (N, C_out, OH, OW)
        dLoss/dy for ``y = conv_transpose2d(x, weight, bias, ...)`` with the same arguments.
    x, weight : arrays
        The forward pass's input and filters.
    stride, padding, output_padding, groups, dilation, algorithm, max_workspace_bytes, deterministic
        As given to :func:`conv_transpose2d`.

    Returns
    -------
    grad_x : array, shape (N, C_in, H, W)
        The convolution of `grad_out` with `weight` (:func:`conv2d` with the same stride, padding,
        dilation and groups), conjugating `weight` for complex inputs.
    grad_weight : array, shape (C_in, C_out // groups, kH, kW)
    grad_bias : array, shape (C_out,)
        Returned whether or not the forward pass had a bias.

    Raises
    ------
    TypeError, ValueError
        As :func:`conv_transpose2d`; also when `grad_out` does not have the forward output's shape.

    Examples
    --------
    >>> import numpy as np, conv2d
    >>> x, w = np.ones((1, 4, 5, 5)), np.ones((4, 2, 3, 3))
    >>> y = conv2d.conv_transpose2d(x, w, stride=2)
    >>> gx, gw, gb = conv2d.conv_transpose2d_backward(np.ones_like(y), x, w, stride=2)
    >>> gx.shape, gw.shape, gb.shape
    ((1, 4, 5, 5), (4, 2, 3, 3), (2,))
    """
    backend = check_arrays({"grad_out": grad_out, "x": x, "weight": weight})
    o = _options(stride, padding, output_padding, dilation, groups, algorithm, max_workspace_bytes, deterministic)
    geom = transposed_geometry(tuple(x.shape), tuple(weight.shape), None, stride=stride, padding=padding,
                               output_padding=output_padding, dilation=dilation, groups=groups)
    expected = (x.shape[0], geom.in_channels, geom.height, geom.width)
    if tuple(grad_out.shape) != expected:
        raise ValueError(
            f"grad_out must have the forward output's shape {expected} (N, C_out, OH, OW), got {tuple(grad_out.shape)}"
        )
    xp = array_namespace(grad_out, x, weight)
    h, w = x.shape[2], x.shape[3]
    # The gradient of x is the convolution itself (cropped where output_padding widened it).
    grad_x, _ = _conv.forward(backend, grad_out, conj(xp, weight), None, geom, o["algorithm"], o["limit"],
                              o["deterministic"])
    if (geom.out_h, geom.out_w) != (h, w):
        grad_x = grad_x[:, :, :h, :w]
    # The weight's: the convolution's weight gradient, grad_out as its input and x as its output gradient.
    x_wide = _zero_extend(backend, conj(xp, x), geom.out_h, geom.out_w)
    _, grad_weight, _ = _conv.backward(backend, x_wide, grad_out, weight, geom, o["algorithm"], o["limit"],
                                       deterministic=o["deterministic"], needs=("weight",))
    return grad_x, grad_weight, xp.sum(grad_out, axis=(0, 2, 3))

"""The public functions: check the arrays and arguments, then hand over to the arithmetic."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from . import _conv, _dispatch
from ._complex import conj, mixed_dtypes
from ._determinism import resolve_deterministic
from ._geometry import Geometry, IntPair, Padding, check_output_shape, make_geometry
from ._layout import channels_first_shape, check_data_format, shape_in, to_channels_first, to_data_format
from ._padding import check_mode_fits, check_padding_mode, fold, pad
from ._workspace import resolve_limit
from .algorithms import ALGORITHMS
from .backends import Backend, backend_of, compiler_op


def check_arrays(named: dict[str, Any]) -> Backend:
    """One library, one device, one floating dtype (real or complex) for all of `named`; return their backend."""
    backends = {name: backend_of(array, name) for name, array in named.items()}
    (first, backend), *rest = backends.items()
    for name, other in rest:
        if other.name != backend.name:
            raise TypeError(
                f"{first} is a {backend.name} array but {name} is a {other.name} array; pass all arrays "
                f"from one library, e.g. conv2d.get_backend({backend.name!r}).asarray({name})"
            )
        if other is not backend:
            raise ValueError(
                f"{first} is on device {backend.spec!r} but {name} is on {other.spec!r}; move them to one device"
            )
    xp = array_namespace(*named.values())
    dtype = named[first].dtype
    for name, array in named.items():
        if not xp.isdtype(array.dtype, ("real floating", "complex floating")):
            raise TypeError(
                f"{name} has dtype {array.dtype}; conv2d needs a floating dtype (float16, float32, float64, "
                f"complex64 or complex128): convert it, e.g. {name}.astype('float32')"
            )
        if array.dtype != dtype:
            raise TypeError(mixed_dtypes(xp, first, dtype, name, array.dtype))
    return backend


def check_algorithm(algorithm: str) -> str:
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a string, 'auto' or one of {', '.join(map(repr, ALGORITHMS))}, got {algorithm!r}")
    if algorithm != "auto" and algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'auto' or one of {', '.join(map(repr, ALGORITHMS))}, got {algorithm!r}")
    return algorithm


def _delegated(function: str, arrays: tuple[Any, ...], options: dict[str, Any]) -> Any | None:
    """The result of `function` where another engine takes the call, else None.

    A dask array among `arrays` goes to :mod:`conv2d.distributed` (one ordinary call per batch
    chunk), through the hand-off that ``conv2d/__init__.py`` registers in :mod:`conv2d._dispatch`.
    While ``torch.compile`` traces, the call is one opaque custom operator, checked and run when the
    compiled graph executes. Both are asked for without importing dask or torch.
    """
    result = _dispatch.handed_off(function, arrays, options)
    if result is not NotImplemented:
        return result
    op = compiler_op(function)
    if op is None:
        return None
    resolved = dict(options, max_workspace_bytes=resolve_limit(options["max_workspace_bytes"]),
                    deterministic=resolve_deterministic(options["deterministic"]))
    return op(*arrays, **resolved)


def _shape(array: Any) -> tuple[int, ...]:
    return tuple(array.shape)


def _channels_first_padded(
    x: Any, weight: Any, bias: Any | None, padding_mode: str, data_format: str, options: dict[str, Any]
) -> tuple[Any, Any, Padding, Geometry]:
    """`x` channels-first and padded in `padding_mode`, the padding left for the convolution, the geometry.

    Every argument is checked here, on the shapes the caller gave, so a message quotes the
    caller's padding and layout; the convolution of the result (an ordinary NCHW call, which
    dask and ``torch.compile`` take as usual) checks the arrays' library and dtype.
    """
    xp = array_namespace(x)
    geom = make_geometry(
        channels_first_shape("x", _shape(x), data_format), _shape(weight), None if bias is None else _shape(bias),
        stride=options["stride"], padding=options["padding"], dilation=options["dilation"], groups=options["groups"],
    )
    x = to_channels_first(xp, x, data_format)
    if padding_mode == "zeros":
        return xp, x, options["padding"], geom
    check_mode_fits(padding_mode, geom.padding, (geom.height, geom.width), options["padding"])
    return xp, pad(xp, x, geom.padding, padding_mode), 0, geom


def _check_grad_out(grad_out: Any, batch: int, geom: Geometry, data_format: str) -> None:
    """`grad_out` must have the forward output's shape in `data_format`."""
    expected = shape_in((batch, geom.out_channels, geom.out_h, geom.out_w), data_format)
    if _shape(grad_out) != expected:
        raise ValueError(
            f"grad_out must have the forward output's shape {expected} ({', '.join(data_format.replace('C', 'O'))} "
            f"for data_format={data_format!r}), got {_shape(grad_out)}"
        )


def conv2d(
    x: Any,
    weight: Any,
    bias: Any | None = None,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    algorithm: str = "auto",
    max_workspace_bytes: int | None = None,
    deterministic: bool | None = None,
    padding_mode: str = "zeros",
    data_format: str = "NCHW",
) -> Any:
    """2-D convolution (cross-correlation, as in PyTorch) of a batch of images.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
        Input batch, a floating array (float16, float32, float64, complex64 or complex128; see
        :doc:`/user_guide/complex`) of NumPy, CuPy, torch, JAX or array-api-strict; or a
        dask array of NumPy or CuPy chunks (then the result is a lazy dask array with the same
        batch chunks, one ordinary call per chunk; chunks along C, H or W are first merged into
        whole samples). Needs ``conv2d[dask]``; see :mod:`conv2d.distributed`.
    weight : array, shape (O, C // groups, kH, kW)
        Filters, same library, device and dtype as `x`.
    bias : array, shape (O,), optional
        Added to every output position of each output channel.
    stride, dilation : int or (int, int), default 1
        Step between output positions and between kernel taps, positive.
    padding : int, (int, int), "valid" or "same", default 0
        Zeros added on both sides of each spatial axis. "same" (stride 1 only) keeps H and W,
        putting the odd extra row or column after, as PyTorch does.
    groups : int, default 1
        Split channels into this many independent convolutions (``groups=C`` is depthwise).
    algorithm : {"auto", "gather", "slices", "kernels", "native", "direct", "winograd", "pointwise"}, default "auto"
        How the convolution is computed; every choice gives the same result to float rounding
        (:data:`conv2d.ALGORITHMS` lists all but ``"auto"``). im2col, a patch matrix times the
        filters: ``"gather"`` (one indexed gather, the backend's scatter-add back),
        ``"slices"`` (kH*kW strided slices, slice additions back) or ``"kernels"`` (compiled kernels:
        on CuPy an im2col and a col2im device kernel; on NumPy, where Numba is installed, CPU
        kernels on all cores: direct loops, Winograd tiles, per-sample products or im2col by
        layer, see the user guide). Without a patch matrix: ``"native"`` (torch and
        JAX only: the library's own convolution, ``torch.nn.functional.conv2d`` or
        ``jax.lax.conv_general_dilated``, and its gradients); ``"direct"`` (kH*kW shifted
        multiply-adds, for depthwise and few-channels-per-group layers); ``"winograd"`` (3x3
        kernels with stride 1: Winograd's F(2x2, 3x3), 16 products of transformed tiles; float16
        computed in float32; its transforms mix neighbouring inputs, so an inf or NaN input gives
        NaN where the others give +-inf and reaches more outputs and gradients than read it, as
        cuDNN's Winograd does, and ``"auto"`` runs it only on finite data);
        ``"pointwise"`` (1x1 kernels: one batched product per sample on the NCHW arrays). One
        that does not apply to the layer or backend raises ``ValueError``. ``"auto"`` takes the
        first that applies of: ``native`` on torch, and on JAX but for 1x1 kernels and layers of
        at most 4 channels per group (not on a JAX GPU in deterministic mode); ``kernels`` on
        CuPy, and on NumPy where Numba is installed (but ``slices`` for non-finite inputs of the
        layers its Winograd tiles compute); ``direct`` for grouped layers of at most 4 channels per group (not on JAX);
        ``pointwise`` on NumPy for 1x1 kernels; ``winograd`` on NumPy for 3x3 stride-1 layers
        with at least 64 channels and filters per group, or 32 on outputs of at most 16x16;
        else ``slices``. A ``direct``, ``winograd`` or ``pointwise`` call whose one sample does
        not fit `max_workspace_bytes` runs ``slices`` instead.
    max_workspace_bytes : int, optional
        Scratch memory limit; the batch (and if needed the output rows) is split to stay under it.
        Default: ``CONV2D_MAX_WORKSPACE`` (e.g. ``"512MB"``), else 1 GiB.
    deterministic : bool, optional
        Make the backward pass bitwise reproducible on every backend (see
        :func:`conv2d_backward`); accepted here so one set of keyword arguments serves both.
        Default: ``CONV2D_DETERMINISTIC`` (``1`` on, ``0`` or unset off).
    padding_mode : {"zeros", "reflect", "replicate", "circular"}, default "zeros"
        What the padding holds, as in ``torch.nn.Conv2d(padding_mode=...)``: zeros, the input
        mirrored about its edge pixel, the edge pixel repeated, or the opposite side (periodic).
        A non-zero mode pads `x` explicitly (``torch.nn.functional.pad(x, ..., mode=...)``), then
        convolves without padding. ``"reflect"`` needs each padding smaller than the input axis,
        ``"circular"`` at most the axis. ``padding="same"`` works with every mode, the odd extra
        row or column after, as ``torch.nn.Conv2d`` pads it.
    data_format : {"NCHW", "NHWC"}, default "NCHW"
        Layout of `x` and of the result: ``"NHWC"`` is channels-last, (N, H, W, C) in and
        (N, OH, OW, O) out. The weight keeps its shape (O, C // groups, kH, kW) in both.

    Returns
    -------
    array, shape (N, O, OH, OW)
        (N, OH, OW, O) with ``data_format="NHWC"``. In the library and on the device of `x`, where
        ``OH = (H + pad_top + pad_bottom - dilation*(kH-1) - 1) // stride + 1`` (likewise OW).

    Raises
    ------
    TypeError
        An argument of the wrong type, a non-floating dtype, mixed dtypes (real and complex
        included: cast, e.g. ``weight.astype(x.dtype)``) or mixed libraries.
    ValueError
        Inconsistent shapes, a bad stride/padding/dilation/groups/algorithm, arrays on two
        devices, or a kernel larger than the padded input.
    MemoryError
        When not even one output row of one sample fits in the workspace limit.

    Examples
    --------
    >>> import numpy as np, conv2d
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 3, 8, 8))
    >>> w = rng.standard_normal((4, 3, 3, 3))
    >>> conv2d.conv2d(x, w, padding="same").shape
    (2, 4, 8, 8)
    """
    options: dict[str, Any] = dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups, algorithm=algorithm,
        max_workspace_bytes=max_workspace_bytes, deterministic=deterministic,
    )
    if check_padding_mode(padding_mode) != "zeros" or check_data_format(data_format) != "NCHW":
        xp, x_first, options["padding"], _ = _channels_first_padded(
            x, weight, bias, padding_mode, data_format, options)
        return to_data_format(xp, conv2d(x_first, weight, bias, **options), data_format)
    delegated = _delegated("conv2d", (x, weight, bias), options)
    if delegated is not None:
        return delegated
    named = {"x": x, "weight": weight} if bias is None else {"x": x, "weight": weight, "bias": bias}
    backend = check_arrays(named)
    geom = make_geometry(
        _shape(x), _shape(weight), None if bias is None else _shape(bias),
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    )
    y, _ = _conv.forward(
        backend, x, weight, bias, geom, check_algorithm(algorithm), resolve_limit(max_workspace_bytes),
        resolve_deterministic(deterministic),
    )
    return y


def conv2d_backward(
    grad_out: Any,
    x: Any,
    weight: Any,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    algorithm: str = "auto",
    max_workspace_bytes: int | None = None,
    deterministic: bool | None = None,
    padding_mode: str = "zeros",
    data_format: str = "NCHW",
) -> tuple[Any, Any, Any]:
    """Gradients of a loss through :func:`conv2d`, given the gradient of its output.

    Parameters
    ----------
    grad_out : array, shape (N, O, OH, OW)
        dLoss/dy for ``y = conv2d(x, weight, bias, ...)`` with the same arguments.
    x, weight : arrays
        The forward pass's input and filters.
    stride, padding, dilation, groups, algorithm, max_workspace_bytes, padding_mode, data_format
        As given to :func:`conv2d`; `grad_out` and `grad_x` are in `data_format` too. With a
        non-zero `padding_mode` the gradient of each padding pixel is added onto the input pixel
        it copies (for ``"circular"`` it wraps around to the opposite side).
    deterministic : bool, optional
        If True, `grad_x` is summed in a fixed order, so repeated calls give bitwise-identical
        gradients: ``algorithm="gather"`` then sums by a gather instead of the backend's atomic
        scatter-add (CuPy, torch on CUDA, JAX on a GPU). ``"slices"``, ``"kernels"``,
        ``"direct"``, ``"winograd"`` and ``"pointwise"`` are deterministic in both modes, as are
        the weight and bias gradients;
        ``"native"`` is on the CPU, runs cuDNN's deterministic algorithms on CUDA, and raises
        ``ValueError`` on a JAX GPU, where ``"auto"`` then runs ``"slices"``. Default:
        ``CONV2D_DETERMINISTIC`` (``1`` on, ``0`` or unset off).

    Returns
    -------
    grad_x : array, shape (N, C, H, W) (or (N, H, W, C) with ``data_format="NHWC"``)
    grad_weight : array, shape (O, C // groups, kH, kW)
    grad_bias : array, shape (O,)
        Returned whether or not the forward pass had a bias. For complex arrays the gradients are
        PyTorch's (``torch.autograd.grad`` of complex tensors): `grad_x` is computed with the
        conjugate of `weight`, `grad_weight` with the conjugate of `x`, `grad_bias` is the sum of
        `grad_out` (:doc:`/user_guide/complex`). With dask arrays (see
        :func:`conv2d`): `grad_x` is chunked like `x` along the batch (C, H and W whole;
        `grad_out` is rechunked to match), and `grad_weight` and `grad_bias` are lazy tree sums
        of the per-chunk gradients, equal to the single-call ones to float rounding.

    Raises
    ------
    TypeError, ValueError
        As :func:`conv2d`; also when `grad_out` does not have the forward output's shape.

    Examples
    --------
    >>> import numpy as np, conv2d
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    >>> y = conv2d.conv2d(x, w)
    >>> gx, gw, gb = conv2d.conv2d_backward(np.ones_like(y), x, w)
    >>> gx.shape, gw.shape, gb.shape
    ((2, 3, 8, 8), (4, 3, 3, 3), (4,))
    """
    options: dict[str, Any] = dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups, algorithm=algorithm,
        max_workspace_bytes=max_workspace_bytes, deterministic=deterministic,
    )
    if check_padding_mode(padding_mode) != "zeros" or check_data_format(data_format) != "NCHW":
        xp, x_first, options["padding"], geom = _channels_first_padded(
            x, weight, None, padding_mode, data_format, options)
        _check_grad_out(grad_out, _shape(x)[0], geom, data_format)
        grad_first = to_channels_first(xp, grad_out, data_format)
        grad_x, grad_weight, grad_bias = conv2d_backward(grad_first, x_first, weight, **options)
        if padding_mode != "zeros":
            grad_x = fold(xp, grad_x, geom.padding, padding_mode)
        return to_data_format(xp, grad_x, data_format), grad_weight, grad_bias
    delegated = _delegated("conv2d_backward", (grad_out, x, weight), options)
    if delegated is not None:
        return delegated
    backend = check_arrays({"grad_out": grad_out, "x": x, "weight": weight})
    geom = make_geometry(
        _shape(x), _shape(weight), None, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    check_output_shape("grad_out", _shape(grad_out), _shape(x)[0], geom)
    # PyTorch's convention for complex data: the raw maps of conj(x) and conj(w) (conv2d._complex).
    xp = backend.xp
    return _conv.backward(
        backend, grad_out, conj(xp, x), conj(xp, weight), geom, check_algorithm(algorithm), resolve_limit(max_workspace_bytes),
        deterministic=resolve_deterministic(deterministic),
    )



# The torch backend's compiler operators run these when a compiled graph executes (see conv2d._dispatch).
_dispatch.register_eager("conv2d", conv2d)
_dispatch.register_eager("conv2d_backward", conv2d_backward)

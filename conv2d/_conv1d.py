"""1-D convolution: the 2-D one on inputs of height one.

``conv1d`` on (N, C, L) with a weight (O, C // groups, K) is ``conv2d`` on (N, C, 1, L) with the
weight (O, C // groups, 1, K), stride (1, s), padding (0, p), dilation (1, d): every algorithm, the
chunking, the backends, dask and ``torch.compile`` come with it, and the unit axis costs a reshape
(``expand_dims`` and ``squeeze`` are views). Channels-last ``"NWC"`` is ``"NHWC"`` with H = 1.

Why not an N-d core now: the geometry, the gather plan, ``slices`` and the CuPy im2col/col2im kernels,
``direct``, ``winograd`` (2-D tiles) and ``native`` are written for two spatial axes. A ``conv3d``
would need a 3-axis geometry and output size, 3-axis patch building in ``gather``/``slices`` and in the
CUDA kernels (a third loop in each), ``direct`` over kD*kH*kW shifts, ``native`` calling
``conv3d``/``conv_general_dilated`` with three axes, and ``winograd`` left 2-D only. 1-D needs none of
that, so it rides on the 2-D path; the N-d generalisation is a separate change, done once for all
algorithms when a 3-D user appears.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace

from ._functional import conv2d, conv2d_backward
from ._geometry import _is_int, normalize_padding
from ._layout import check_data_format
from ._padding import check_mode_fits, check_padding_mode

Int1 = int | Sequence[int]
Padding1 = int | Sequence[int] | str


def _one(name: str, value: object, minimum: int) -> int:
    """An int or a 1-tuple of one, at least `minimum`."""
    kind = "positive" if minimum == 1 else "non-negative"
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 1:
        value = value[0]
    if not _is_int(value):
        raise TypeError(f"{name} must be a {kind} int or a 1-tuple of one (conv1d has one spatial axis), got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {kind} (at least {minimum}), got {value!r}")
    return int(value)


def _lifted(
    x: Any, weight: Any, stride: Int1, padding: Padding1, dilation: Int1, padding_mode: str, data_format: str
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """xp, x and weight with a unit height axis, and conv2d's stride, padding, dilation, padding_mode, data_format."""
    check_padding_mode(padding_mode)
    check_data_format(data_format, spatial=1)
    for name, array in (("x", x), ("weight", weight)):
        shape = tuple(getattr(array, "shape", ()))
        meaning = ", ".join(data_format) if name == "x" else "O, C/groups, K"
        if len(shape) != 3:
            raise ValueError(f"{name} must be 3-D ({meaning}) for conv1d, got shape {shape} with {len(shape)} dimensions")
    s, d = _one("stride", stride, 1), _one("dilation", dilation, 1)
    p: object = padding if isinstance(padding, str) else _one("padding", padding, 0)
    pads = normalize_padding(p if isinstance(p, str) else (0, p), (1, int(weight.shape[2])), (1, s), (1, d))  # type: ignore[arg-type]
    length = int(x.shape[1] if data_format == "NWC" else x.shape[2])
    if padding_mode != "zeros":
        check_mode_fits(padding_mode, pads[2:], (length,), padding)
    xp = array_namespace(x, weight)
    axis = 1 if data_format == "NWC" else 2
    options = dict(stride=(1, s), padding=p if isinstance(p, str) else (0, p), dilation=(1, d),
                   padding_mode=padding_mode, data_format="NHWC" if data_format == "NWC" else "NCHW")
    return xp, xp.expand_dims(x, axis=axis), xp.expand_dims(weight, axis=2), options


def conv1d(
    x: Any,
    weight: Any,
    bias: Any | None = None,
    *,
    stride: Int1 = 1,
    padding: Padding1 = 0,
    dilation: Int1 = 1,
    groups: int = 1,
    algorithm: str = "auto",
    max_workspace_bytes: int | None = None,
    deterministic: bool | None = None,
    padding_mode: str = "zeros",
    data_format: str = "NCW",
) -> Any:
    """1-D convolution (cross-correlation, as ``torch.nn.functional.conv1d``) of a batch of sequences.

    Parameters
    ----------
    x : array, shape (N, C, L), or (N, L, C) with ``data_format="NWC"``
        Input batch, as for :func:`conv2d`.
    weight : array, shape (O, C // groups, K)
        Filters, same library, device and dtype as `x`.
    bias : array, shape (O,), optional
    stride, dilation : int or (int,), default 1
    padding : int, (int,), "valid" or "same", default 0
        "same" (stride 1 only) keeps L, the odd extra element after, as PyTorch does.
    groups, algorithm, max_workspace_bytes, deterministic, padding_mode
        As in :func:`conv2d` (computed by it, on inputs of height one).
    data_format : {"NCW", "NWC"}, default "NCW"
        Layout of `x` and of the result; the weight keeps (O, C // groups, K) in both.

    Returns
    -------
    array, shape (N, O, OL), or (N, OL, O) with ``data_format="NWC"``
        ``OL = (L + 2 * padding - dilation * (K - 1) - 1) // stride + 1``.

    Raises
    ------
    TypeError, ValueError
        As :func:`conv2d`; also for arrays that are not 3-D, and for a stride, padding or dilation
        that is not an int or a 1-tuple.

    Examples
    --------
    >>> import numpy as np, conv2d
    >>> x, w = np.ones((2, 3, 10)), np.ones((4, 3, 5))
    >>> conv2d.conv1d(x, w, padding="same", padding_mode="circular").shape
    (2, 4, 10)
    """
    xp, x2, w2, options = _lifted(x, weight, stride, padding, dilation, padding_mode, data_format)
    y = conv2d(x2, w2, bias, groups=groups, algorithm=algorithm, max_workspace_bytes=max_workspace_bytes,
               deterministic=deterministic, **options)
    return xp.squeeze(y, axis=1 if data_format == "NWC" else 2)


def conv1d_backward(
    grad_out: Any,
    x: Any,
    weight: Any,
    *,
    stride: Int1 = 1,
    padding: Padding1 = 0,
    dilation: Int1 = 1,
    groups: int = 1,
    algorithm: str = "auto",
    max_workspace_bytes: int | None = None,
    deterministic: bool | None = None,
    padding_mode: str = "zeros",
    data_format: str = "NCW",
) -> tuple[Any, Any, Any]:
    """Gradients of a loss through :func:`conv1d`, given the gradient of its output.

    Parameters
    ----------
    grad_out : array, shape (N, O, OL), or (N, OL, O) with ``data_format="NWC"``
        dLoss/dy for ``y = conv1d(x, weight, bias, ...)`` with the same arguments.
    x, weight : arrays
        The forward pass's input and filters.
    stride, padding, dilation, groups, algorithm, max_workspace_bytes, deterministic, padding_mode, data_format
        As given to :func:`conv1d`.

    Returns
    -------
    grad_x : array, the shape of `x`
    grad_weight : array, shape (O, C // groups, K)
    grad_bias : array, shape (O,)

    Examples
    --------
    >>> import numpy as np, conv2d
    >>> x, w = np.ones((2, 3, 10)), np.ones((4, 3, 5))
    >>> gx, gw, gb = conv2d.conv1d_backward(np.ones((2, 4, 6)), x, w)
    >>> gx.shape, gw.shape, gb.shape
    ((2, 3, 10), (4, 3, 5), (4,))
    """
    xp, x2, w2, options = _lifted(x, weight, stride, padding, dilation, padding_mode, data_format)
    axis = 1 if data_format == "NWC" else 2
    if len(tuple(getattr(grad_out, "shape", ()))) != 3:
        raise ValueError(f"grad_out must be 3-D ({', '.join(data_format.replace('C', 'O'))}) for conv1d, "
                         f"got shape {tuple(getattr(grad_out, 'shape', ()))}")
    grad_x, grad_w, grad_b = conv2d_backward(
        xp.expand_dims(grad_out, axis=axis), x2, w2, groups=groups, algorithm=algorithm,
        max_workspace_bytes=max_workspace_bytes, deterministic=deterministic, **options,
    )
    return xp.squeeze(grad_x, axis=axis), xp.squeeze(grad_w, axis=2), grad_b

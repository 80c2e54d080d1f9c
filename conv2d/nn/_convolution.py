"""A convolution layer with the seed's protocol: ``forwardpass(X)``, ``backwardpass(lr, activation_prev, delta)``."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj

from .. import _conv
from .._conv import choose_algorithm
from .._determinism import resolve_deterministic
from .._functional import check_algorithm
from .._geometry import IntPair, Padding, make_geometry, positive_int, positive_ints
from .._layout import check_data_format, shape_in, to_channels_first, to_data_format
from .._padding import check_mode_fits, check_padding_mode, fold, pad
from .._workspace import resolve_limit
from ..backends import Backend, backend_of, get_backend
from ._parameters import Parameterized, dtype_name


def _sigmoid(xp: Any, z: Any) -> Any:
    # Written so that exp never overflows: exp(-|z|) is at most 1.
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _relu(xp: Any, z: Any) -> Any:
    # Zero where z <= 0, z elsewhere: a NaN (never <= 0) stays NaN, as torch.relu keeps it. The
    # comparison `z > 0` would turn it into a 0 and hide a diverged run behind finite losses.
    return xp.where(z <= 0, xp.zeros_like(z), z)


def _relu_slope(xp: Any, a: Any) -> Any:
    # 0 where the output is <= 0, else 1 (NaN included), as PyTorch's threshold_backward passes the
    # gradient through everywhere but where the output is <= 0.
    return xp.astype(xp.logical_not(a <= 0), a.dtype)


# name -> (activation of the pre-activation, its derivative written in terms of the activation).
# NaN and infinities go through as they do in PyTorch (forward and backward): a NaN stays visible.
ACTIVATIONS: dict[str | None, tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]] = {
    "sigmoid": (_sigmoid, lambda xp, a: a * (1 - a)),
    "relu": (_relu, _relu_slope),
    "tanh": (lambda xp, z: xp.tanh(z), lambda xp, a: 1 - a * a),
    None: (lambda xp, z: z, lambda xp, a: xp.ones_like(a)),
}


def _complex_hint(dtype: Any) -> str:
    """What to do instead, where `dtype` is complex: the layer is real-only, the functions are not.

    A complex layer would need complex initialisation, optimisers and checkpoints, and its
    activations (ReLU, sigmoid, tanh's saturation) order or bound real numbers: refused rather
    than half-supported.
    """
    if "complex" not in str(dtype):
        return ""
    return ("; the layer is real-only (its activations, initialisation, optimisers and checkpoints are), "
            "but conv2d.conv2d and conv2d.conv2d_backward take complex64 and complex128 arrays")


def to_floating(backend: Backend, name: str, array: Any, dtype: Any = None) -> Any:
    """`array` moved to `backend`; TypeError unless it is real floating; cast to `dtype` if given."""
    if is_array_api_obj(array):
        backend_of(array, name)  # an unsupported array (a masked one) is refused under its own name
    array = backend.asarray(array)
    if not backend.xp.isdtype(array.dtype, "real floating"):
        raise TypeError(f"{name} has dtype {array.dtype}; the layer needs real floating data{_complex_hint(array.dtype)}")
    return array if dtype is None else backend.xp.astype(array, dtype, copy=False)


def forward_state(saved: Any) -> Any:
    """What the last forwardpass kept for the backward pass; RuntimeError when there was none."""
    if saved is None:
        raise RuntimeError("backwardpass needs a forwardpass first: there is no saved forward state")
    return saved


def batch_size(activation_prev: Any) -> int:
    """The batch size of a layer input: anything forwardpass accepts, an array of any library or a nested list."""
    shape = getattr(activation_prev, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    if isinstance(activation_prev, Sequence) and not isinstance(activation_prev, (str, bytes)):
        return len(activation_prev)
    raise TypeError(
        "activation_prev must be the input of the last forwardpass (an array, or a nested list of its samples), "
        f"got {type(activation_prev).__name__} {activation_prev!r:.60}"
    )


def check_batch(activation_prev: Any, batch: int) -> None:
    """backwardpass must be given the batch of the last forwardpass, not stale state of another one.

    Only the batch size is read, so a nested list is as good as the array it became.
    """
    size = batch_size(activation_prev)
    if size != batch:
        raise ValueError(
            f"activation_prev has batch size {size} but the last forwardpass had {batch}; "
            "call forwardpass on this batch first"
        )


def check_lr(lr: Any) -> float:
    """The learning rate as a Python float: a real, finite, non-negative number (Python or NumPy scalar).

    A Python float keeps the weights' dtype: a NumPy float64 scalar would promote float32 weights
    on NumPy and JAX, and array-api-strict rejects it outright. A string, a bool, NaN or a negative
    rate would silently ruin (or reverse) the training.
    """
    if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a real number such as 0.1, got {type(lr).__name__} {lr!r}")
    value = float(lr)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lr must be finite and non-negative, got {lr!r}")
    return value



def sgd_update(layer: Any, lr: Any, grads: dict[str, Any]) -> None:
    """The seed's plain SGD step, ``p - lr * grad`` for each parameter, as new arrays."""
    lr = check_lr(lr)
    # New arrays rather than in-place updates: JAX arrays are immutable, and the caller may
    # still hold the old weights.
    for name, grad in grads.items():
        setattr(layer, name, getattr(layer, name) - lr * grad)


def _input_shape(input_shape: Any, in_channels: Any, filter_size: Any, numfilters: Any) -> tuple[int, ...]:
    """ConvolutionLayer's first argument, checked, also from its former keyword ``in_channels`` (deprecated).

    The three leading arguments default to None only so that ``in_channels=`` can stand for the
    first: each is still required.
    """
    name = "input_shape"
    if in_channels is not None:
        if input_shape is not None:
            raise TypeError("ConvolutionLayer got both input_shape and in_channels, its former name; give input_shape only")
        # stacklevel 3: the warning points at the caller's ConvolutionLayer(...), not at this module.
        warnings.warn("ConvolutionLayer(in_channels=...) is deprecated: the argument is the input shape "
                      "(depth, rows, cols), now called input_shape; write input_shape=... or pass it first",
                      DeprecationWarning, stacklevel=3)
        input_shape, name = in_channels, "in_channels"
    missing = [arg for arg, value in (("input_shape", input_shape), ("filter_size", filter_size),
                                      ("numfilters", numfilters)) if value is None]
    if missing:
        raise TypeError(f"ConvolutionLayer() missing required argument{'s' if len(missing) > 1 else ''}: "
                        f"{', '.join(map(repr, missing))}")
    return positive_ints(name, input_shape, "(depth, rows, cols)")


def call_settings(dtype: str, algorithm: str, max_workspace_bytes: int | None, backend: str | Backend | None,
                  deterministic: bool | None) -> tuple[str, int | None, Backend, bool | None]:
    """A convolution layer's checked settings, (algorithm, max_workspace_bytes, backend, deterministic):
    the dtype and every setting it passes to its calls fail here, not at the first batch."""
    if dtype not in ("float16", "float32", "float64"):
        raise TypeError(f"dtype must be 'float16', 'float32' or 'float64', got {dtype!r}{_complex_hint(dtype)}")
    algorithm = check_algorithm(algorithm)
    resolve_limit(max_workspace_bytes)
    resolved = get_backend(backend)
    choose_algorithm(algorithm, resolved)  # 'kernels' on a backend without them fails here
    resolve_deterministic(deterministic)
    return algorithm, max_workspace_bytes, resolved, deterministic


def initial_parameters(backend: Backend, dtype: str, seed: int | None, weight_shape: tuple[int, ...],
                       filters: int) -> tuple[Any, Any, Any]:
    """(dtype, weights, biases) of a new convolution layer: weights then biases drawn (normal, mean 0,
    standard deviation 0.1) from one NumPy Generator seeded with `seed`, on the host, so that a seed
    gives the same parameters on every backend."""
    resolved = backend.dtype(dtype)
    rng = np.random.default_rng(seed)
    weights = backend.asarray(rng.normal(0.0, 0.1, weight_shape), dtype=resolved)
    return resolved, weights, backend.asarray(rng.normal(0.0, 0.1, filters), dtype=resolved)


class ConvolutionLayer(Parameterized):
    """A 2-D convolution layer followed by an activation, trained by plain SGD.

    A drop-in for the NumPy layer this project grew from, on any backend: same constructor
    arguments, same attributes (``weights``, ``biases``, ``out_row``, ...), same methods.
    For other optimizers, :meth:`backward` gives the gradients without updating anything
    (see :mod:`conv2d.optim`); :meth:`state_dict` and :meth:`load_state_dict` checkpoint the
    parameters, and the layer pickles (without the state its last forwardpass kept).

    Parameters
    ----------
    input_shape : (int, int, int)
        (depth, rows, cols) of one input sample. Formerly called ``in_channels``, a name that
        read as a channel count: that keyword still works, with a DeprecationWarning.
    filter_size : (int, int)
        (rows, cols) of each filter.
    numfilters : int
        Output depth.
    stride : int or (int, int), default 1
    padding : int, (int, int), "valid" or "same", default 0
    dilation : int or (int, int), default 1
    activation : {"sigmoid", "relu", "tanh", None}, default "sigmoid"
    dtype : str, default "float64"
        Floating dtype of the weights and of the computation; inputs are cast to it.
    seed : int, optional
        Seed of the NumPy Generator that draws the initial weights and biases (normal, mean 0,
        standard deviation 0.1) on the host, so that a seed gives the same weights on every backend.
    backend : str or Backend, optional
        Where the layer lives; default: the active backend (see :func:`conv2d.get_backend`).
    padding_mode : {"zeros", "reflect", "replicate", "circular"}, default "zeros"
        What the padding holds, as in :func:`conv2d.conv2d` and ``torch.nn.Conv2d``.
    data_format : {"NCHW", "NHWC"}, default "NCHW"
        Layout of `X`, of the output and of the deltas. `input_shape` stays (depth, rows, cols)
        and the weights (numfilters, depth, rows, cols) in both, as in PyTorch's channels-last
        layers, so a checkpoint's parameters do not depend on the layout.
    algorithm, max_workspace_bytes, deterministic
        As in :func:`conv2d.conv2d`. The patch matrix built by `forwardpass` is kept for
        `backwardpass` when the batch fits in the workspace in one piece. ``deterministic=None``
        reads ``CONV2D_DETERMINISTIC`` at each call.

    Notes
    -----
    The layer owns what it keeps between `forwardpass` and `backwardpass`: the activation's
    derivative (computed in `forwardpass`), and the patch matrix or a copy of `X` (a copy of `X`
    on NumPy, which rebuilds each chunk's patches in the CPU cache, measured faster than keeping
    them all, and wherever the batch was split), never a view of the caller's arrays. So the
    returned output and `X` may be changed in place afterwards (``out -= target``) without
    changing the gradients.

    ``weights`` (numfilters, depth, rows, cols) and ``biases`` (numfilters,) may be replaced by
    arrays of the layer's backend, device and dtype; anything else is refused at the next
    `forwardpass` or `backwardpass` with a message naming the attribute.

    Examples
    --------
    >>> import numpy as np, conv2d
    >>> layer = conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 4, 1, seed=0)
    >>> X = np.random.default_rng(1).standard_normal((2, 3, 8, 8))
    >>> out = layer.forwardpass(X)
    >>> out.shape
    (2, 4, 6, 6)
    >>> layer.backwardpass(0.1, X, out - 0.5).shape
    (2, 3, 8, 8)
    >>> sorted(layer.parameters())
    ['biases', 'weights']
    """

    PARAMETERS = ("weights", "biases")

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        filter_size: Sequence[int] | None = None,
        numfilters: int | None = None,
        stride: IntPair = 1,
        *,
        padding: Padding = 0,
        dilation: IntPair = 1,
        activation: str | None = "sigmoid",
        dtype: str = "float64",
        seed: int | None = None,
        backend: str | Backend | None = None,
        algorithm: str = "auto",
        max_workspace_bytes: int | None = None,
        deterministic: bool | None = None,
        in_channels: Sequence[int] | None = None,
        padding_mode: str = "zeros",
        data_format: str = "NCHW",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        input_shape = _input_shape(input_shape, in_channels, filter_size, numfilters)
        filter_size = positive_ints("filter_size", filter_size, "(rows, cols)")
        numfilters = positive_int("numfilters", numfilters)
        self.algorithm, self.max_workspace_bytes, self.backend, self.deterministic = call_settings(
            dtype, algorithm, max_workspace_bytes, backend, deterministic)
        self.in_depth, self.in_row, self.in_col = input_shape
        self.filter_row, self.filter_col = filter_size
        self.out_depth = numfilters
        self.stride = stride
        weight_shape = (numfilters, self.in_depth, self.filter_row, self.filter_col)
        self._geom = make_geometry(
            (1, *input_shape), weight_shape, None, stride=stride, padding=padding, dilation=dilation, groups=1
        )
        self.out_row, self.out_col = self._geom.out_h, self._geom.out_w
        self.padding_mode = check_padding_mode(padding_mode)
        self.data_format = check_data_format(data_format)
        # What the arithmetic sees: with a non-zero mode the input is padded explicitly, then convolved unpadded.
        self._inner = self._geom
        if padding_mode != "zeros":
            check_mode_fits(padding_mode, self._geom.padding, (self.in_row, self.in_col), padding)
            top, bottom, left, right = self._geom.padding
            self._inner = make_geometry((1, self.in_depth, self.in_row + top + bottom, self.in_col + left + right),
                                        weight_shape, None, stride=stride, padding=0, dilation=dilation, groups=1)
        self.activation = activation
        self.dtype, self.weights, self.biases = initial_parameters(self.backend, dtype, seed, weight_shape, numfilters)
        # (batch size, patches or None when they exceed the workspace limit, a copy of X in that case,
        # activation derivative or None for no activation) of the last forwardpass
        self._saved: tuple[int, Any | None, Any | None, Any | None] | None = None

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each parameter must have."""
        return {"weights": (self.out_depth, self.in_depth, self.filter_row, self.filter_col), "biases": (self.out_depth,)}

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments that shape this layer, as JSON-ready values (see :func:`conv2d.nn.save`)."""
        top, bottom, left, right = self._geom.padding
        return {
            "type": "ConvolutionLayer",
            "in_channels": [self.in_depth, self.in_row, self.in_col],
            "filter_size": [self.filter_row, self.filter_col],
            "numfilters": self.out_depth,
            "stride": list(self._geom.stride),
            # Asymmetric padding comes only from "same" (the odd extra row or column after).
            "padding": [top, left] if (top, left) == (bottom, right) else "same",
            "dilation": list(self._geom.dilation),
            "activation": self.activation,
            "dtype": dtype_name(self.backend, self.dtype),
            # Written only where not the default, so that files of default layers stay readable by earlier versions.
            **({"padding_mode": self.padding_mode} if self.padding_mode != "zeros" else {}),
            **({"data_format": self.data_format} if self.data_format != "NCHW" else {}),
        }

    def forwardpass(self, X: Any) -> Any:
        """Return activation(conv(X) + biases), shape (n, out_depth, out_row, out_col).

        `X` (n, in_depth, in_row, in_col) may come from any supported library; it is moved to
        the layer's backend. The patch matrix is kept for :meth:`backwardpass`. With
        ``data_format="NHWC"``, `X` is (n, in_row, in_col, in_depth) and the output
        (n, out_row, out_col, out_depth).
        """
        X = to_floating(self.backend, "X", X, self.dtype)
        expected = shape_in((0, self._geom.in_channels, self._geom.height, self._geom.width), self.data_format)[1:]
        if X.ndim != 4 or tuple(X.shape[1:]) != expected:
            layout = "" if self.data_format == "NCHW" else " (the layer's data_format='NHWC': n, rows, cols, depth)"
            raise ValueError(f"X must have shape (n, {', '.join(map(str, expected))}), got {tuple(X.shape)}{layout}")
        self._check_current_parameters()
        limit = resolve_limit(self.max_workspace_bytes)
        xp = array_namespace(X)
        X = to_channels_first(xp, X, self.data_format)
        if self.padding_mode != "zeros":
            X = pad(xp, X, self._geom.padding, self.padding_mode)
        pre, cols = _conv.forward(
            self.backend, X, self.weights, self.biases, self._inner, self.algorithm, limit,
            resolve_deterministic(self.deterministic), keep_patches=True,
        )
        activation, derivative = ACTIVATIONS[self.activation]
        out = to_data_format(xp, activation(xp, pre), self.data_format)
        # Keep only arrays the layer owns (see Notes): a chunk's patch matrix no larger than its
        # samples may be a view of them (a 1x1 kernel's), and X itself is the caller's (or shares its memory).
        if cols is not None:
            chunks, pieces = cols
            sample = math.prod(X.shape[1:])
            cols = (chunks, [
                xp.asarray(piece, copy=True) if math.prod(piece.shape) <= (chunk.stop - chunk.start) * sample else piece
                for chunk, piece in zip(chunks, pieces, strict=True)
            ])
        kept_x = xp.asarray(X, copy=True) if cols is None else None
        slope = None if self.activation is None else derivative(xp, out)
        self._saved = (X.shape[0], cols, kept_x, slope)
        return out

    def backward(self, activation_prev: Any, delta: Any) -> tuple[Any, dict[str, Any]]:
        """Return dE/dX and the parameters' gradients, changing nothing.

        Parameters
        ----------
        activation_prev : array
            The input given to the last :meth:`forwardpass` (only its batch size is used).
        delta : array, shape (n, out_depth, out_row, out_col)
            dE/d(output of the last forwardpass).

        Returns
        -------
        delta_prev : array, shape (n, in_depth, in_row, in_col)
            dE/dX.
        grads : dict
            ``{"weights": dE/dweights, "biases": dE/dbiases}``, keyed like :meth:`parameters`.
        """
        batch, cols, X, slope = forward_state(self._saved)
        check_batch(activation_prev, batch)
        delta = to_floating(self.backend, "delta", delta, self.dtype)
        expected = shape_in((batch, self.out_depth, self.out_row, self.out_col), self.data_format)
        if tuple(delta.shape) != expected:
            raise ValueError(f"delta must have the forward output's shape {expected} "
                             f"({', '.join(self.data_format.replace('C', 'O'))}), got {tuple(delta.shape)}")
        self._check_current_parameters()
        grad_pre = delta if slope is None else delta * slope
        xp = array_namespace(grad_pre)
        limit = resolve_limit(self.max_workspace_bytes)
        grad_x, grad_w, grad_b = _conv.backward(
            self.backend, to_channels_first(xp, grad_pre, self.data_format), X, self.weights, self._inner,
            self.algorithm, limit, cols, resolve_deterministic(self.deterministic),
        )
        if self.padding_mode != "zeros":
            grad_x = fold(xp, grad_x, self._geom.padding, self.padding_mode)
        return to_data_format(xp, grad_x, self.data_format), {"weights": grad_w, "biases": grad_b}

    def backwardpass(self, lr: float, activation_prev: Any, delta: Any) -> Any:
        """Update weights and biases by SGD and return dE/dX.

        Parameters
        ----------
        lr : float
            Learning rate: a real, finite, non-negative number (Python or NumPy scalar); anything
            else (a string, a bool, NaN, a negative rate) is refused before any update.
        activation_prev : array or nested list
            The input given to the last :meth:`forwardpass` (only its batch size is used).
        delta : array, shape (n, out_depth, out_row, out_col)
            dE/d(output of the last forwardpass).

        Returns
        -------
        array, shape (n, in_depth, in_row, in_col)
            dE/dX, computed with the weights as they were before this update.
        """
        check_lr(lr)  # before any work: a bad rate must not leave half an update behind
        grad_x, grads = self.backward(activation_prev, delta)
        sgd_update(self, lr, grads)
        return grad_x

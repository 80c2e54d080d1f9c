"""A convolution layer with the seed's protocol: ``forwardpass(X)``, ``backwardpass(lr, activation_prev, delta)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from . import _conv
from ._conv import choose_algorithm
from ._determinism import resolve_deterministic
from ._functional import check_algorithm, check_arrays
from ._parameters import Parameterized, dtype_name
from ._workspace import resolve_limit
from ._geometry import IntPair, Padding, check_output_shape, make_geometry, positive_int, positive_ints
from .backends import Backend, get_backend


def _sigmoid(xp: Any, z: Any) -> Any:
    # Written so that exp never overflows: exp(-|z|) is at most 1.
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


# name -> (activation of the pre-activation, its derivative written in terms of the activation)
ACTIVATIONS: dict[str | None, tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]] = {
    "sigmoid": (_sigmoid, lambda xp, a: a * (1 - a)),
    "relu": (lambda xp, z: xp.where(z > 0, z, xp.zeros_like(z)), lambda xp, a: xp.astype(a > 0, a.dtype)),
    "tanh": (lambda xp, z: xp.tanh(z), lambda xp, a: 1 - a * a),
    None: (lambda xp, z: z, lambda xp, a: xp.ones_like(a)),
}


def to_floating(backend: Backend, name: str, array: Any, dtype: Any = None) -> Any:
    """`array` moved to `backend`; TypeError unless it is real floating; cast to `dtype` if given."""
    array = backend.asarray(array)
    if not backend.xp.isdtype(array.dtype, "real floating"):
        raise TypeError(f"{name} has dtype {array.dtype}; the layer needs real floating data")
    return array if dtype is None else backend.xp.astype(array, dtype, copy=False)


def forward_state(saved: Any) -> Any:
    """What the last forwardpass kept for the backward pass; RuntimeError when there was none."""
    if saved is None:
        raise RuntimeError("backwardpass needs a forwardpass first: there is no saved forward state")
    return saved


def check_batch(activation_prev: Any, batch: int) -> None:
    """backwardpass must be given the batch of the last forwardpass, not stale state of another one."""
    if activation_prev.shape[0] != batch:
        raise ValueError(
            f"activation_prev has batch size {activation_prev.shape[0]} but the last forwardpass had {batch}; "
            "call forwardpass on this batch first"
        )


def sgd_update(layer: Any, lr: float, grads: dict[str, Any]) -> None:
    """The seed's plain SGD step, ``p - lr * grad`` for each parameter, as new arrays."""
    # A Python float keeps the weights' dtype: a NumPy float64 scalar would promote float32
    # weights on NumPy and JAX, and array-api-strict rejects it outright.
    lr = float(lr)
    # New arrays rather than in-place updates: JAX arrays are immutable, and the caller may
    # still hold the old weights.
    for name, grad in grads.items():
        setattr(layer, name, getattr(layer, name) - lr * grad)


class ConvolutionLayer(Parameterized):
    """A 2-D convolution layer followed by an activation, trained by plain SGD.

    A drop-in for the NumPy layer this project grew from, on any backend: same constructor
    arguments, same attributes (``weights``, ``biases``, ``out_row``, ...), same methods.
    For other optimizers, :meth:`backward` gives the gradients without updating anything
    (see :mod:`conv2d.optim`); :meth:`state_dict` and :meth:`load_state_dict` checkpoint the
    parameters, and the layer pickles (without the state its last forwardpass kept).

    Parameters
    ----------
    in_channels : (int, int, int)
        (depth, rows, cols) of one input sample.
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
    algorithm, max_workspace_bytes, deterministic
        As in :func:`conv2d.conv2d`. The patch matrix built by `forwardpass` is kept for
        `backwardpass` when the batch fits in the workspace in one piece. ``deterministic=None``
        reads ``CONV2D_DETERMINISTIC`` at each call.

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
        in_channels: Sequence[int],
        filter_size: Sequence[int],
        numfilters: int,
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
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        in_channels = positive_ints("in_channels", in_channels, "(depth, rows, cols)")
        filter_size = positive_ints("filter_size", filter_size, "(rows, cols)")
        numfilters = positive_int("numfilters", numfilters)
        if dtype not in ("float16", "float32", "float64"):
            raise TypeError(f"dtype must be 'float16', 'float32' or 'float64', got {dtype!r}")
        self.algorithm = check_algorithm(algorithm)
        self.max_workspace_bytes = max_workspace_bytes
        resolve_limit(max_workspace_bytes)  # a bad limit fails here, not at the first batch
        self.backend = get_backend(backend)
        choose_algorithm(self.algorithm, self.backend)  # 'kernels' on a backend without them fails here
        resolve_deterministic(deterministic)
        self.deterministic = deterministic
        self.in_depth, self.in_row, self.in_col = in_channels
        self.filter_row, self.filter_col = filter_size
        self.out_depth = numfilters
        self.stride = stride
        weight_shape = (numfilters, self.in_depth, self.filter_row, self.filter_col)
        self._geom = make_geometry(
            (1, *in_channels), weight_shape, None, stride=stride, padding=padding, dilation=dilation, groups=1
        )
        self.out_row, self.out_col = self._geom.out_h, self._geom.out_w
        self.activation = activation
        self.dtype = self.backend.dtype(dtype)
        rng = np.random.default_rng(seed)
        self.weights = self.backend.asarray(rng.normal(0.0, 0.1, weight_shape), dtype=self.dtype)
        self.biases = self.backend.asarray(rng.normal(0.0, 0.1, numfilters), dtype=self.dtype)
        # (input, patches or None when they exceed the workspace limit, activation) of the last forwardpass
        self._saved: tuple[Any, Any | None, Any] | None = None

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
        }

    def forwardpass(self, X: Any) -> Any:
        """Return activation(conv(X) + biases), shape (n, out_depth, out_row, out_col).

        `X` (n, in_depth, in_row, in_col) may come from any supported library; it is moved to
        the layer's backend. The patch matrix is kept for :meth:`backwardpass`.
        """
        X = to_floating(self.backend, "X", X, self.dtype)
        expected = (self._geom.in_channels, self._geom.height, self._geom.width)
        if X.ndim != 4 or tuple(X.shape[1:]) != expected:
            raise ValueError(f"X must have shape (n, {', '.join(map(str, expected))}), got {tuple(X.shape)}")
        check_arrays({"X": X, "weights": self.weights, "biases": self.biases})
        limit = resolve_limit(self.max_workspace_bytes)
        pre, cols = _conv.forward(
            self.backend, X, self.weights, self.biases, self._geom, self.algorithm, limit,
            resolve_deterministic(self.deterministic), keep_patches=True,
        )
        xp = array_namespace(pre)
        out = ACTIVATIONS[self.activation][0](xp, pre)
        self._saved = (X, cols, out)
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
        X, cols, out = forward_state(self._saved)
        batch = X.shape[0]
        check_batch(activation_prev, batch)
        delta = to_floating(self.backend, "delta", delta, self.dtype)
        check_output_shape("delta", tuple(delta.shape), batch, self._geom)
        xp = array_namespace(delta)
        grad_pre = delta * ACTIVATIONS[self.activation][1](xp, out)
        limit = resolve_limit(self.max_workspace_bytes)
        grad_x, grad_w, grad_b = _conv.backward(
            self.backend, grad_pre, X, self.weights, self._geom, self.algorithm, limit, cols,
            resolve_deterministic(self.deterministic),
        )
        return grad_x, {"weights": grad_w, "biases": grad_b}

    def backwardpass(self, lr: float, activation_prev: Any, delta: Any) -> Any:
        """Update weights and biases by SGD and return dE/dX.

        Parameters
        ----------
        lr : float
            Learning rate.
        activation_prev : array
            The input given to the last :meth:`forwardpass` (only its batch size is used).
        delta : array, shape (n, out_depth, out_row, out_col)
            dE/d(output of the last forwardpass).

        Returns
        -------
        array, shape (n, in_depth, in_row, in_col)
            dE/dX, computed with the weights as they were before this update.
        """
        grad_x, grads = self.backward(activation_prev, delta)
        sgd_update(self, lr, grads)
        return grad_x

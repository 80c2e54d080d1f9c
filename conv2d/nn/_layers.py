"""Companion layers for :class:`conv2d.ConvolutionLayer`, with the same protocol, on every backend.

Each layer has ``forwardpass(X)`` (which keeps what the backward pass needs) and
``backwardpass(lr, activation_prev, delta)`` (which returns dE/dX and, for :class:`DenseLayer`,
takes a plain SGD step), so that they chain with the convolution layer in a layer-by-layer
network. They are written on the array API namespace of their backend, like the convolution.
Like :class:`conv2d.ConvolutionLayer`, each also has ``parameters()``, ``backward(activation_prev,
delta)`` (dE/dX and the gradients, no update), ``set_parameters``, ``state_dict``,
``load_state_dict``, and pickles without its saved forward state.

Pooling reuses the convolution's im2col and col2im: a pooling window is a depthwise convolution
(``groups = channels``) with no padding, so the convolution's patches are every window, and its
col2im sends the window gradients back (overlapping windows add up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj
from array_api_compat import device as device_of

from .._conv import choose_algorithm
from .._geometry import Geometry, IntPair, check_output_shape, int_pair, make_geometry, positive_int, positive_ints
from ..backends import Backend, backend_of, get_backend
from ._convolution import ACTIVATIONS, batch_size, check_batch, check_lr, forward_state, sgd_update, to_floating
from ._parameters import Parameterized, dtype_name, unknown_keys

__all__ = [
    "AvgPoolLayer", "DenseLayer", "FlattenLayer", "MaxPoolLayer", "Sequential", "softmax_cross_entropy",
]


def _gather_windows(backend: Backend, x: Any, geom: Geometry) -> Any:
    """Every pooling window of `x`: (depth, kH*kW, n*out_row*out_col), the convolution's patch layout."""
    algorithm = choose_algorithm("auto", backend)
    return algorithm.patches(backend, x, geom, (0, geom.out_h))


def _scatter_windows(backend: Backend, grad_windows: Any, n: int, geom: Geometry) -> Any:
    """The inverse of :func:`_gather_windows` for gradients: each pixel gets the sum over its windows."""
    algorithm = choose_algorithm("auto", backend)
    acc = algorithm.grad_start(backend, grad_windows, n, geom)
    acc = algorithm.grad_add(backend, acc, grad_windows, geom, (0, geom.out_h))
    return algorithm.grad_finish(acc, n, geom)


def _to_nchw(xp: Any, per_channel: Any, n: int, geom: Geometry) -> Any:
    """(depth, n*out_row*out_col) -> (n, depth, out_row, out_col)."""
    return xp.permute_dims(xp.reshape(per_channel, (geom.in_channels, n, geom.out_h, geom.out_w)), (1, 0, 2, 3))


class _Pool(Parameterized):
    """What max- and average-pooling share: the window geometry, input checks and saved state."""

    def __init__(
        self,
        in_channels: Sequence[int],
        pool_size: IntPair = 2,
        stride: IntPair | None = None,
        *,
        backend: str | Backend | None = None,
    ) -> None:
        in_channels = positive_ints("in_channels", in_channels, "(depth, rows, cols)")
        pool_rows, pool_cols = int_pair("pool_size", pool_size, minimum=1)
        self.backend = get_backend(backend)
        self.in_depth, self.in_row, self.in_col = in_channels
        self.pool_row, self.pool_col = pool_rows, pool_cols
        self.stride = (pool_rows, pool_cols) if stride is None else int_pair("stride", stride, minimum=1)
        # One window per channel: the geometry of a depthwise convolution with a (1, kH, kW) filter.
        self._geom: Geometry = make_geometry(
            (1, *in_channels), (self.in_depth, 1, pool_rows, pool_cols), None,
            stride=self.stride, padding=0, groups=self.in_depth,
        )
        self.out_depth, self.out_row, self.out_col = self.in_depth, self._geom.out_h, self._geom.out_w
        self._saved: Any = None

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (see :func:`conv2d.nn.save`)."""
        return {
            "type": type(self).__name__,
            "in_channels": [self.in_depth, self.in_row, self.in_col],
            "pool_size": [self.pool_row, self.pool_col],
            "stride": list(self.stride),
        }

    def _windows(self, X: Any) -> tuple[Any, Any]:
        """X on the layer's backend and its windows, (depth, kH*kW, n*out_row*out_col)."""
        X = to_floating(self.backend, "X", X)
        expected = (self.in_depth, self.in_row, self.in_col)
        if X.ndim != 4 or tuple(X.shape[1:]) != expected:
            raise ValueError(f"X must have shape (n, {', '.join(map(str, expected))}), got {tuple(X.shape)}")
        return X, _gather_windows(self.backend, X, self._geom)

    def _delta(self, activation_prev: Any, delta: Any) -> tuple[int, Any]:
        """The batch size and `delta` as (depth, 1, n*out_row*out_col), after the checks."""
        batch, dtype = forward_state(self._saved)[:2]
        check_batch(activation_prev, batch)
        delta = to_floating(self.backend, "delta", delta, dtype)
        check_output_shape("delta", tuple(delta.shape), batch, self._geom)
        xp = self.backend.xp
        return batch, xp.reshape(xp.permute_dims(delta, (1, 0, 2, 3)), (self.in_depth, 1, -1))


class MaxPoolLayer(_Pool):
    """Max-pooling over windows of each channel (PyTorch's ``max_pool2d`` without padding).

    Parameters
    ----------
    in_channels : (int, int, int)
        (depth, rows, cols) of one input sample.
    pool_size : int or (int, int), default 2
        Window (rows, cols).
    stride : int or (int, int), optional
        Step between windows; default: the window size (non-overlapping windows).
    backend : str or Backend, optional
        Where the layer works; default: the active backend. Inputs from other libraries are moved here.

    Notes
    -----
    The gradient of each window goes to its maximum; where a window holds the maximum twice it
    goes to the first one (in row-major order), as ``argmax`` picks it. A window holding NaN has
    the maximum NaN and its gradient goes to its last NaN, as in PyTorch.

    Examples
    --------
    >>> import numpy as np, conv2d.nn
    >>> pool = conv2d.nn.MaxPoolLayer((3, 8, 8), 2)
    >>> X = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    >>> pool.forwardpass(X).shape
    (2, 3, 4, 4)
    >>> pool.backwardpass(0.1, X, np.ones((2, 3, 4, 4))).shape
    (2, 3, 8, 8)
    """

    def forwardpass(self, X: Any) -> Any:
        """Return the window maxima, shape (n, depth, out_row, out_col); keep where they were."""
        X, windows = self._windows(X)
        xp = self.backend.xp
        where = xp.argmax(windows, axis=1, keepdims=True)  # (depth, 1, n*positions)
        # A window holding NaN has the maximum NaN (xp.max propagates it, as max_pool2d does), and
        # PyTorch sends its gradient to the window's last NaN (its kernels take any NaN as a new
        # maximum); argmax would pick the first.
        taps = self.pool_row * self.pool_col
        tap = xp.reshape(xp.arange(taps, dtype=where.dtype, device=device_of(where)), (1, taps, 1))
        last_nan = xp.max(xp.where(xp.isnan(windows), tap, xp.full_like(tap, -1)), axis=1, keepdims=True)
        where = xp.where(last_nan >= 0, last_nan, where)
        self._saved = (X.shape[0], X.dtype, where)
        return _to_nchw(xp, xp.max(windows, axis=1), X.shape[0], self._geom)

    def backward(self, activation_prev: Any, delta: Any) -> tuple[Any, dict[str, Any]]:
        """Return (dE/dX, {}): each window's delta at its maximum, zero elsewhere; no parameters."""
        batch, delta = self._delta(activation_prev, delta)
        xp = self.backend.xp
        where = self._saved[2]
        taps = self.pool_row * self.pool_col
        # A one-hot mask along the window axis by comparison with arange: the standard has no scatter.
        tap = xp.reshape(xp.arange(taps, dtype=where.dtype, device=device_of(where)), (1, taps, 1))
        grad_windows = xp.where(tap == where, delta, xp.zeros_like(delta))
        return _scatter_windows(self.backend, grad_windows, batch, self._geom), {}

    def backwardpass(self, lr: float, activation_prev: Any, delta: Any) -> Any:
        """Return dE/dX (`lr` is unused: no parameters)."""
        return self.backward(activation_prev, delta)[0]


class AvgPoolLayer(_Pool):
    """Average-pooling over windows of each channel (PyTorch's ``avg_pool2d`` without padding).

    Parameters are those of :class:`MaxPoolLayer`.

    Examples
    --------
    >>> import numpy as np, conv2d.nn
    >>> pool = conv2d.nn.AvgPoolLayer((1, 4, 4), 2)
    >>> pool.forwardpass(np.arange(16.0).reshape(1, 1, 4, 4))[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """

    def forwardpass(self, X: Any) -> Any:
        """Return the window means, shape (n, depth, out_row, out_col)."""
        X, windows = self._windows(X)
        xp = self.backend.xp
        self._saved = (X.shape[0], X.dtype)
        return _to_nchw(xp, xp.mean(windows, axis=1), X.shape[0], self._geom)

    def backward(self, activation_prev: Any, delta: Any) -> tuple[Any, dict[str, Any]]:
        """Return (dE/dX, {}): each window's delta shared equally by its pixels; no parameters."""
        batch, delta = self._delta(activation_prev, delta)
        xp = self.backend.xp
        taps = self.pool_row * self.pool_col
        grad_windows = xp.broadcast_to(delta / taps, (self.in_depth, taps, batch * self._geom.positions))
        return _scatter_windows(self.backend, grad_windows, batch, self._geom), {}

    def backwardpass(self, lr: float, activation_prev: Any, delta: Any) -> Any:
        """Return dE/dX (`lr` is unused: no parameters)."""
        return self.backward(activation_prev, delta)[0]


class FlattenLayer(Parameterized):
    """Reshape (n, ...) to (n, features) for a :class:`DenseLayer`; the backward pass reshapes back.

    Works in the library of its input (no backend of its own): a reshape needs none.
    """

    TRANSIENT = ("_shape",)

    def __init__(self) -> None:
        self._shape: tuple[int, ...] | None = None

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments (none), JSON-ready (see :func:`conv2d.nn.save`)."""
        return {"type": "FlattenLayer"}

    def forwardpass(self, X: Any) -> Any:
        """Return X as (n, prod(X.shape[1:]))."""
        xp = array_namespace(X)
        self._shape = tuple(X.shape)
        return xp.reshape(X, (X.shape[0], math.prod(X.shape[1:])))

    def backward(self, activation_prev: Any, delta: Any) -> tuple[Any, dict[str, Any]]:
        """Return (`delta` in the shape of the last forwardpass's input, {})."""
        shape = forward_state(self._shape)
        check_batch(activation_prev, shape[0])
        expected = (shape[0], math.prod(shape[1:]))
        if tuple(delta.shape) != expected:
            raise ValueError(f"delta must have the forward output's shape {expected}, got {tuple(delta.shape)}")
        return array_namespace(delta).reshape(delta, self._shape), {}

    def backwardpass(self, lr: float, activation_prev: Any, delta: Any) -> Any:
        """Return `delta` in the shape of the last forwardpass's input (`lr` is unused)."""
        return self.backward(activation_prev, delta)[0]


class DenseLayer(Parameterized):
    """A fully connected layer, ``activation(X @ weights.T + biases)``, trained by plain SGD.

    Parameters
    ----------
    in_features, out_features : int
    activation : {"sigmoid", "relu", "tanh", None}, default None
        As for :class:`conv2d.ConvolutionLayer`; None gives logits for :func:`softmax_cross_entropy`.
    dtype : str, default "float64"
    seed : int, optional
        Seed of the NumPy Generator that draws the initial weights (out_features, in_features)
        and then the biases on the host, uniform in ±1/sqrt(in_features) as PyTorch's ``nn.Linear``,
        so that a seed gives the same weights on every backend.
    backend : str or Backend, optional
        Where the layer lives; default: the active backend.

    Notes
    -----
    As :class:`conv2d.ConvolutionLayer`: the layer keeps a copy of its input and the activation's
    derivative, so both the input and the returned output may be changed in place afterwards; a
    replaced ``weights`` (out_features, in_features) or ``biases`` (out_features,) of another
    shape, dtype, library or device is refused when next used, naming the attribute.

    Examples
    --------
    >>> import numpy as np, conv2d.nn
    >>> dense = conv2d.nn.DenseLayer(6, 3, seed=0)
    >>> X = np.random.default_rng(1).standard_normal((4, 6))
    >>> dense.forwardpass(X).shape
    (4, 3)
    >>> dense.backwardpass(0.1, X, np.ones((4, 3))).shape
    (4, 6)
    """

    PARAMETERS = ("weights", "biases")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        activation: str | None = None,
        dtype: str = "float64",
        seed: int | None = None,
        backend: str | Backend | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        if dtype not in ("float16", "float32", "float64"):
            raise TypeError(f"dtype must be 'float16', 'float32' or 'float64', got {dtype!r}")
        self.backend = get_backend(backend)
        self.activation = activation
        self.dtype = self.backend.dtype(dtype)
        bound = 1.0 / math.sqrt(self.in_features)
        rng = np.random.default_rng(seed)
        weights = rng.uniform(-bound, bound, (self.out_features, self.in_features))
        self.weights = self.backend.asarray(weights, dtype=self.dtype)
        self.biases = self.backend.asarray(rng.uniform(-bound, bound, self.out_features), dtype=self.dtype)
        # (a copy of the input, activation derivative or None for no activation) of the last forward
        self._saved: tuple[Any, Any | None] | None = None

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each parameter must have."""
        return {"weights": (self.out_features, self.in_features), "biases": (self.out_features,)}

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments that shape this layer, JSON-ready (see :func:`conv2d.nn.save`)."""
        return {
            "type": "DenseLayer",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "activation": self.activation,
            "dtype": dtype_name(self.backend, self.dtype),
        }

    def forwardpass(self, X: Any) -> Any:
        """Return activation(X @ weights.T + biases), shape (n, out_features); keep X for the backward pass."""
        X = to_floating(self.backend, "X", X, self.dtype)
        if X.ndim != 2 or X.shape[1] != self.in_features:
            raise ValueError(f"X must have shape (n, {self.in_features}), got {tuple(X.shape)}")
        self._check_current_parameters()
        xp = self.backend.xp
        activation, derivative = ACTIVATIONS[self.activation]
        out = activation(xp, xp.matmul(X, xp.matrix_transpose(self.weights)) + self.biases)
        # The layer owns what it keeps, as ConvolutionLayer: the caller may change X or the output.
        self._saved = (xp.asarray(X, copy=True), None if self.activation is None else derivative(xp, out))
        return out

    def backward(self, activation_prev: Any, delta: Any) -> tuple[Any, dict[str, Any]]:
        """Return dE/dX and ``{"weights": ..., "biases": ...}``, the gradients; change nothing.

        Parameters
        ----------
        activation_prev : array
            The input of the last :meth:`forwardpass` (only its batch size is used: the layer kept it).
        delta : array, shape (n, out_features)
            dE/d(output of the last forwardpass).
        """
        X, slope = forward_state(self._saved)
        check_batch(activation_prev, X.shape[0])
        delta = to_floating(self.backend, "delta", delta, self.dtype)
        expected = (X.shape[0], self.out_features)
        if tuple(delta.shape) != expected:
            raise ValueError(f"delta must have the forward output's shape {expected}, got {tuple(delta.shape)}")
        self._check_current_parameters()
        xp = self.backend.xp
        grad_pre = delta if slope is None else delta * slope
        grad_x = xp.matmul(grad_pre, self.weights)
        grad_w = xp.matmul(xp.matrix_transpose(grad_pre), X)
        grad_b = xp.sum(grad_pre, axis=0)
        return grad_x, {"weights": grad_w, "biases": grad_b}

    def backwardpass(self, lr: float, activation_prev: Any, delta: Any) -> Any:
        """Update weights and biases by SGD and return dE/dX (with the weights before the update).

        Parameters
        ----------
        lr : float
            A real, finite, non-negative number, as for :class:`conv2d.ConvolutionLayer`.
        activation_prev : array or nested list
            The input of the last :meth:`forwardpass` (only its batch size is used: the layer kept it).
        delta : array, shape (n, out_features)
            dE/d(output of the last forwardpass).
        """
        check_lr(lr)  # before any work: a bad rate must not leave half an update behind
        grad_x, grads = self.backward(activation_prev, delta)
        sgd_update(self, lr, grads)
        return grad_x


def _class_indices(backend: Backend, labels: Any, n: int, classes: int) -> Any:
    """`labels` checked and as int32 class indices on the logits' backend, whatever integer dtype they had.

    Concrete values are checked on the host, in NumPy, where every integer width compares: torch has
    no comparisons of uint16..uint64, and JAX without 64-bit types refuses int64 (NumPy's default,
    ``rng.integers``' too). In range, they fit int32 on every backend.
    """
    xp = backend.xp
    index = "int32" if classes <= 2**31 else "int64"
    if backend.owns(labels) and backend.traced(labels):  # inside jax.jit: no values to check
        _check_labels(labels.dtype, xp.isdtype(labels.dtype, "integral"), tuple(labels.shape), n)
        return xp.astype(labels, backend.dtype(index))
    if backend.owns(labels):
        host = backend.to_numpy(labels)
    elif is_array_api_obj(labels):
        host = backend_of(labels, "labels").to_numpy(labels)
    else:
        host = np.asarray(labels)
    _check_labels(host.dtype, np.issubdtype(host.dtype, np.integer), host.shape, n)
    # An out-of-range label would match no class and silently add nothing to the loss.
    if n and not (int(host.min()) >= 0 and int(host.max()) < classes):
        raise ValueError(f"labels must be class indices in [0, {classes}) for logits with {classes} columns, "
                         f"got values from {int(host.min())} to {int(host.max())}")
    if backend.owns(labels):
        return xp.astype(labels, backend.dtype(index))  # on the device already: no copy back
    return backend.asarray(host.astype(index))


def _check_labels(dtype: Any, integral: bool, shape: tuple[int, ...], n: int) -> None:
    if not integral:
        raise TypeError(f"labels has dtype {dtype}; it needs class indices: an integer dtype (int8..int64 or "
                        "uint8..uint64), e.g. labels.astype(int) or argmax of one-hot rows")
    if shape != (n,):
        raise ValueError(f"labels must have shape ({n},), one class index per row of logits, got {shape}")


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Mean softmax cross-entropy of a batch and its gradient with respect to the logits.

    Parameters
    ----------
    logits : array, shape (n, classes)
        Real floating scores of any supported library.
    labels : array or sequence of int, shape (n,)
        Class indices in [0, classes), of any integer dtype (int8..int64, uint8..uint64, such as
        NumPy's ``rng.integers``); moved to the logits' library and device if needed. Checked unless
        traced (inside ``jax.jit`` their values are unknown: check them before).

    Returns
    -------
    loss : array, shape ()
        ``mean(-log softmax(logits)[i, labels[i]])``, PyTorch's ``cross_entropy``; a 0-d array on
        the logits' device (``float(loss)`` to read it).
    grad : array, shape (n, classes)
        d loss / d logits = (softmax(logits) - onehot(labels)) / n: the delta to pass backwards.

    Examples
    --------
    >>> import numpy as np, conv2d.nn
    >>> loss, grad = conv2d.nn.softmax_cross_entropy(np.zeros((2, 4)), np.array([1, 3]))
    >>> round(float(loss), 6), grad.shape
    (1.386294, (2, 4))
    """
    backend = backend_of(logits, "logits")
    xp = backend.xp
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"logits has dtype {logits.dtype}; it needs a real floating dtype")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (n, classes), got shape {tuple(logits.shape)}")
    n, classes = logits.shape
    labels = _class_indices(backend, labels, n, classes)
    # Subtracting each row's maximum keeps exp from overflowing and changes nothing else. A logit
    # more than the largest float below the maximum has probability 0 either way: raising it to
    # that bound first keeps the subtraction itself from overflowing (float32 [3e38, -3e38]).
    top = xp.max(logits, axis=1, keepdims=True)
    floor = xp.maximum(top, xp.zeros_like(top)) - xp.finfo(logits.dtype).max
    exp = xp.exp(xp.maximum(logits, floor) - top)
    total = xp.sum(exp, axis=1, keepdims=True)
    classes_row = xp.reshape(xp.arange(classes, dtype=labels.dtype, device=device_of(labels)), (1, classes))
    is_label = xp.reshape(labels, (n, 1)) == classes_row
    # -log softmax at the label, from the label's own logit picked by `where`: multiplying a
    # one-hot with log-probabilities made 0 * -inf = NaN for any class of probability 0.
    label_logit = xp.sum(xp.where(is_label, logits, xp.zeros_like(logits)), axis=1, keepdims=True)
    loss = xp.sum((top - label_logit) + xp.log(total)) / n
    grad = (exp / total - xp.astype(is_label, logits.dtype)) / n
    return loss, grad


class Sequential:
    """Layers run one after the other; itself a layer with the same protocol.

    ``forwardpass`` keeps each layer's input, and ``backwardpass`` hands each layer its own input
    as ``activation_prev``, in reverse order. Parameters, gradients and state dicts are those of
    the layers, keyed ``"<index>.<name>"`` (``"0.weights"``, ``"5.biases"``).

    Examples
    --------
    >>> import numpy as np, conv2d, conv2d.nn as nn
    >>> net = nn.Sequential([
    ...     conv2d.ConvolutionLayer((1, 8, 8), (3, 3), 4, padding=1, activation="relu", seed=0),
    ...     nn.MaxPoolLayer((4, 8, 8), 2), nn.FlattenLayer(), nn.DenseLayer(64, 10, seed=1)])
    >>> X, y = np.random.default_rng(2).random((5, 1, 8, 8)), np.array([0, 1, 2, 3, 4])
    >>> loss, grad = nn.softmax_cross_entropy(net.forwardpass(X), y)
    >>> net.backwardpass(0.1, X, grad).shape
    (5, 1, 8, 8)
    >>> list(net.parameters())
    ['0.weights', '0.biases', '3.weights', '3.biases']
    """

    def __init__(self, layers: Iterable[Any]) -> None:
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")
        self._inputs: list[Any] | None = None

    def architecture(self) -> dict[str, Any]:
        """Every layer's architecture, in order, JSON-ready (see :func:`conv2d.nn.save`)."""
        return {"type": "Sequential", "layers": [layer.architecture() for layer in self.layers]}

    def forwardpass(self, X: Any) -> Any:
        """Run `X` through every layer in order and return the last layer's output."""
        inputs = []
        for layer in self.layers:
            inputs.append(X)
            X = layer.forwardpass(X)
        self._inputs = inputs
        return X

    def backward(self, activation_prev: Any, delta: Any) -> tuple[Any, dict[str, Any]]:
        """Run `delta` (dE/d(output)) back through the layers; return dE/dX and every layer's gradients.

        Nothing is updated; the gradients are keyed like :meth:`parameters`.
        """
        inputs = forward_state(self._inputs)
        check_batch(activation_prev, batch_size(inputs[0]))
        grads: dict[str, Any] = {}
        for index in reversed(range(len(self.layers))):
            delta, layer_grads = self.layers[index].backward(inputs[index], delta)
            grads.update((f"{index}.{name}", grad) for name, grad in layer_grads.items())
        # Layer order, as parameters() lists them.
        return delta, {key: grads[key] for key in self.parameters() if key in grads}

    def backwardpass(self, lr: float, activation_prev: Any, delta: Any) -> Any:
        """Run `delta` (dE/d(output)) back through the layers, updating each; return dE/dX."""
        check_lr(lr)  # before any layer is updated
        inputs = forward_state(self._inputs)
        check_batch(activation_prev, batch_size(inputs[0]))
        for layer, layer_input in zip(reversed(self.layers), reversed(inputs), strict=True):
            delta = layer.backwardpass(lr, layer_input, delta)
        return delta

    def parameters(self) -> dict[str, Any]:
        """Every layer's parameters, keyed ``"<layer index>.<name>"``, in layer order."""
        return {f"{index}.{name}": value for index, layer in enumerate(self.layers)
                for name, value in layer.parameters().items()}

    def _split(self, what: str, mapping: Mapping[str, Any]) -> list[dict[str, Any]]:
        """`mapping` ("<index>.<name>" keys) split into one dict per layer; KeyError for a key of no layer."""
        unknown_keys(what, mapping, self.parameters())
        per_layer: list[dict[str, Any]] = [{} for _ in self.layers]
        for key, value in mapping.items():
            index, name = key.split(".", 1)
            per_layer[int(index)][name] = value
        return per_layer

    def set_parameters(self, mapping: Mapping[str, Any]) -> None:
        """Replace the parameters named in `mapping` (keys as in :meth:`parameters`).

        Checked as each layer checks them, all before any is replaced; errors name the key.
        """
        self._check_parameters(mapping, "")
        for layer, part in zip(self.layers, self._split("set_parameters()", mapping), strict=True):
            layer.set_parameters(part)

    def _check_parameters(self, mapping: Mapping[str, Any], prefix: str) -> None:
        unknown_keys("set_parameters()", [prefix + key for key in mapping], [prefix + key for key in self.parameters()])
        for index, (layer, part) in enumerate(zip(self.layers, self._split("set_parameters()", mapping), strict=True)):
            layer._check_parameters(part, f"{prefix}{index}.")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host (NumPy) copies of :meth:`parameters`."""
        return {f"{index}.{name}": value for index, layer in enumerate(self.layers)
                for name, value in layer.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set every layer's parameters from `state` (keys as in :meth:`state_dict`); errors name the key."""
        self._load_state_dict(state, "")

    def _load_state_dict(self, state: Mapping[str, Any], prefix: str) -> None:
        missing = sorted(set(self.parameters()) - set(state))
        if missing:
            needed = [prefix + key for key in self.parameters()]
            raise KeyError(f"state has no {[prefix + key for key in missing]}; it needs {needed}")
        unknown_keys("state", [prefix + key for key in state], [prefix + key for key in self.parameters()])
        for index, (layer, part) in enumerate(zip(self.layers, self._split("state", state), strict=True)):
            layer._load_state_dict(part, f"{prefix}{index}.")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_inputs": None}  # the inputs of the last batch are not part of the network


"""A transposed convolution layer with :class:`conv2d.ConvolutionLayer`'s protocol (an upsampling layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._geometry import IntPair, int_pair, positive_int, positive_ints
from .._transposed import conv_transpose2d, conv_transpose2d_backward, transposed_geometry
from ..backends import Backend
from ._convolution import (
    ACTIVATIONS,
    call_settings,
    check_batch,
    check_lr,
    forward_state,
    initial_parameters,
    sgd_update,
    to_floating,
)
from ._parameters import Parameterized, dtype_name


class TransposedConvolutionLayer(Parameterized):
    """A 2-D transposed convolution layer followed by an activation, trained by plain SGD.

    :func:`conv2d.conv_transpose2d` as a layer, with :class:`conv2d.ConvolutionLayer`'s protocol
    (``forwardpass``, ``backwardpass``, ``backward``, ``parameters``, ``state_dict``), usable in
    :class:`conv2d.nn.Sequential` and saved by :func:`conv2d.nn.save`. With ``stride=2`` it doubles
    the rows and columns (``kernel_size=2`` or ``kernel_size=3, padding=1, output_padding=1``).

    Parameters
    ----------
    input_shape : (int, int, int)
        (depth, rows, cols) of one input sample.
    kernel_size : int or (int, int)
        (rows, cols) of each filter.
    out_channels : int
        Output depth.
    stride, padding, output_padding, dilation : int or (int, int)
        As in :func:`conv2d.conv_transpose2d`; defaults 1, 0, 0, 1.
    activation : {"sigmoid", "relu", "tanh", None}, default "sigmoid"
    dtype : str, default "float64"
        Floating dtype of the weights and of the computation; inputs are cast to it.
    seed : int, optional
        Seed of the NumPy Generator that draws the initial weights and then biases (normal, mean 0,
        standard deviation 0.1) on the host, so that a seed gives the same weights on every backend.
    backend : str or Backend, optional
        Where the layer lives; default: the active backend.
    algorithm, max_workspace_bytes, deterministic
        As in :func:`conv2d.conv_transpose2d`.

    Notes
    -----
    ``weights`` has PyTorch's layout (depth, out_channels, rows, cols) and ``biases`` is
    (out_channels,). As :class:`conv2d.ConvolutionLayer`, the layer keeps a copy of its input and the
    activation's derivative, so the input and the output may be changed in place afterwards.

    Examples
    --------
    >>> import numpy as np, conv2d
    >>> layer = conv2d.TransposedConvolutionLayer((4, 5, 5), 2, 3, stride=2, seed=0)
    >>> X = np.random.default_rng(1).standard_normal((2, 4, 5, 5))
    >>> out = layer.forwardpass(X)
    >>> out.shape
    (2, 3, 10, 10)
    >>> layer.backwardpass(0.1, X, out - 0.5).shape
    (2, 4, 5, 5)
    """

    PARAMETERS = ("weights", "biases")

    def __init__(
        self,
        input_shape: Sequence[int],
        kernel_size: IntPair,
        out_channels: int,
        stride: IntPair = 1,
        padding: IntPair = 0,
        output_padding: IntPair = 0,
        *,
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
        self.in_depth, self.in_row, self.in_col = positive_ints("input_shape", input_shape, "(depth, rows, cols)")
        self.filter_row, self.filter_col = int_pair("kernel_size", kernel_size, minimum=1)
        self.out_depth = positive_int("out_channels", out_channels)
        self.algorithm, self.max_workspace_bytes, self.backend, self.deterministic = call_settings(
            dtype, algorithm, max_workspace_bytes, backend, deterministic)
        self.stride = int_pair("stride", stride, minimum=1)
        self.padding = int_pair("padding", padding, minimum=0)
        self.output_padding = int_pair("output_padding", output_padding, minimum=0)
        self.dilation = int_pair("dilation", dilation, minimum=1)
        weight_shape = (self.in_depth, self.out_depth, self.filter_row, self.filter_col)
        # The convolution this layer transposes: its input is the layer's output (all arguments checked here).
        geom = transposed_geometry((1, self.in_depth, self.in_row, self.in_col), weight_shape, None,
                                   **self._options(), groups=1)
        self.out_row, self.out_col = geom.height, geom.width
        self.activation = activation
        self.dtype, self.weights, self.biases = initial_parameters(self.backend, dtype, seed, weight_shape, self.out_depth)
        # (a copy of the input, activation derivative or None for no activation) of the last forwardpass
        self._saved: tuple[Any, Any | None] | None = None

    def _options(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                    dilation=self.dilation)

    def _call_options(self) -> dict[str, Any]:
        return dict(self._options(), algorithm=self.algorithm, max_workspace_bytes=self.max_workspace_bytes,
                    deterministic=self.deterministic)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each parameter must have."""
        return {"weights": (self.in_depth, self.out_depth, self.filter_row, self.filter_col), "biases": (self.out_depth,)}

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments that shape this layer, as JSON-ready values (see :func:`conv2d.nn.save`)."""
        return {
            "type": "TransposedConvolutionLayer",
            "input_shape": [self.in_depth, self.in_row, self.in_col],
            "kernel_size": [self.filter_row, self.filter_col],
            "out_channels": self.out_depth,
            **{key: list(value) for key, value in self._options().items()},
            "activation": self.activation,
            "dtype": dtype_name(self.backend, self.dtype),
        }

    def forwardpass(self, X: Any) -> Any:
        """Return activation(conv_transpose2d(X) + biases), shape (n, out_depth, out_row, out_col)."""
        X = to_floating(self.backend, "X", X, self.dtype)
        expected = (self.in_depth, self.in_row, self.in_col)
        if X.ndim != 4 or tuple(X.shape[1:]) != expected:
            raise ValueError(f"X must have shape (n, {', '.join(map(str, expected))}), got {tuple(X.shape)}")
        self._check_current_parameters()
        xp = self.backend.xp
        activation, derivative = ACTIVATIONS[self.activation]
        out = activation(xp, conv_transpose2d(X, self.weights, self.biases, **self._call_options()))
        # The layer owns what it keeps, as ConvolutionLayer: the caller may change X or the output.
        self._saved = (xp.asarray(X, copy=True), None if self.activation is None else derivative(xp, out))
        return out

    def backward(self, activation_prev: Any, delta: Any) -> tuple[Any, dict[str, Any]]:
        """Return dE/dX and ``{"weights": ..., "biases": ...}``, the gradients; change nothing.

        Parameters
        ----------
        activation_prev : array
            The input given to the last :meth:`forwardpass` (only its batch size is used).
        delta : array, shape (n, out_depth, out_row, out_col)
            dE/d(output of the last forwardpass).
        """
        X, slope = forward_state(self._saved)
        check_batch(activation_prev, X.shape[0])
        delta = to_floating(self.backend, "delta", delta, self.dtype)
        expected = (X.shape[0], self.out_depth, self.out_row, self.out_col)
        if tuple(delta.shape) != expected:
            raise ValueError(f"delta must have the forward output's shape {expected}, got {tuple(delta.shape)}")
        self._check_current_parameters()
        grad_pre = delta if slope is None else delta * slope
        grad_x, grad_w, grad_b = conv_transpose2d_backward(grad_pre, X, self.weights, **self._call_options())
        return grad_x, {"weights": grad_w, "biases": grad_b}

    def backwardpass(self, lr: float, activation_prev: Any, delta: Any) -> Any:
        """Update weights and biases by SGD and return dE/dX (computed with the weights before the update)."""
        check_lr(lr)  # before any work: a bad rate must not leave half an update behind
        grad_x, grads = self.backward(activation_prev, delta)
        sgd_update(self, lr, grads)
        return grad_x

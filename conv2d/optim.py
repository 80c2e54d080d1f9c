"""Optimizers for conv2d's layers: SGD (with momentum and weight decay) and Adam, on every backend.

Each takes the gradients a layer's ``backward`` returned and replaces the layer's parameters
through ``set_parameters``; they follow ``torch.optim.SGD`` and ``torch.optim.Adam`` step for
step. They are written on the array API namespace of the parameters, so they run wherever the
layer does. The gradients are yours until ``step``: sum them over batches or machines, clip or
scale them first.

Examples
--------
>>> import numpy as np, conv2d, conv2d.nn as nn, conv2d.optim
>>> net = nn.Sequential([conv2d.ConvolutionLayer((1, 6, 6), (3, 3), 2, seed=0), nn.FlattenLayer(),
...                      nn.DenseLayer(32, 3, seed=1)])
>>> optimizer = conv2d.optim.Adam(lr=1e-2)
>>> X, y = np.random.default_rng(0).random((4, 1, 6, 6)), np.array([0, 1, 2, 0])
>>> loss, delta = nn.softmax_cross_entropy(net.forwardpass(X), y)
>>> _, grads = net.backward(X, delta)
>>> optimizer.step(net, grads)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj

__all__ = ["SGD", "Adam"]


def _non_negative(name: str, value: Any) -> float:
    """`value` as a Python float, which keeps the parameters' dtype on every library.

    Any real scalar will do: a Python or NumPy number, or a 0-d array of a real dtype (a torch
    scalar tensor, ``np.array(0.1)``). A bool is refused: ``lr=True`` is a slip, not a rate of 1.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number such as 0.1, got the bool {value!r}")
    if not isinstance(value, numbers.Real):
        if not (is_array_api_obj(value) and tuple(value.shape) == ()):
            raise TypeError(f"{name} must be a real number such as 0.1, got {type(value).__name__} {value!r:.60}")
        if not array_namespace(value).isdtype(value.dtype, ("real floating", "integral")):
            raise TypeError(f"{name} must be a real number such as 0.1, got a 0-d array of dtype {value.dtype}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {number!r}")
    return number


def _checked_grads(layer: Any, grads: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """name -> (parameter, gradient) for the names in `grads`, each gradient checked against its parameter."""
    params = layer.parameters()
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise KeyError(f"grads has key(s) {unknown} that are no parameters of the layer; it has {sorted(params)}")
    pairs = {}
    for name, grad in grads.items():
        param = params[name]
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(f"grads[{name!r}] has shape {tuple(grad.shape)}, the parameter {tuple(param.shape)}")
        try:
            same_library = array_namespace(param, grad) is not None
        except TypeError:
            same_library = False
        if not same_library or grad.dtype != param.dtype:
            raise TypeError(
                f"grads[{name!r}] is a {type(grad).__module__}.{type(grad).__qualname__} of dtype {grad.dtype}; "
                f"the parameter is a {type(param).__module__}.{type(param).__qualname__} of dtype {param.dtype}"
            )
        pairs[name] = (param, grad)
    return pairs


class _Optimizer:
    """State per parameter name: one optimizer object serves one network (or layer)."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        self.lr = _non_negative("lr", lr)
        self.weight_decay = _non_negative("weight_decay", weight_decay)
        self.state: dict[str, dict[str, Any]] = {}

    def step(self, layer: Any, grads: Mapping[str, Any]) -> None:
        """Update `layer`'s parameters named in `grads` (as ``layer.backward`` returns them).

        Parameters
        ----------
        layer : ConvolutionLayer, conv2d.nn layer or Sequential
        grads : dict
            name -> gradient, of the layer's library, shape and dtype; a subset of
            ``layer.parameters()`` is fine (the others are left alone).

        Raises
        ------
        KeyError, ValueError, TypeError
            A name that is no parameter, or a gradient of another shape, dtype or library.
        """
        new = {}
        for name, (param, grad) in _checked_grads(layer, grads).items():
            xp = array_namespace(param)
            if self.weight_decay:
                grad = grad + self.weight_decay * param  # L2 penalty, as torch.optim adds it
            new[name] = self._update(xp, name, param, grad)
        layer.set_parameters(new)

    def _update(self, xp: Any, name: str, param: Any, grad: Any) -> Any:
        raise NotImplementedError


class SGD(_Optimizer):
    """Stochastic gradient descent with optional momentum and weight decay (``torch.optim.SGD``).

    Parameters
    ----------
    lr : float
        Learning rate. This and the other numbers may be any real scalar (Python, NumPy, or a 0-d
        array of a real dtype), finite and >= 0; a bool or a non-real value is a TypeError.
    momentum : float, default 0.0
        Momentum factor; the first step's buffer is a copy of the gradient, as in PyTorch.
    weight_decay : float, default 0.0
        L2 penalty added to each gradient (``grad + weight_decay * param``).

    Notes
    -----
    Without momentum and weight decay one step is the layers' own ``backwardpass`` update,
    ``param - lr * grad``.
    """

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        self.momentum = _non_negative("momentum", momentum)

    def _update(self, xp: Any, name: str, param: Any, grad: Any) -> Any:
        if self.momentum:
            buffer = self.state.get(name, {}).get("momentum_buffer")
            # The first buffer is a copy of the gradient, as torch.optim.SGD clones it: the caller's
            # array stays the caller's (zeroed in place to accumulate the next batch, say).
            buffer = xp.asarray(grad, copy=True) if buffer is None else self.momentum * buffer + grad
            self.state[name] = {"momentum_buffer": buffer}
            grad = buffer
        return param - self.lr * grad


class Adam(_Optimizer):
    """Adam (Kingma and Ba), as ``torch.optim.Adam`` computes it.

    Parameters
    ----------
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the running means of the gradient and of its square, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator.
    weight_decay : float, default 0.0
        L2 penalty added to each gradient (``torch.optim.Adam``'s, not AdamW's decoupled one).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay)
        if len(betas) != 2 or not all(0.0 <= _non_negative("betas", beta) < 1.0 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _non_negative("eps", eps)

    def _update(self, xp: Any, name: str, param: Any, grad: Any) -> Any:
        beta1, beta2 = self.betas
        state = self.state.get(name)
        if state is None:
            state = {"step": 0, "exp_avg": xp.zeros_like(param), "exp_avg_sq": xp.zeros_like(param)}
        step = state["step"] + 1
        exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * grad
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * (grad * grad)
        self.state[name] = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        # Bias corrections in Python floats (double precision), as PyTorch computes them.
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = xp.sqrt(exp_avg_sq) / bias_correction2_sqrt + self.eps
        return param - (self.lr / bias_correction1) * (exp_avg / denom)

"""Complex dtypes: the one place that knows about PyTorch's conjugate convention.

The arithmetic (``_conv.forward`` and ``_conv.backward``, every algorithm) computes the raw
bilinear maps, the same formulas for real and complex numbers: ``_conv.backward(g, x, w)`` applies
the transposes (not the adjoints) of the forward's linear maps to `g`. For complex data PyTorch's
autograd returns the conjugate Wirtinger gradient instead: for ``y = conv(x, w)``,
``grad_x = raw_grad_x(g, conj(w))`` and ``grad_w = raw_grad_w(g, conj(x))``, while
``grad_b = sum(g)``. The public functions pass conjugated operands into the raw maps
(:func:`conj`), which is the identity on real dtypes, so real data costs nothing.
"""

from __future__ import annotations

from typing import Any


def is_complex(xp: Any, dtype: Any) -> bool:
    """Whether `dtype` is a complex floating dtype of the namespace `xp`."""
    return bool(xp.isdtype(dtype, "complex floating"))


def conj(xp: Any, a: Any) -> Any:
    """The complex conjugate of `a`; `a` itself (no copy) for a real dtype."""
    return xp.conj(a) if is_complex(xp, a.dtype) else a


def mixed_dtypes(xp: Any, first: str, dtype: Any, name: str, other: Any) -> str:
    """The message for arrays `first` (of `dtype`) and `name` (of `other`) of different dtypes.

    Refused, not promoted, as ``torch.nn.functional.conv2d`` refuses mixed dtypes: a real array
    beside a complex one is most often a bug (a complex bias on real data, real filters on complex
    data), and promoting would silently change the result's dtype.
    """
    message = f"{first} has dtype {dtype} but {name} has {other}; conv2d does not promote silently: "
    if is_complex(xp, dtype) != is_complex(xp, other):
        kind = "complex" if is_complex(xp, other) else "real"
        return message + (f"{name} is {kind} and {first} is not; cast {name} to {first}'s dtype, e.g. "
                          f"{name}.astype({first}.dtype), or {first} to {name}'s")
    return message + "cast them to one dtype"

"""NumPy's compiled kernels on 1x1 layers with stride 1 and no padding (``conv2d/backends/_numba/pointwise.py``).

Random such layers (batch 0-5, groups 1-3, non-contiguous inputs too) in float32, float64 and complex64,
forward and both gradients through the public functions with ``algorithm="kernels"``, against PyTorch
(with its conjugate convention on complex data); each gradient alone through ``conv2d._conv.backward``
(``needs``); and the routing: these layers, and only these, run the per-sample products.
"""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._geometry import make_geometry

from .conftest import require_or_skip

require_or_skip("numba")
require_or_skip("threadpoolctl")
torch = require_or_skip("torch")

from conv2d.backends._numba import _algorithm, pointwise  # noqa: E402  (after the skips)

TOLERANCE = {"float32": 1e-5, "complex64": 1e-5, "float64": 1e-12}


def _layer(seed: int, dtype: str, transposed_input: bool):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 4))
    n, c, o = int(rng.integers(0, 6)), groups * int(rng.integers(1, 6)), groups * int(rng.integers(1, 6))
    h, w = (int(v) for v in rng.integers(1, 9, size=2))

    def draw(*shape):
        a = rng.standard_normal(shape)
        return (a + 1j * rng.standard_normal(shape) if dtype.startswith("complex") else a).astype(dtype)

    x = draw(n, c, w, h).transpose(0, 1, 3, 2) if transposed_input else draw(n, c, h, w)  # a strided view
    return x, draw(o, c // groups, 1, 1), draw(o), draw(n, o, h, w), groups


def _reference(x, w, b, g, groups):
    """PyTorch's conv2d and autograd in 128 bits (complex: its conjugate convention, as the public functions')."""
    wide = torch.complex128 if np.iscomplexobj(x) else torch.float64
    xt, wt, bt = (torch.tensor(np.ascontiguousarray(a), dtype=wide, requires_grad=True) for a in (x, w, b))
    y = torch.nn.functional.conv2d(xt, wt, bt, groups=groups)
    y.backward(torch.tensor(g, dtype=wide))
    return [t.detach().numpy() for t in (y, xt.grad, wt.grad, bt.grad)]


@pytest.mark.parametrize("transposed_input", [False, True], ids=["contiguous", "view"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64"])
@pytest.mark.parametrize("seed", range(8))
def test_pointwise_kernels_match_pytorch(seed, dtype, transposed_input):
    x, w, b, g, groups = _layer(seed, dtype, transposed_input)
    copies = [a.copy() for a in (x, w, b, g)]
    ours = (conv2d.conv2d(x, w, b, groups=groups, algorithm="kernels"),
            *conv2d.conv2d_backward(g, x, w, groups=groups, algorithm="kernels"))
    reference = _reference(x, w, b, g, groups)
    for name, a, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, reference, strict=True):
        assert a.dtype == x.dtype and a.shape == r.shape, name
        scale = 1 + float(np.max(np.abs(r), initial=0))
        assert float(np.max(np.abs(a - r), initial=0)) <= TOLERANCE[dtype] * scale, name
    for before, after in zip(copies, (x, w, b, g)):
        np.testing.assert_array_equal(before, after)  # inputs untouched


@pytest.mark.parametrize("needs", [("x",), ("weight",)])
def test_each_gradient_alone(needs):
    x, w, _, g, groups = _layer(3, "float64", False)
    geom = make_geometry(x.shape, w.shape, None, groups=groups)
    backend = conv2d.get_backend("numpy")
    both = _conv.backward(backend, g, x, w, geom, "kernels", 2**30)
    alone = _conv.backward(backend, g, x, w, geom, "kernels", 2**30, needs=needs)
    for name, full, part in zip(("x", "weight"), both[:2], alone[:2]):
        if name in needs:
            np.testing.assert_array_equal(full, part)
        else:
            assert part is None


def test_only_unpadded_stride_one_1x1_layers_take_the_products():
    def geom(kernel, **kwargs):
        return make_geometry((2, 4, 6, 6), (4, 4, *kernel), None, **kwargs)

    assert _algorithm.kernel_set(geom((1, 1))) is pointwise
    assert _algorithm.kernel_set(geom((1, 1), dilation=2)) is pointwise  # dilation means nothing to a 1x1 kernel
    for other in (geom((1, 1), stride=2), geom((1, 1), padding=1), geom((3, 3)), geom((1, 3))):
        assert _algorithm.kernel_set(other) is not pointwise

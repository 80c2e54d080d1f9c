"""NumPy's compiled kernels on dilated 3x3 stride-1 layers (``conv2d/backends/_numba/dilated.py``): Winograd
tiles on each of the dilation's phases.

Random such layers (batch 0-3, dilations 1-3 per axis, paddings 0-4, sizes down to empty input phases,
groups) against PyTorch's convolution and autograd in float64, forward and both gradients through the
public functions; each gradient alone (``needs``); and the routing.
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

from conv2d.backends._numba import _algorithm, dilated, winograd  # noqa: E402  (after the skips)


@pytest.fixture(autouse=True)
def every_phase_runs_winograd(monkeypatch):
    """The small phases drawn here run the Winograd kernels, not their small-call im2col."""
    monkeypatch.setattr(winograd, "_FEWEST_TILES", 0)


def _draw(seed: int):
    """A random dilated 3x3 stride-1 layer that the dilated kernel set computes, and its data."""
    rng = np.random.default_rng(seed)
    while True:
        groups = int(rng.choice([1, 2]))
        per_group = int(rng.integers(2, 6)) if groups == 1 else int(rng.integers(5, 8))  # not direct's layers
        c, o = groups * per_group, groups * int(rng.integers(1, 6))
        dilation = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        padding = (int(rng.integers(0, 5)), int(rng.integers(0, 5)))
        h, w = (int(v) for v in rng.integers(1, 20, size=2))
        if dilation != (1, 1) and h + 2 * padding[0] > 2 * dilation[0] and w + 2 * padding[1] > 2 * dilation[1]:
            break
    n = int(rng.integers(0, 4))
    options = dict(padding=padding, dilation=dilation, groups=groups)
    x, w_, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((o, per_group, 3, 3)), rng.standard_normal(o)
    geom = make_geometry(x.shape, w_.shape, None, **options)
    return x, w_, b, rng.standard_normal((n, o, geom.out_h, geom.out_w)), options, geom


@pytest.mark.parametrize("seed", range(24))
def test_dilated_kernels_match_pytorch(seed):
    x, w, b, g, options, geom = _draw(seed)
    assert _algorithm.kernel_set(geom) is dilated
    copies = [a.copy() for a in (x, w, b, g)]
    ours = (conv2d.conv2d(x, w, b, algorithm="kernels", **options),
            *conv2d.conv2d_backward(g, x, w, algorithm="kernels", **options))
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    y = torch.nn.functional.conv2d(xt, wt, bt, **options)
    y.backward(torch.tensor(g))
    for name, a, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, (y, xt.grad, wt.grad, bt.grad), strict=True):
        r = r.detach().numpy()
        assert a.shape == r.shape, name
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10 * (1 + float(np.max(np.abs(r), initial=0))), err_msg=name)
    for before, after in zip(copies, (x, w, b, g)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("needs", [("x",), ("weight",)])
def test_each_gradient_alone(needs):
    x, w, _, g, _, geom = _draw(5)
    backend = conv2d.get_backend("numpy")
    both = _conv.backward(backend, g, x, w, geom, "kernels", 2**30)
    alone = _conv.backward(backend, g, x, w, geom, "kernels", 2**30, needs=needs)
    for name, full, part in zip(("x", "weight"), both[:2], alone[:2]):
        if name in needs:
            np.testing.assert_array_equal(full, part)
        else:
            assert part is None


def test_routing():
    def geom(**options):
        return make_geometry((2, 8, 12, 12), (8, 8, 3, 3), None, **options)

    assert _algorithm.kernel_set(geom(dilation=2)) is dilated
    assert _algorithm.kernel_set(geom(dilation=(1, 3), padding=1)) is dilated
    assert _algorithm.kernel_set(geom()) is winograd  # undilated
    assert _algorithm.kernel_set(geom(dilation=2, stride=2)) is not dilated  # strided
    one_per_group = make_geometry((2, 8, 12, 12), (8, 1, 3, 3), None, dilation=2, groups=8)
    assert _algorithm.kernel_set(one_per_group) is not dilated

"""Issue #21, the algorithms: empty batches and empty rows or columns on every algorithm and backend
(``native`` included), ``winograd`` in float16, and ``auto`` keeping PyTorch's inf/NaN pattern where
``winograd``'s transforms would change it.

Oracles: the NumPy backend's ``slices`` (for empty shapes, where PyTorch refuses some) and PyTorch's
conv2d and autograd.
"""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d._geometry import make_geometry

from .conftest import require_or_skip
from .oracle import assert_close, missing_algorithm, torch_conv

torch = require_or_skip("torch")

ALL_ALGORITHMS = ("auto", *(name for name in conv2d.ALGORITHMS if name != "kernels"))  # kernels: CuPy only

# (x shape, weight shape, keyword arguments): shapes with no values in x. An empty batch on a wide 3x3
# layer (auto's winograd on NumPy), depthwise (direct) and 1x1 (pointwise); no rows, no columns, or
# neither, where the padding makes room for the kernel (PyTorch refuses these), grouped and asymmetric too.
EMPTY = [
    ((0, 64, 8, 8), (64, 64, 3, 3), dict(padding=1)),
    ((0, 4, 5, 5), (4, 1, 3, 3), dict(padding=1, groups=4)),
    ((0, 4, 5, 5), (3, 4, 1, 1), dict(stride=2)),
    ((1, 2, 0, 5), (3, 2, 1, 1), dict(padding=1)),
    ((2, 2, 5, 0), (3, 2, 3, 3), dict(padding=2)),
    ((2, 4, 0, 4), (4, 2, 3, 3), dict(padding=(2, 1), groups=2)),
    ((1, 2, 0, 0), (3, 2, 3, 3), dict(padding=3, dilation=2)),
    ((0, 2, 4, 3), (2, 2, 2, 2), dict(padding="same")),
]


def _empty_id(case) -> str:
    x, w, kw = case
    return f"x{x}-w{w}" + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
@pytest.mark.parametrize("case", EMPTY, ids=_empty_id)
def test_empty_inputs_give_the_numpy_slices_result(cpu_backend, case, algorithm):
    """Every algorithm that applies, on every CPU backend, returns NumPy ``slices``' shapes and values:
    the output is the bias alone where x is empty but the output is not, grad_x is empty, and the
    weight gradient zero and bias gradient the sum of grad_out."""
    x_shape, w_shape, kw = case
    geom = make_geometry(x_shape, w_shape, (w_shape[0],), **kw)
    missing = missing_algorithm(algorithm, cpu_backend, geom)
    if missing:
        pytest.skip(missing)
    rng = np.random.default_rng(0)
    x, w, b = np.zeros(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    g = rng.standard_normal((x_shape[0], w_shape[0], geom.out_h, geom.out_w))
    expected = [conv2d.conv2d(x, w, b, algorithm="slices", **kw),
                *conv2d.conv2d_backward(g, x, w, algorithm="slices", **kw)]
    X, W, B, G = (cpu_backend.asarray(a) for a in (x, w, b, g))
    ours = [conv2d.conv2d(X, W, B, algorithm=algorithm, **kw), *conv2d.conv2d_backward(G, X, W, algorithm=algorithm, **kw)]
    for name, mine, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, expected):
        assert tuple(mine.shape) == ref.shape, name
        assert_close(cpu_backend, mine, ref, "float64", name)


def test_empty_batch_through_the_layer_and_a_dask_chunk():
    """The layer (auto: winograd on this wide layer) and a dask array with an empty batch chunk."""
    layer = conv2d.ConvolutionLayer((64, 8, 8), (3, 3), 64, padding=1, seed=0)
    assert layer.forwardpass(np.zeros((0, 64, 8, 8))).shape == (0, 64, 8, 8)
    da = require_or_skip("dask.array")
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 64, 6, 6)), rng.standard_normal((64, 64, 3, 3))
    y = conv2d.conv2d(da.from_array(x, chunks=((0, 2), 64, 6, 6)), w, padding=1).compute()
    assert_close(conv2d.get_backend("numpy"), y, torch_conv(x, w, np.zeros(64), padding=1)[0], "float64", "y")


# ---------------------------------------------------------------------------------------------
# winograd in float16
# ---------------------------------------------------------------------------------------------


def _torch_float32(x, w, g):
    """PyTorch's output and (grad_x, grad_weight) in float32, from float16 data."""
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float32, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, padding=1)
    yt.backward(torch.tensor(g, dtype=torch.float32))
    return yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


@pytest.mark.parametrize("algorithm", ["winograd", "auto"])
def test_float16_large_inputs_stay_finite_and_right(algorithm):
    """x of 20,000, weights about 1e-3 (float16's transforms overflowed from about 16,384 and gave NaN):
    the output equals PyTorch's (float32) and ``slices``' to float16 rounding. The gradients likewise,
    with x large (the weight gradient's transformed input) and with grad_out large (its transform)."""
    rng = np.random.default_rng(2)
    numpy = conv2d.get_backend("numpy")
    x = np.full((1, 64, 6, 6), 20000, np.float16)
    w = (rng.standard_normal((64, 64, 3, 3)) * 1e-3).astype(np.float16)
    small = (rng.standard_normal((1, 64, 6, 6)) * 1e-2).astype(np.float16)
    y = conv2d.conv2d(x, w, padding=1, algorithm=algorithm)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    assert_close(numpy, y, _torch_float32(x, w, small)[0], "float16", "y")
    assert_close(numpy, y, conv2d.conv2d(x, w, padding=1, algorithm="slices").astype(np.float32), "float16", "y vs slices")
    # +-20,000 in a checkerboard: the bias gradient (a float16 sum over 36 positions) stays in range.
    checkerboard = (20000 * (-1.0) ** np.add.outer(np.arange(6), np.arange(6)) * np.ones((1, 64, 1, 1))).astype(np.float16)
    for name, (xi, gi) in {"x large": (x, small), "grad_out large": (small, checkerboard)}.items():
        _, gx_ref, gw_ref = _torch_float32(xi, w, gi)
        gx, gw, _ = conv2d.conv2d_backward(gi, xi, w, padding=1, algorithm=algorithm)
        assert gx.dtype == gw.dtype == np.float16, name
        assert_close(numpy, gx, gx_ref, "float16", f"grad_x, {name}")
        assert_close(numpy, gw, gw_ref, "float16", f"grad_weight, {name}")


def test_auto_runs_winograd_in_float16(monkeypatch):
    """auto keeps winograd for float16 on a wide NumPy layer (measured 15x faster than slices' float16 products)."""
    from conv2d.algorithms import Slices

    monkeypatch.setattr(Slices, "patches", lambda *a: pytest.fail("auto built im2col patches"))
    x = np.ones((1, 64, 6, 6), np.float16)
    assert conv2d.conv2d(x, np.ones((64, 64, 3, 3), np.float16) * 1e-3, padding=1).dtype == np.float16


# ---------------------------------------------------------------------------------------------
# Non-finite values: auto's winograd gives way to slices
# ---------------------------------------------------------------------------------------------

# NumPy's matmul warns "invalid value encountered" for inf operands (test_edge_cases.py says when);
# these tests check every value of every result instead.
_NUMPY_INVALID_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
_WIDE = dict(n=1, c=64, o=64, h=6, w=6)


def _wide_data(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((_WIDE["n"], _WIDE["c"], _WIDE["h"], _WIDE["w"]))
    w, b = rng.standard_normal((_WIDE["o"], _WIDE["c"], 3, 3)), rng.standard_normal(_WIDE["o"])
    return x, w, b, rng.standard_normal((_WIDE["n"], _WIDE["o"], _WIDE["h"], _WIDE["w"]))


def _assert_same_nonfinite(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """The same positions finite, NaN and +-inf as `ref`."""
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref), err_msg=f"{what}: inf positions")
    inf = np.isinf(ref)
    np.testing.assert_array_equal(np.sign(ours[inf]), np.sign(ref[inf]), err_msg=f"{what}: signs of inf")
    assert inf.any() or np.isnan(ref).any(), f"{what}: the case should have non-finite values"


@_NUMPY_INVALID_WARNING
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan], ids=str)
def test_auto_keeps_pytorchs_nonfinite_pattern(where, value):
    """One inf or NaN in x, the weight or grad_out of a wide layer (auto's winograd): the output and
    gradients are finite, NaN and +-inf exactly where PyTorch's are, and equal elsewhere."""
    x, w, b, g = _wide_data(3)
    {"x": x, "weight": w, "grad_out": g}[where][0, 5, 2, 1] = value
    refs = torch_conv(x, w, b, g, padding=1)
    ours = [conv2d.conv2d(x, w, b, padding=1), *conv2d.conv2d_backward(g, x, w, padding=1)]
    numpy = conv2d.get_backend("numpy")
    for name, mine, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, refs):
        finite = np.isfinite(ref)
        if finite.all():
            assert_close(numpy, mine, ref, "float64", name)
            continue
        _assert_same_nonfinite(mine, ref, name)
        np.testing.assert_allclose(mine[finite], ref[finite], rtol=1e-9, atol=1e-9 * np.abs(ref[finite]).max(), err_msg=name)


@_NUMPY_INVALID_WARNING
def test_explicit_winograd_keeps_its_documented_behaviour():
    """Asked for by name, winograd is not checked: an inf input gives NaN outputs where PyTorch gives
    +-inf (documented); on finite data it is finite and right."""
    x, w, b, _ = _wide_data(4)
    y_ref = torch_conv(x, w, b, padding=1)[0]
    y = conv2d.conv2d(x, w, b, padding=1, algorithm="winograd")
    assert np.isfinite(y).all()
    assert_close(conv2d.get_backend("numpy"), y, y_ref, "float64", "y")
    x[0, 5, 2, 1] = np.inf
    y_ref = torch_conv(x, w, b, padding=1)[0]
    y = conv2d.conv2d(x, w, b, padding=1, algorithm="winograd")
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(y_ref))
    assert np.isnan(y).any() and not np.isnan(y_ref).any()


def test_auto_runs_winograd_on_finite_data_only(monkeypatch, without_compiled_kernels):
    """The finiteness check decides per call: winograd for finite data, slices once an inf appears."""
    from conv2d.algorithms.winograd import Winograd

    ran = []
    forward = Winograd.forward
    monkeypatch.setattr(Winograd, "forward", staticmethod(lambda *a: ran.append(1) or forward(*a)))
    x, w, _, _ = _wide_data(5)
    conv2d.conv2d(x, w, padding=1)
    assert ran == [1]
    x[0, 0, 0, 0] = np.nan
    conv2d.conv2d(x, w, padding=1)
    assert ran == [1]

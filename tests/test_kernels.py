"""The ``"kernels"`` algorithm (CuPy's im2col and col2im device kernels), run on the CPU.

``CupyKernels`` is given a stand-in for CuPy whose ``ElementwiseKernel`` compiles the CUDA sources
with the host C++ compiler (``tests/kernel_harness.py``), and a NumPy backend carries it. Results
are compared with PyTorch's convolution and autograd. On a GPU, ``test_oracle.py`` runs the same
algorithm on the real CuPy backend.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._geometry import make_geometry
from conv2d._workspace import scratch_bytes
from conv2d.backends import _cuda_source
from conv2d.backends._cuda_source import PARAMS, kernel_args

from .conftest import require_or_skip
from .kernel_harness import host_kernels_backend
from .oracle import assert_close, torch_conv
from .test_oracle import CASES, _data, _ids

require_or_skip("torch")


@pytest.fixture
def host():
    """(NumPy backend carrying the compiled kernels, the stand-in cupy that built them)."""
    backend = host_kernels_backend()
    return backend, backend.kernels._cupy


def _run(backend, case, dtype, limit, seed=1):
    """Our four results and PyTorch's; `limit` "rows" is a workspace that fits half a sample's output rows."""
    rng, x, w, b = _data(case, seed)
    geom = make_geometry(x.shape, w.shape, b.shape, **case["kwargs"])
    if limit == "rows":
        limit = scratch_bytes(geom, 1, max(1, geom.out_h // 2), np.dtype(dtype).itemsize)
    grad_out = rng.standard_normal((case["n"], case["o"], geom.out_h, geom.out_w))
    x, w, b, grad_out = (a.astype(dtype) for a in (x, w, b, grad_out))
    y, _ = _conv.forward(backend, x, w, b, geom, "kernels", limit)
    grads = _conv.backward(backend, grad_out, x, w, geom, "kernels", limit)
    reference = torch_conv(*(a.astype(np.float64) for a in (x, w, b, grad_out)), **case["kwargs"])
    return (y, *grads), reference


def _assert_close(backend, ours, reference, dtype):
    for name, a, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, reference):
        assert_close(backend, a, r, dtype, name)


@pytest.mark.parametrize("index", ["int32", "int64"])
@pytest.mark.parametrize("limit", [2**30, "rows"], ids=["one-chunk", "row-chunks"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernels_match_pytorch(host, monkeypatch, case, dtype, limit, index):
    """Forward and all three gradients through the compiled kernels agree with PyTorch, with 32-bit
    index arithmetic (what small arrays get) and 64-bit (what arrays past 2**31 elements get)."""
    backend, cupy = host
    if index == "int64":  # every size counts as too large for 32 bits
        monkeypatch.setattr(_cuda_source, "_INT32_MAX", 0)
    ours, reference = _run(backend, case, dtype, limit)
    for a in ours:
        assert a.dtype == np.dtype(dtype)
    _assert_close(backend, ours, reference, dtype)
    acc = "double" if dtype == "float64" else "float"
    assert {f"conv2d_im2col_{acc}_{index}", f"conv2d_col2im_{acc}_{index}"} <= {k.name for k in cupy.built}


def test_index_width():
    """32-bit index arithmetic exactly while every index of the launch fits."""
    assert _cuda_source.index_width(2**31 - 1, 5) == "int32"
    assert _cuda_source.index_width(5, 2**31) == "int64"


def test_row_chunks_really_split(host):
    """The small limit above splits output rows, so col2im accumulates into one gradient across launches."""
    backend, _ = host
    case = CASES[7]
    calls = []
    kernels = backend.kernels

    class Counting:
        def im2col(self, *a):
            calls.append("im2col")
            return kernels.im2col(*a)

        def col2im(self, grad_cols, grad_x, args):
            calls.append(dict(zip(PARAMS, args))["ROW0"])
            return kernels.col2im(grad_cols, grad_x, args)

    counting = dataclasses.replace(backend, kernels=Counting())
    ours, reference = _run(counting, case, "float64", "rows")
    _assert_close(backend, ours, reference, "float64")
    row_starts = [c for c in calls if c != "im2col"]
    assert len(set(row_starts)) > 1 and min(row_starts) == 0, calls


@pytest.mark.parametrize("case", CASES[:9], ids=_ids)
def test_float16_sums_in_float32(host, case):
    """float16 in and out, forward and all three gradients; col2im accumulates in float, so the error is
    float16 rounding, not growth."""
    backend, _ = host
    rng, x, w, b = _data(case, 5)
    geom = make_geometry(x.shape, w.shape, b.shape, **case["kwargs"])
    grad_out = rng.standard_normal((case["n"], case["o"], geom.out_h, geom.out_w))
    x16, w16, grad16 = (a.astype(np.float16) for a in (x, w, grad_out))
    b16 = b.astype(np.float16)
    y, _ = _conv.forward(backend, x16, w16, b16, geom, "kernels", 2**30)
    grads = _conv.backward(backend, grad16, x16, w16, geom, "kernels", 2**30)
    assert all(g.dtype == np.float16 for g in (y, *grads))
    # Reference: PyTorch in float64 on the same float16 values.
    reference = torch_conv(*(a.astype(np.float64) for a in (x16, w16, b16, grad16)), **case["kwargs"])
    for name, ours, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, *grads), reference):
        assert_close(backend, ours, ref, "float16", name)


def test_col2im_is_bitwise_reproducible(host):
    """Three backward passes through col2im give the same bits (each pixel sums in a fixed order)."""
    backend, _ = host
    case = CASES[5]
    first = _run(backend, case, "float32", 2**30, seed=9)[0]
    for _ in range(2):
        again = _run(backend, case, "float32", 2**30, seed=9)[0]
        for a, b in zip(first, again):
            assert np.array_equal(a, b)


def test_kernel_args_follow_params():
    """kernel_args gives one value per name of PARAMS, in that order."""
    geom = make_geometry((2, 3, 10, 11), (4, 3, 3, 2), None, stride=(2, 3), padding=(2, 1), dilation=(3, 2))
    args = dict(zip(PARAMS, kernel_args(geom, 5, (1, 3)), strict=True))
    assert args == dict(C=3, H=10, W=11, KH=3, KW=2, SH=2, SW=3, DH=3, DW=2, TOP=2, LEFT=1,
                        OW=geom.out_w, ROW0=1, ROWS=2, N=5)


def test_kernels_needs_a_backend_with_kernels(cpu_backend, without_compiled_kernels):
    """algorithm='kernels' on a backend without compiled kernels says which backends have them and how
    NumPy gets them (NumPy's own kernels, where Numba is installed, are taken away for this test)."""
    cpu_backend = conv2d.get_backend(cpu_backend.spec)
    x = cpu_backend.asarray(np.random.default_rng(0).standard_normal((1, 2, 5, 5)))
    w = cpu_backend.asarray(np.random.default_rng(1).standard_normal((3, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"algorithm 'kernels' .*\(cupy has them, and numpy where Numba is installed: pip install 'conv2d\[cpu\]'\); "
                       r"use algorithm='auto', 'gather' or 'slices'"):
        conv2d.conv2d(x, w, algorithm="kernels")
    with pytest.raises(ValueError, match="algorithm 'kernels'"):
        conv2d.conv2d_backward(conv2d.conv2d(x, w), x, w, algorithm="kernels")
    with pytest.raises(ValueError, match="algorithm 'kernels'"):
        conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 3, backend=cpu_backend, algorithm="kernels")


def test_layer_runs_on_kernels(host):
    """A ConvolutionLayer on a backend with kernels uses them ('auto') and matches the same layer on slices."""
    backend, _ = host
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4, 3, 9, 9))
    kw = dict(padding=1, stride=2, activation="tanh", seed=4)
    with_kernels = conv2d.ConvolutionLayer((3, 9, 9), (3, 3), 5, backend=backend, **kw)
    plain = conv2d.ConvolutionLayer((3, 9, 9), (3, 3), 5, backend="numpy", algorithm="slices", **kw)
    np.testing.assert_allclose(with_kernels.forwardpass(X), plain.forwardpass(X), rtol=1e-12, atol=1e-13)
    delta = rng.standard_normal((4, 5, 5, 5))
    np.testing.assert_allclose(with_kernels.backwardpass(0.1, X, delta), plain.backwardpass(0.1, X, delta),
                               rtol=1e-12, atol=1e-13)
    assert _conv.choose_algorithm("auto", backend).name == "kernels"

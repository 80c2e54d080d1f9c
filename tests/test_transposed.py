"""conv_transpose2d and its backward against PyTorch's conv_transpose2d and autograd, on every CPU backend."""

from __future__ import annotations

import re

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._transposed import transposed_geometry

from .conftest import require_or_skip

torch = require_or_skip("torch")


def _draw_case(rng: np.random.Generator) -> dict:
    """A random geometry whose output has at least one pixel and whose output_padding PyTorch accepts."""
    while True:
        groups = int(rng.choice([1, 1, 2, 3]))
        kernel = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 3)))
        dilation = (int(rng.integers(1, 3)), int(rng.integers(1, 4)))
        padding = (int(rng.integers(0, 3)), int(rng.integers(0, 2)))
        extra = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation))
        case = dict(n=int(rng.integers(1, 4)), c_in=groups * int(rng.integers(1, 4)),
                    c_out=groups * int(rng.integers(1, 4)), h=int(rng.integers(1, 7)), w=int(rng.integers(1, 6)),
                    kernel=kernel, bias=bool(rng.integers(0, 2)),
                    kwargs=dict(stride=stride, padding=padding, output_padding=extra, dilation=dilation, groups=groups))
        if all(_out_size(case, a) >= 1 for a in range(2)):
            return case


def _out_size(case: dict, axis: int) -> int:
    kw = case["kwargs"]
    size = (case["h"], case["w"])[axis]
    return ((size - 1) * kw["stride"][axis] - 2 * kw["padding"][axis]
            + kw["dilation"][axis] * (case["kernel"][axis] - 1) + kw["output_padding"][axis] + 1)


_RNG = np.random.default_rng(20261206)
# Random geometries, then the shapes winograd (3x3, stride 1) and pointwise (1x1) compute, and an
# output_padding at least the stride (allowed where it is smaller than the dilation).
CASES = [_draw_case(_RNG) for _ in range(9)] + [
    dict(n=2, c_in=4, c_out=6, h=5, w=6, kernel=(3, 3), bias=True,
         kwargs=dict(stride=(1, 1), padding=(1, 0), output_padding=(0, 0), dilation=(1, 2), groups=2)),
    dict(n=2, c_in=6, c_out=4, h=4, w=3, kernel=(1, 1), bias=False,
         kwargs=dict(stride=(2, 1), padding=(0, 0), output_padding=(1, 0), dilation=(1, 1), groups=1)),
    dict(n=1, c_in=3, c_out=2, h=4, w=5, kernel=(3, 2), bias=True,
         kwargs=dict(stride=(1, 2), padding=(1, 1), output_padding=(1, 2), dilation=(2, 3), groups=1)),
]
JAX_CASES = 2  # JAX compiles every new shape: two geometries keep the file fast


def _case_id(case: dict) -> str:
    kw = case["kwargs"]
    return (f"{case['n']}x{case['c_in']}x{case['h']}x{case['w']}-o{case['c_out']}-k{case['kernel']}-s{kw['stride']}"
            f"-p{kw['padding']}-op{kw['output_padding']}-d{kw['dilation']}-g{kw['groups']}-{'b' if case['bias'] else 'nob'}")


def _data(case: dict, dtype: str, seed: int) -> tuple[np.ndarray, ...]:
    """x, weight, bias and an output gradient, rounded to `dtype` (the float64 or complex128 oracle sees the same
    values); complex dtypes get a random imaginary part too."""
    rng = np.random.default_rng(seed)
    complex_ = np.dtype(dtype).kind == "c"

    def draw(shape):
        values = rng.standard_normal(shape)
        return values + 1j * rng.standard_normal(shape) if complex_ else values

    groups = case["kwargs"]["groups"]
    x = draw((case["n"], case["c_in"], case["h"], case["w"]))
    w = draw((case["c_in"], case["c_out"] // groups, *case["kernel"]))
    b = draw(case["c_out"])
    g = draw((case["n"], case["c_out"], _out_size(case, 0), _out_size(case, 1)))
    return tuple(a.astype(dtype).astype(np.complex128 if complex_ else np.float64) for a in (x, w, b, g))


def _oracle(x, w, b, g, kwargs) -> tuple[np.ndarray, ...]:
    """PyTorch's output and autograd's gradients of x, weight and bias, in float64 (complex128 for complex data:
    PyTorch's conv_transpose2d takes complex tensors, and its autograd follows the conjugate convention)."""
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    y = torch.nn.functional.conv_transpose2d(xt, wt, bt, **kwargs)
    grads = torch.autograd.grad(y, (xt, wt, bt), torch.tensor(g))
    return (y.detach().numpy(), *(t.numpy() for t in grads))


def _applies(algorithm: str, backend, case: dict) -> bool:
    """Whether `algorithm` computes the convolution that `case` transposes on `backend` (None: any backend),
    by the library's own rule (conv2d._conv.applicable), so that a new algorithm's domain needs no entry here."""
    kw = case["kwargs"]
    geom = transposed_geometry((case["n"], case["c_in"], case["h"], case["w"]),
                               (case["c_in"], case["c_out"] // kw["groups"], *case["kernel"]), None, **kw)
    return _conv.applicable(algorithm, backend, geom)


def _check(backend, case: dict, dtype: str, algorithm: str, seed: int) -> None:
    x, w, b, g = _data(case, dtype, seed)
    expected = _oracle(x, w, b, g, case["kwargs"])
    X, W, B, G = (backend.asarray(a.astype(dtype)) for a in (x, w, b, g))
    kw = dict(case["kwargs"], algorithm=algorithm)
    y = conv2d.conv_transpose2d(X, W, B if case["bias"] else None, **kw)
    if not case["bias"]:
        y = y + backend.asarray(b.astype(dtype).reshape(1, -1, 1, 1))  # compared with the oracle's biased output
    grads = conv2d.conv_transpose2d_backward(G, X, W, **kw)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype in ("float64", "complex128") else dict(rtol=2e-4, atol=2e-4)
    for name, ours, theirs in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, *grads), expected):
        got = backend.to_numpy(ours)
        assert got.dtype == np.dtype(dtype), name
        scale = max(1.0, float(np.abs(theirs).max(initial=0.0)))
        np.testing.assert_allclose(got, theirs, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=f"{name}, {algorithm}")


def jax_keeps(test: str, params: dict) -> bool | None:
    """JAX runs the first JAX_CASES geometries of test_transposed_matches_pytorch under the default profile
    (tests/conftest.py; it compiles every shape, and test_every_algorithm covers each algorithm there);
    every other test: the default."""
    if test == "test_transposed_complex_matches_pytorch":
        return (COMPLEX_CASES.index(params["case"]), params["dtype"]) == (JAX_COMPLEX_CASE, "complex128")
    if test != "test_transposed_matches_pytorch":
        return None
    return CASES.index(params["case"]) < JAX_CASES


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_transposed_matches_pytorch(backend, case, dtype):
    """'auto' and one explicit algorithm that applies (a different one per case and dtype)."""
    index = CASES.index(case)
    applicable = [a for a in conv2d.ALGORITHMS if _applies(a, backend, case)]
    explicit = applicable[(index + (dtype == "float32")) % len(applicable)]
    for algorithm in ("auto", explicit):
        _check(backend, case, dtype, algorithm, seed=index)


# Complex: four random geometries and the three fixed ones (winograd's, pointwise's, output_padding at least the
# stride), in both complex dtypes; JAX one strided geometry with an output_padding, in complex128 (it compiles
# every shape).
COMPLEX_CASES = [*CASES[2:6], *CASES[-3:]]
JAX_COMPLEX_CASE = 1


@pytest.mark.parametrize("dtype", ["complex128", "complex64"])
@pytest.mark.parametrize("case", COMPLEX_CASES, ids=_case_id)
def test_transposed_complex_matches_pytorch(backend, case, dtype):
    """'auto' and one explicit algorithm that applies (a different one per case and dtype)."""
    index = COMPLEX_CASES.index(case)
    applicable = [a for a in conv2d.ALGORITHMS if _applies(a, backend, case)]
    explicit = applicable[(index + (dtype == "complex64")) % len(applicable)]
    for algorithm in ("auto", explicit):
        _check(backend, case, dtype, algorithm, seed=100 + index)


@pytest.mark.parametrize("algorithm", conv2d.ALGORITHMS)
def test_every_algorithm(backend, algorithm):
    """Each algorithm on a geometry it computes: the last case (strided) where it applies, else the first of
    the others its rule accepts (winograd's 3x3 stride 1, pointwise's 1x1). A backend that lacks the
    algorithm altogether is deselected (tests/conftest.py)."""
    case = next((case for case in (CASES[-1], *CASES) if _applies(algorithm, None, case)), None)
    assert case is not None, f"no case of CASES is in the domain of {algorithm!r}: add one"
    _check(backend, case, "float64", algorithm, seed=99)


def test_inputs_are_not_modified():
    case = CASES[0]
    x, w, b, g = _data(case, "float64", 1)
    copies = [a.copy() for a in (x, w, b, g)]
    conv2d.conv_transpose2d(x, w, b, **case["kwargs"])
    conv2d.conv_transpose2d_backward(g, x, w, **case["kwargs"])
    for before, after in zip(copies, (x, w, b, g)):
        np.testing.assert_array_equal(before, after)


def test_forward_computes_no_weight_gradient():
    """The forward pass asks _conv.backward for the input gradient alone: no patches of a conv input it lacks."""
    case = CASES[-1]
    geom = transposed_geometry((1, 3, 4, 5), (3, 2, 3, 2), None, **case["kwargs"])
    backend = conv2d.get_backend("numpy")
    g = np.ones((1, 3, geom.out_h, geom.out_w))
    grad_x, grad_w, _ = _conv.backward(backend, g, None, np.ones((3, 2, 3, 2)), geom, "slices", 1 << 30, needs=("x",))
    assert grad_w is None and grad_x.shape == (1, 2, geom.height, geom.width)


def _call(x_shape=(1, 4, 5, 5), w_shape=(4, 2, 3, 3), bias_shape=None, **kw):
    x, w = np.ones(x_shape), np.ones(w_shape)
    return conv2d.conv_transpose2d(x, w, None if bias_shape is None else np.ones(bias_shape), **kw)


@pytest.mark.parametrize("kw, error, match", [
    (dict(stride=2, output_padding=2), ValueError, "output_padding must be smaller than the stride or the dilation"),
    (dict(stride=1, dilation=2, output_padding=(0, 2)), ValueError, "output_padding must be smaller"),
    (dict(output_padding=-1), ValueError, "output_padding must be non-negative"),
    (dict(padding="same"), TypeError, "has no 'same' or 'valid'"),
    (dict(padding=4), ValueError, "output would be -1x-1"),
    (dict(w_shape=(3, 2, 3, 3)), ValueError, "x has 4 channels but weight has 3 input channels"),
    (dict(groups=3), ValueError, "groups=3 must divide the input channels"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(bias_shape=(4,)), ValueError, r"bias must have shape \(2,\)"),
    (dict(x_shape=(4, 5, 5)), ValueError, "x must be 4-D"),
    (dict(algorithm="pointwise"), ValueError, "pointwise"),
    (dict(algorithm="fft"), ValueError, "algorithm must be 'auto' or one of"),
])
def test_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        _call(**kw)


def test_bad_arrays_and_grad_out_shape():
    x, w = np.ones((1, 4, 5, 5)), np.ones((4, 2, 3, 3))
    with pytest.raises(TypeError, match="conv2d does not promote"):
        conv2d.conv_transpose2d(x, w.astype(np.float32))
    with pytest.raises(ValueError, match=r"grad_out must have the forward output's shape \(1, 2, 7, 7\)"):
        conv2d.conv_transpose2d_backward(np.ones((1, 2, 6, 7)), x, w)


# --- TransposedConvolutionLayer ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_layer_matches_torch_conv_transpose2d(cpu_backend, activation):
    """Forward, the three gradients and one SGD step against torch.nn.ConvTranspose2d."""
    kw = dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 2))
    layer = conv2d.TransposedConvolutionLayer((3, 4, 5), (3, 2), 2, kw["stride"], kw["padding"], kw["output_padding"],
                                              dilation=kw["dilation"], activation=activation, seed=3, backend=cpu_backend)
    reference = torch.nn.ConvTranspose2d(3, 2, (3, 2), **kw).double()
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(cpu_backend.to_numpy(layer.weights)))
        reference.bias.copy_(torch.tensor(cpu_backend.to_numpy(layer.biases)))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    xt = torch.tensor(x, requires_grad=True)
    yt = reference(xt) if activation is None else torch.sigmoid(reference(xt))
    out = layer.forwardpass(cpu_backend.asarray(x))
    assert (layer.out_depth, layer.out_row, layer.out_col) == tuple(yt.shape[1:]) == (2, 8, 7)
    np.testing.assert_allclose(cpu_backend.to_numpy(out), yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    delta = rng.standard_normal(tuple(yt.shape))
    grads_t = torch.autograd.grad(yt, (xt, reference.weight, reference.bias), torch.tensor(delta))
    grad_x, grads = layer.backward(cpu_backend.asarray(x), cpu_backend.asarray(delta))
    for ours, theirs in zip((grad_x, grads["weights"], grads["biases"]), grads_t):
        np.testing.assert_allclose(cpu_backend.to_numpy(ours), theirs.numpy(), rtol=1e-10, atol=1e-12)
    before = cpu_backend.to_numpy(layer.weights)
    step = layer.backwardpass(0.5, cpu_backend.asarray(x), cpu_backend.asarray(delta))
    np.testing.assert_allclose(cpu_backend.to_numpy(step), grads_t[0].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cpu_backend.to_numpy(layer.weights), before - 0.5 * grads_t[1].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cpu_backend.to_numpy(layer.biases),
                               reference.bias.detach().numpy() - 0.5 * grads_t[2].numpy(), rtol=1e-10, atol=1e-12)


def test_layer_in_sequential_saves_and_loads(tmp_path):
    from conv2d import nn

    net = nn.Sequential([
        conv2d.ConvolutionLayer((1, 8, 8), (3, 3), 4, 2, padding=1, activation="relu", seed=0),
        conv2d.TransposedConvolutionLayer((4, 4, 4), 3, 1, stride=2, padding=1, output_padding=1, seed=1),
    ])
    x = np.random.default_rng(5).random((3, 1, 8, 8))
    out = net.forwardpass(x)
    assert out.shape == (3, 1, 8, 8)
    net.backwardpass(0.1, x, out - x)  # trained a step: the file must hold the new weights
    expected = net.forwardpass(x)
    loaded = nn.load(nn.save(net, tmp_path / "net"))
    assert loaded.layers[1].architecture() == net.layers[1].architecture()
    np.testing.assert_array_equal(loaded.forwardpass(x), expected)
    assert loaded.state_dict()["1.weights"].shape == (4, 1, 3, 3)


def test_layer_refuses_bad_arguments_and_state():
    with pytest.raises(ValueError, match="output_padding must be smaller than the stride or the dilation"):
        conv2d.TransposedConvolutionLayer((2, 4, 4), 3, 2, stride=1, output_padding=1)
    with pytest.raises(ValueError, match="activation must be one of"):
        conv2d.TransposedConvolutionLayer((2, 4, 4), 3, 2, activation="gelu")
    layer = conv2d.TransposedConvolutionLayer((2, 4, 4), 3, 2, seed=0)
    with pytest.raises(RuntimeError, match="needs a forwardpass first"):
        layer.backward(np.ones((1, 2, 4, 4)), np.ones((1, 2, 6, 6)))
    layer.forwardpass(np.ones((1, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"delta must have the forward output's shape \(1, 2, 6, 6\)"):
        layer.backward(np.ones((1, 2, 4, 4)), np.ones((1, 2, 5, 6)))
    with pytest.raises(ValueError, match=r"X must have shape \(n, 2, 4, 4\)"):
        layer.forwardpass(np.ones((1, 3, 4, 4)))


# --- python -m conv2d demo --model autoencoder ------------------------------------------------------------


def test_autoencoder_demo_lowers_the_error_and_writes_the_picture(tmp_path, capsys):
    require_or_skip("sklearn")
    require_or_skip("matplotlib")
    from conv2d.__main__ import main

    out = tmp_path / "out"
    assert main(["demo", "--model", "autoencoder", "--epochs", "1", "--out", str(out), "--save", str(tmp_path / "net")]) == 0
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("reconstruction error"))
    before, after = map(float, re.search(r"([\d.]+) untrained, ([\d.]+) after", line).groups())
    assert after < before / 2, line
    assert (out / "reconstructions.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert type(conv2d.nn.load(tmp_path / "net").layers[1]).__name__ == "TransposedConvolutionLayer"


def test_autoencoder_demo_refuses_dask(capsys):
    require_or_skip("sklearn")
    from conv2d.__main__ import main

    assert main(["demo", "--model", "autoencoder", "--no-plots", "--dask", "tcp://nowhere:1"]) == 2
    assert "--dask trains the classifier only" in capsys.readouterr().err


# --- python -m conv2d bench --op conv_transpose2d ---------------------------------------------------------


def test_bench_times_conv_transpose2d_against_pytorch(tmp_path):
    import json

    from conv2d.__main__ import main
    from conv2d.tools.bench.calls import Case, torch_calls, transposed_calls
    from conv2d.tools.bench.shapes import parse_shape

    shape = parse_shape("2,4,9,8,6,3,3,2,1")  # odd sizes: output_padding restores the 9th row
    case = Case.make(conv2d.get_backend("numpy"), shape, "float64", op="conv_transpose2d")
    ours, theirs = transposed_calls(case)["ours_fwdbwd"](), torch_calls(case)["torch_fwdbwd"]()
    assert ours[0].shape == (2, 4, 9, 8)  # the shape's input size
    for mine, reference in zip(ours[1], theirs):  # the bench times the same gradients as PyTorch's
        np.testing.assert_allclose(mine, reference.numpy(), rtol=1e-10, atol=1e-10)
    path = tmp_path / "bench.json"
    assert main(["bench", "--op", "conv_transpose2d", "--shapes", shape.spec, "--repeat", "1", "--rounds", "1",
                 "--warmup", "0", "--no-seed", "--isolation", "none", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["settings"]["op"] == "conv_transpose2d"
    (result,) = report["results"]
    assert result["ms"]["ours_fwdbwd"] > 0 and result["ms"]["torch_fwdbwd"] > 0
    assert "conv2d only" in result["skipped"]["floor"]

"""conv2d.nn: pooling, flatten, dense, softmax cross-entropy and Sequential against PyTorch, on every backend.

Oracle: PyTorch's functional ops (``max_pool2d``, ``avg_pool2d``, ``linear``, ``cross_entropy``) and
autograd in float64, on random data (no ties in a max-pool window, no zeros hiding unwritten outputs).
"""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d import nn
from conv2d._geometry import make_geometry
from conv2d.nn._convolution import ACTIVATIONS

from .algorithms import algorithm_names, applicable_to_all
from .conftest import CPU_BACKENDS, require_or_skip
from .oracle import assert_close

torch = require_or_skip("torch")
F = torch.nn.functional

NUMPY = conv2d.get_backend("numpy")


def _t(array) -> torch.Tensor:
    return torch.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def _np(backend, array) -> np.ndarray:
    return np.array(backend.to_numpy(array), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------

# (in_channels, pool_size, stride, batch)
POOL_GEOMETRIES = [
    pytest.param((3, 8, 8), 2, None, 2, id="2x2"),
    pytest.param((2, 9, 7), 2, None, 3, id="2x2-odd-input-drops-edge"),
    pytest.param((2, 7, 9), 3, 2, 2, id="3x3-stride2-overlapping"),
    pytest.param((1, 6, 10), (2, 3), (1, 2), 1, id="rect-window-rect-stride"),
    pytest.param((4, 5, 5), 5, None, 2, id="global"),
    pytest.param((2, 4, 6), 1, None, 2, id="1x1-identity"),
]
POOLS = {"max": (nn.MaxPoolLayer, F.max_pool2d), "avg": (nn.AvgPoolLayer, F.avg_pool2d)}


@pytest.mark.parametrize("kind", list(POOLS))
@pytest.mark.parametrize("in_channels, pool_size, stride, batch", POOL_GEOMETRIES)
def test_pool_against_torch(backend, kind, in_channels, pool_size, stride, batch):
    """Forward and dE/dX equal PyTorch's pooling and autograd (float64)."""
    layer_class, torch_pool = POOLS[kind]
    layer = layer_class(in_channels, pool_size, stride, backend=backend)
    rng = np.random.default_rng(17)
    X = rng.standard_normal((batch, *in_channels))
    out = layer.forwardpass(backend.asarray(X))
    assert backend.owns(out)
    xt = _t(X)
    yt = torch_pool(xt, pool_size, stride if stride is not None else pool_size)
    assert (layer.out_depth, layer.out_row, layer.out_col) == tuple(yt.shape[1:])
    assert_close(backend, out, yt.detach().numpy(), "float64", "forwardpass")
    delta = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(delta))
    grad_x = layer.backwardpass(0.1, X, backend.asarray(delta))
    assert backend.owns(grad_x)
    assert_close(backend, grad_x, xt.grad.numpy(), "float64", "dE/dX")


@pytest.mark.parametrize("kind", list(POOLS))
def test_pool_float32(backend, kind):
    """float32 in, float32 out (forward and dE/dX), matching the float64 oracle to float32 accuracy."""
    layer_class, torch_pool = POOLS[kind]
    layer = layer_class((3, 6, 6), 2, backend=backend)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    out = layer.forwardpass(X)
    delta = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    grad_x = layer.backwardpass(0.1, X, delta)
    assert backend.to_numpy(out).dtype == np.float32 and backend.to_numpy(grad_x).dtype == np.float32
    xt = _t(X)
    yt = torch_pool(xt, 2)
    yt.backward(torch.tensor(delta, dtype=torch.float64))
    assert_close(backend, out, yt.detach().numpy(), "float32", "forwardpass")
    assert_close(backend, grad_x, xt.grad.numpy(), "float32", "dE/dX")


def test_max_pool_tie_goes_to_the_first_maximum():
    """Where a window holds its maximum twice, the whole gradient goes to the first (row-major)."""
    layer = nn.MaxPoolLayer((1, 2, 2), 2, backend="numpy")
    X = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
    layer.forwardpass(X)
    grad_x = layer.backwardpass(0.1, X, np.array([[[[5.0]]]]))
    np.testing.assert_array_equal(grad_x, [[[[0.0, 5.0], [0.0, 0.0]]]])


def test_pool_geometry_and_argument_errors():
    """Shapes and arguments are checked with messages that name them."""
    pool = nn.MaxPoolLayer((2, 6, 6), 3, 2, backend="numpy")
    assert (pool.out_depth, pool.out_row, pool.out_col) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"X must have shape \(n, 2, 6, 6\)"):
        pool.forwardpass(np.zeros((1, 3, 6, 6)))
    with pytest.raises(TypeError, match="floating"):
        pool.forwardpass(np.zeros((1, 2, 6, 6), dtype=np.int64))
    with pytest.raises(RuntimeError, match="forwardpass first"):
        nn.AvgPoolLayer((2, 6, 6), 2, backend="numpy").backwardpass(0.1, np.zeros((1, 2, 6, 6)), np.zeros((1, 2, 3, 3)))
    X = np.random.default_rng(0).standard_normal((2, 2, 6, 6))
    pool.forwardpass(X)
    with pytest.raises(ValueError, match="delta must have the forward output's shape"):
        pool.backwardpass(0.1, X, np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match="batch size 1 but the last forwardpass had 2"):
        pool.backwardpass(0.1, X[:1], np.zeros((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="kernel spans 7x7"):
        nn.MaxPoolLayer((1, 6, 6), 7, backend="numpy")
    with pytest.raises(ValueError, match="pool_size"):
        nn.MaxPoolLayer((1, 6, 6), 0, backend="numpy")


# --------------------------------------------------------------------------------------------
# Flatten
# --------------------------------------------------------------------------------------------


def test_flatten_round_trip(backend):
    """Flatten is torch.flatten(x, 1); its backward pass is the inverse reshape."""
    layer = nn.FlattenLayer()
    X = np.random.default_rng(2).standard_normal((3, 2, 4, 5))
    out = layer.forwardpass(backend.asarray(X))
    assert backend.owns(out)
    assert_close(backend, out, torch.flatten(torch.tensor(X), 1).numpy(), "float64", "forwardpass")
    delta = np.random.default_rng(3).standard_normal((3, 40))
    grad_x = layer.backwardpass(0.1, X, backend.asarray(delta))
    assert_close(backend, grad_x, delta.reshape(3, 2, 4, 5), "float64", "dE/dX")
    with pytest.raises(ValueError, match=r"forward output's shape \(3, 40\)"):
        layer.backwardpass(0.1, X, backend.asarray(delta[:, :39]))


# --------------------------------------------------------------------------------------------
# Dense
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_dense_against_torch(backend, activation):
    """Forward, dE/dX and the SGD step's weight and bias gradients equal F.linear + autograd (float64)."""
    layer = conv2d.nn.DenseLayer(7, 4, activation=activation, seed=3, backend=backend)
    w0, b0 = _np(backend, layer.weights), _np(backend, layer.biases)
    rng = np.random.default_rng(11)
    X = rng.standard_normal((5, 7))
    out = layer.forwardpass(X)
    xt, wt, bt = _t(X), _t(w0), _t(b0)
    act = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, None: lambda t: t}[activation]
    yt = act(F.linear(xt, wt, bt))
    if activation == "relu":
        assert 0.1 < (yt > 0).double().mean() < 0.9, "relu case should exercise both branches"
    assert_close(backend, out, yt.detach().numpy(), "float64", "forwardpass")
    delta = rng.standard_normal((5, 4))
    yt.backward(torch.tensor(delta))
    lr = 0.25
    grad_x = layer.backwardpass(lr, X, delta)
    assert backend.owns(grad_x) and backend.owns(layer.weights) and backend.owns(layer.biases)
    assert_close(backend, grad_x, xt.grad.numpy(), "float64", "dE/dX (with the weights before the update)")
    assert_close(NUMPY, (w0 - _np(backend, layer.weights)) / lr, wt.grad.numpy(), "float64", "weight gradient")
    assert_close(NUMPY, (b0 - _np(backend, layer.biases)) / lr, bt.grad.numpy(), "float64", "bias gradient")


def test_dense_initial_weights(backend):
    """Seeded uniform draws in ±1/sqrt(in_features) (as nn.Linear), the same on every backend; float32 rounds them."""
    layer = nn.DenseLayer(9, 3, seed=4, backend=backend)
    rng = np.random.default_rng(4)
    np.testing.assert_array_equal(backend.to_numpy(layer.weights), rng.uniform(-1 / 3, 1 / 3, (3, 9)))
    np.testing.assert_array_equal(backend.to_numpy(layer.biases), rng.uniform(-1 / 3, 1 / 3, 3))
    single = nn.DenseLayer(9, 3, seed=4, dtype="float32", backend=backend)
    assert backend.to_numpy(single.weights).dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy(single.weights), backend.to_numpy(layer.weights).astype(np.float32))


def test_dense_float32_stays_float32(backend):
    """A float32 layer fed float64 data computes in float32, and a NumPy-scalar lr does not promote it;
    the values are PyTorch's (float64 autograd on the float32-rounded inputs, float32 tolerance)."""
    layer = nn.DenseLayer(6, 2, activation=None, dtype="float32", seed=0, backend=backend)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3, 6))
    delta = rng.standard_normal((3, 2))
    w0, b0 = _np(backend, layer.weights), _np(backend, layer.biases)
    out = layer.forwardpass(X)
    lr = 0.125  # a power of two: (w0 - w1) / lr is exact up to the update's rounding
    grad_x = layer.backwardpass(np.float64(lr), X, delta)
    for array in (out, grad_x, layer.weights, layer.biases):
        assert backend.to_numpy(array).dtype == np.float32
    xt = _t(X.astype(np.float32).astype(np.float64))
    wt, bt = _t(w0), _t(b0)
    y = F.linear(xt, wt, bt)
    y.backward(torch.tensor(delta.astype(np.float32).astype(np.float64)))
    assert_close(backend, out, y.detach().numpy(), "float32", "output")
    assert_close(backend, grad_x, xt.grad.numpy(), "float32", "dE/dX")
    assert_close(NUMPY, (w0 - _np(backend, layer.weights)) / lr, wt.grad.numpy(), "float32", "weight gradient")
    assert_close(NUMPY, (b0 - _np(backend, layer.biases)) / lr, bt.grad.numpy(), "float32", "bias gradient")


def test_dense_errors():
    layer = nn.DenseLayer(4, 2, seed=0, backend="numpy")
    with pytest.raises(RuntimeError, match="forwardpass first"):
        layer.backwardpass(0.1, np.zeros((1, 4)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"X must have shape \(n, 4\)"):
        layer.forwardpass(np.zeros((2, 5)))
    layer.forwardpass(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"forward output's shape \(2, 2\)"):
        layer.backwardpass(0.1, np.ones((2, 4)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="activation"):
        nn.DenseLayer(4, 2, activation="softplus")
    with pytest.raises(ValueError, match="out_features"):
        nn.DenseLayer(4, 0)


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["ordinary", "huge-logits"])
def test_softmax_cross_entropy_against_torch(backend, scale):
    """Loss and d loss / d logits equal F.cross_entropy (mean) and autograd; huge logits do not overflow."""
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((6, 5)) * scale
    labels = np.array([0, 4, 2, 2, 1, 3])
    loss, grad = nn.softmax_cross_entropy(backend.asarray(logits), backend.asarray(labels))
    assert backend.owns(loss) and backend.owns(grad) and tuple(loss.shape) == ()
    lt = _t(logits)
    expected = F.cross_entropy(lt, torch.tensor(labels))
    expected.backward()
    assert_close(backend, loss, expected.detach().numpy(), "float64", "loss")
    assert_close(backend, grad, lt.grad.numpy(), "float64", "gradient")
    assert np.isfinite(float(loss))


@pytest.mark.parametrize(
    ("logits", "labels", "dtype"),
    [([[-np.inf, 0.0, 0.0], [1.0, 2.0, 3.0]], [1, 2], "float64"),
     ([[3e38, -3e38, 0.0]], [0], "float32"),
     ("random-with-inf", [0, 3, 1, 2, 4], "float64")],
    ids=["minus-inf-logit", "float32-extremes", "random-with-inf"],
)
def test_softmax_cross_entropy_with_infinite_log_probabilities(cpu_backend, logits, labels, dtype):
    """A class with probability 0 (logit -inf, or a shift that overflows to -inf) is not NaN: PyTorch's value."""
    if isinstance(logits, str):
        rng = np.random.default_rng(11)
        logits = rng.standard_normal((5, 6))
        logits[rng.random((5, 6)) < 0.3] = -np.inf
        logits[np.arange(5), labels] = rng.standard_normal(5)  # the label's own class stays finite
    logits = np.asarray(logits, dtype=dtype)
    loss, grad = nn.softmax_cross_entropy(cpu_backend.asarray(logits), cpu_backend.asarray(np.array(labels)))
    lt = torch.tensor(logits, requires_grad=True)
    expected = F.cross_entropy(lt, torch.tensor(labels))
    expected.backward()
    assert np.isfinite(float(loss)) and np.all(np.isfinite(_np(cpu_backend, grad)))
    assert_close(cpu_backend, loss, expected.detach().numpy(), dtype, "loss")
    assert_close(cpu_backend, grad, lt.grad.numpy(), dtype, "gradient")


def test_softmax_cross_entropy_labels_from_anywhere(backend):
    """Labels as a list, NumPy int32 or another library's array are moved to the logits' backend."""
    logits = backend.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    reference, _ = nn.softmax_cross_entropy(logits, backend.asarray(np.array([1, 0, 3])))
    for labels in ([1, 0, 3], np.array([1, 0, 3], dtype=np.int32), torch.tensor([1, 0, 3])):
        loss, _ = nn.softmax_cross_entropy(logits, labels)
        assert float(loss) == pytest.approx(float(reference), rel=1e-12)


def test_softmax_cross_entropy_errors():
    with pytest.raises(TypeError, match="integer"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="2-D"):
        nn.softmax_cross_entropy(np.zeros((2, 3, 1)), np.array([0, 1]))
    with pytest.raises(TypeError, match="floating"):
        nn.softmax_cross_entropy(np.zeros((2, 3), dtype=np.int64), np.array([0, 1]))
    for bad in ([0, 3], [-1, 0]):
        with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
            nn.softmax_cross_entropy(np.zeros((2, 3)), np.array(bad))


INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_softmax_cross_entropy_takes_labels_of_every_integer_width(backend, dtype):
    """NumPy labels of any integer width (rng.integers gives int64, refused by JAX without 64-bit types),
    and the logits' own library's labels of that width where it has it (torch cannot compare uint16..uint64):
    PyTorch's cross_entropy loss and gradient."""
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((7, 5))
    labels = rng.integers(0, 5, size=7).astype(dtype)
    lt = _t(logits)
    expected = F.cross_entropy(lt, torch.tensor(labels.astype(np.int64)))
    expected.backward()
    candidates = [labels]
    try:
        candidates.append(backend.asarray(labels))  # the same labels in the logits' library, same width
    except TypeError:
        assert backend.name == "jax" and dtype.endswith("64")  # JAX without 64-bit types has no such array
    for given in candidates:
        before = np.array(backend.to_numpy(given) if backend.owns(given) else given, copy=True)
        loss, grad = nn.softmax_cross_entropy(backend.asarray(logits), given)
        assert_close(backend, loss, expected.detach().numpy(), "float64", f"loss, labels {type(given)}")
        assert_close(backend, grad, lt.grad.numpy(), "float64", f"gradient, labels {type(given)}")
        after = backend.to_numpy(given) if backend.owns(given) else given
        assert np.array_equal(after, before) and after.dtype == before.dtype  # labels are not modified


@pytest.mark.parametrize("dtype", ["int8", "int64", "uint8", "uint64"])
@pytest.mark.parametrize("bad", [-1, 5], ids=["negative", "too-large"])
def test_softmax_cross_entropy_range_checks_labels_of_every_width(backend, dtype, bad):
    if bad < 0 and dtype.startswith("uint"):
        bad = np.iinfo(dtype).max  # no negative unsigned label: the largest one, which wraps in a narrower type
    labels = np.array([0, bad, 1], dtype=dtype)
    candidates = [labels]
    if not (backend.name == "jax" and dtype.endswith("64")):  # JAX without 64-bit types has no such array
        candidates.append(backend.asarray(labels))
    for given in candidates:
        with pytest.raises(ValueError, match=rf"in \[0, 5\) .* got values from {min(bad, 0)} to {max(bad, 1)}$"):
            nn.softmax_cross_entropy(backend.asarray(np.zeros((3, 5))), given)


def test_softmax_cross_entropy_int64_labels_on_jax_need_no_64_bit_types():
    """The README's research example: rng.integers labels with CONV2D_BACKEND=jax (64-bit types off)."""
    jax = require_or_skip("jax")
    backend = conv2d.get_backend("jax")
    labels = np.random.default_rng(0).integers(0, 4, size=6)
    assert labels.dtype == np.int64
    was = jax.config.jax_enable_x64  # the test session turns them on (conftest): off, as JAX's default
    jax.config.update("jax_enable_x64", False)
    try:
        loss, _ = nn.softmax_cross_entropy(backend.asarray(np.zeros((6, 4), dtype=np.float32)), labels)
        assert float(loss) == pytest.approx(np.log(4), rel=1e-6)
        with pytest.raises(TypeError, match=r"or use int32$"):  # the backend's own advice for an int64 array
            backend.asarray(labels)
    finally:
        jax.config.update("jax_enable_x64", was)


def test_softmax_cross_entropy_jitted_labels_of_every_width():
    """Inside jax.jit the labels are traced: no range check, but any integer width."""
    jax = require_or_skip("jax")
    backend = conv2d.get_backend("jax")
    logits = backend.asarray(np.random.default_rng(1).standard_normal((4, 3)), dtype="float32")
    step = jax.jit(lambda z, y: nn.softmax_cross_entropy(z, y)[0])
    reference = float(nn.softmax_cross_entropy(logits, np.array([2, 0, 1, 1]))[0])
    for dtype in ("int8", "uint16", "int32"):
        assert float(step(logits, backend.asarray(np.array([2, 0, 1, 1], dtype=dtype)))) == pytest.approx(reference)


# --------------------------------------------------------------------------------------------
# A whole network: Sequential against the same network in PyTorch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", applicable_to_all(algorithm_names("auto"), [
    make_geometry((4, 2, 8, 8), (4, 2, 3, 3), None, padding=1), make_geometry((4, 4, 4, 4), (5, 4, 3, 3), None, padding=1)]))
def test_sequential_network_against_torch(backend, algorithm):
    """conv -> relu -> max-pool -> conv -> relu -> avg-pool -> flatten -> dense -> softmax CE:
    dE/dX and every layer's SGD update equal PyTorch autograd on the same network (float64), with
    "auto" (torch's own convolution on torch) and each of our algorithms that computes its layers."""
    seq = nn.Sequential(
        [
            conv2d.ConvolutionLayer((2, 8, 8), (3, 3), 4, padding=1, activation="relu", seed=1, backend=backend,
                                    algorithm=algorithm),
            nn.MaxPoolLayer((4, 8, 8), 2, backend=backend),
            conv2d.ConvolutionLayer((4, 4, 4), (3, 3), 5, padding=1, activation="relu", seed=2, backend=backend,
                                    algorithm=algorithm),
            nn.AvgPoolLayer((5, 4, 4), 2, backend=backend),
            nn.FlattenLayer(),
            nn.DenseLayer(20, 3, seed=3, backend=backend),
        ]
    )
    conv_a, _, conv_b, _, _, dense = seq.layers
    rng = np.random.default_rng(9)
    for conv in (conv_a, conv_b):  # larger than the initial 0.1, so relu and the pools have work to do
        conv.weights = backend.asarray(rng.normal(0, 0.5, tuple(conv.weights.shape)), dtype="float64")
    params = [(_np(backend, layer.weights), _np(backend, layer.biases)) for layer in (conv_a, conv_b, dense)]
    X = rng.standard_normal((4, 2, 8, 8))
    labels = np.array([2, 0, 1, 2])

    logits = seq.forwardpass(X)
    loss, grad = nn.softmax_cross_entropy(logits, labels)
    lr = 0.5
    grad_x = seq.backwardpass(lr, X, grad)

    xt = _t(X)
    tp = [(_t(w), _t(b)) for w, b in params]
    h = F.max_pool2d(torch.relu(F.conv2d(xt, *tp[0], padding=1)), 2)
    h = F.avg_pool2d(torch.relu(F.conv2d(h, *tp[1], padding=1)), 2)
    out = F.linear(torch.flatten(h, 1), *tp[2])
    expected_loss = F.cross_entropy(out, torch.tensor(labels))
    expected_loss.backward()
    assert_close(backend, logits, out.detach().numpy(), "float64", "logits")
    assert_close(backend, loss, expected_loss.detach().numpy(), "float64", "loss")
    assert_close(backend, grad_x, xt.grad.numpy(), "float64", "dE/dX")
    for (w0, b0), (wt, bt), layer in zip(params, tp, (conv_a, conv_b, dense), strict=True):
        name = type(layer).__name__
        assert_close(NUMPY, (w0 - _np(backend, layer.weights)) / lr, wt.grad.numpy(), "float64", f"{name} dW")
        assert_close(NUMPY, (b0 - _np(backend, layer.biases)) / lr, bt.grad.numpy(), "float64", f"{name} db")


def test_sequential_errors():
    seq = nn.Sequential([nn.FlattenLayer()])
    with pytest.raises(RuntimeError, match="forwardpass first"):
        seq.backwardpass(0.1, np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="at least one layer"):
        nn.Sequential([])


@pytest.mark.parametrize("source", CPU_BACKENDS)
def test_inputs_from_another_library_are_moved(source):
    """A pool or dense layer on NumPy accepts any library's arrays and answers in NumPy."""
    require_or_skip(source)
    src = conv2d.get_backend(source)
    X = np.random.default_rng(1).standard_normal((2, 1, 4, 4))
    pool = nn.MaxPoolLayer((1, 4, 4), 2, backend="numpy")
    out = pool.forwardpass(src.asarray(X))
    assert isinstance(out, np.ndarray)
    assert isinstance(pool.backwardpass(0.1, X, src.asarray(np.ones((2, 1, 2, 2)))), np.ndarray)
    dense = nn.DenseLayer(4, 2, seed=0, backend="numpy")
    assert isinstance(dense.forwardpass(src.asarray(X.reshape(2, 16)[:, :4])), np.ndarray)

"""conv2d.optim against torch.optim, given the same gradients over several steps, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
import conv2d.optim
from conv2d import nn

from .conftest import require_or_skip
from .oracle import assert_close

torch = require_or_skip("torch")

STEPS = 4
CASES = {
    "sgd": (conv2d.optim.SGD, torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum-decay": (conv2d.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "adam": (conv2d.optim.Adam, torch.optim.Adam, dict(lr=0.01)),
    "adam-betas-decay": (conv2d.optim.Adam, torch.optim.Adam,
                         dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
}


def _network(backend, dtype="float64") -> nn.Sequential:
    return nn.Sequential([
        conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 3, activation="tanh", dtype=dtype, seed=0, backend=backend),
        nn.FlattenLayer(),
        nn.DenseLayer(27, 4, dtype=dtype, seed=1, backend=backend),
    ])


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_torch(backend, case):
    """Each step, given random gradients (some steps only some parameters), gives torch.optim's parameters."""
    ours, theirs, options = CASES[case]
    net = _network(backend)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in net.state_dict().items()}
    optimizer, reference = ours(**options), theirs(list(leaves.values()), **options)
    rng = np.random.default_rng(11)
    for step in range(STEPS):
        # At step 2 one parameter gets no gradient: torch skips it, and so must we (state untouched).
        names = [k for k in leaves if not (step == 2 and k == "0.biases")]
        grads = {k: rng.standard_normal(tuple(leaves[k].shape)) for k in names}
        for k, leaf in leaves.items():
            leaf.grad = torch.tensor(grads[k]) if k in grads else None
        reference.step()
        optimizer.step(net, {k: backend.asarray(g) for k, g in grads.items()})
        for k, value in net.parameters().items():
            assert backend.owns(value)
            assert_close(backend, value, leaves[k].detach().numpy(), "float64", f"step {step}: {k}")


@pytest.mark.parametrize("case", ["sgd-momentum-decay", "adam"])
def test_optimizer_float32(cpu_backend, case):
    """float32 parameters stay float32 and follow torch.optim to float32 accuracy."""
    ours, theirs, options = CASES[case]
    net = _network(cpu_backend, "float32")
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in net.state_dict().items()}
    optimizer, reference = ours(**options), theirs(list(leaves.values()), **options)
    rng = np.random.default_rng(12)
    for _step in range(STEPS):
        grads = {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in leaves.items()}
        for k, leaf in leaves.items():
            leaf.grad = torch.tensor(grads[k])
        reference.step()
        optimizer.step(net, {k: cpu_backend.asarray(g) for k, g in grads.items()})
    for k, value in net.parameters().items():
        assert cpu_backend.to_numpy(value).dtype == np.float32
        assert_close(cpu_backend, value, leaves[k].detach().numpy().astype(np.float64), "float32", k)


def test_plain_sgd_step_is_backwardpass_bitwise(cpu_backend):
    """SGD(lr) on backward's gradients is the layers' own backwardpass update, bit for bit."""
    x = np.random.default_rng(5).standard_normal((3, 2, 5, 5))
    delta = np.random.default_rng(6).standard_normal((3, 4))
    stepped, whole = _network(cpu_backend), _network(cpu_backend)
    stepped.forwardpass(x)
    conv2d.optim.SGD(0.25).step(stepped, stepped.backward(x, delta)[1])
    whole.forwardpass(x)
    whole.backwardpass(0.25, x, delta)
    for k, value in whole.parameters().items():
        np.testing.assert_array_equal(cpu_backend.to_numpy(stepped.parameters()[k]), cpu_backend.to_numpy(value))


def test_step_checks_the_gradients():
    net = _network("numpy")
    params = net.parameters()
    optimizer = conv2d.optim.Adam()
    with pytest.raises(KeyError, match="1.weights"):
        optimizer.step(net, {"1.weights": params["0.weights"]})
    with pytest.raises(ValueError, match=r"grads\['2.biases'\] has shape \(3,\)"):
        optimizer.step(net, {"2.biases": np.ones(3)})
    with pytest.raises(TypeError, match=r"grads\['2.biases'\]"):
        optimizer.step(net, {"2.biases": torch.ones(4, dtype=torch.float64)})
    with pytest.raises(TypeError, match=r"grads\['2.biases'\].*float32"):
        optimizer.step(net, {"2.biases": np.ones(4, dtype=np.float32)})
    assert optimizer.state == {} and all(net.parameters()[k] is v for k, v in params.items())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: conv2d.optim.SGD(-0.1), "lr must be a finite number >= 0"),
        (lambda: conv2d.optim.SGD(0.1, momentum=float("nan")), "momentum must be"),
        (lambda: conv2d.optim.Adam(betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()
    with pytest.raises(TypeError, match="eps must be a real number such as 0.1, got str '1e-8'"):
        conv2d.optim.Adam(eps="1e-8")


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgd_momentum_keeps_no_reference_to_the_callers_gradients(cpu_backend, weight_decay):
    """Gradients zeroed in place after step (to accumulate the next batch) leave the momentum buffer alone:
    the second step equals torch.optim.SGD's (the buffer was the caller's array: 0.13 off)."""
    if cpu_backend.name == "jax":
        pytest.skip("JAX arrays cannot be changed in place")
    options = dict(lr=0.1, momentum=0.9, weight_decay=weight_decay)
    net = _network(cpu_backend)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in net.state_dict().items()}
    optimizer, reference = conv2d.optim.SGD(**options), torch.optim.SGD(list(leaves.values()), **options)
    rng = np.random.default_rng(13)
    for step in range(2):
        grads = {k: rng.standard_normal(tuple(v.shape)) for k, v in leaves.items()}
        for k, leaf in leaves.items():
            leaf.grad = torch.tensor(grads[k])
        reference.step()
        ours = {k: cpu_backend.xp.asarray(cpu_backend.asarray(g), copy=True) for k, g in grads.items()}
        optimizer.step(net, ours)
        for grad in ours.values():
            grad[...] = 0  # the caller's array, reused for the next batch
        for k, value in net.parameters().items():
            assert_close(cpu_backend, value, leaves[k].detach().numpy(), "float64", f"step {step}: {k}")


@pytest.mark.parametrize("make", [
    lambda: np.float32(0.01), lambda: np.float64(0.01), lambda: np.int64(1), lambda: np.array(0.01),
    lambda: np.array(0.01, dtype=np.float32), lambda: torch.tensor(0.01), lambda: torch.tensor(0.01).double(),
])
def test_hyperparameters_accept_real_scalars(make):
    """NumPy scalars, 0-d arrays and torch scalar tensors are numbers: each becomes a Python float."""
    value = make()
    for optimizer in (conv2d.optim.SGD(value, momentum=value, weight_decay=value),
                      conv2d.optim.Adam(value, betas=(value * 0, value * 0), eps=value, weight_decay=value)):
        assert type(optimizer.lr) is float and optimizer.lr == float(value)
        assert type(optimizer.weight_decay) is float


@pytest.mark.parametrize("value, message", [
    (True, "lr must be a real number such as 0.1, got the bool True"),
    (np.bool_(True), "lr must be a real number.*bool"),
    (np.array(True), "lr must be a real number.*0-d array of dtype bool"),
    (1 + 2j, "lr must be a real number.*complex"),
    (np.array(0.1 + 0j), "lr must be a real number.*0-d array of dtype complex128"),
    (np.array([0.1]), "lr must be a real number.*ndarray"),
    ("0.1", "lr must be a real number.*str '0.1'"),
    (None, "lr must be a real number.*NoneType"),
])
def test_hyperparameters_refuse_what_is_not_a_real_scalar(value, message):
    with pytest.raises(TypeError, match=message):
        conv2d.optim.SGD(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, np.float32("nan"), torch.tensor(-1.0)])
def test_hyperparameters_refuse_negative_or_non_finite(value):
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got"):
        conv2d.optim.SGD(value)

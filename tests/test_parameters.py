"""Gradients apart from the update, parameter replacement, state dicts and pickling, on every backend.

Oracles: PyTorch's functional layers and autograd in float64 (the gradients ``backward`` returns);
the layer's own ``backward`` plus ``p - lr * grad`` (``backwardpass``, bit for bit); a fresh Python
process (pickling).
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

import conv2d
from conv2d import nn

from .conftest import CPU_BACKENDS, require_or_skip
from .oracle import assert_close

torch = require_or_skip("torch")
F = torch.nn.functional


def _network(backend, dtype="float64", seed=0) -> nn.Sequential:
    """conv (relu, padded) -> max-pool -> conv (tanh, stride 2) -> avg-pool -> flatten -> dense (sigmoid)."""
    kw = {"dtype": dtype, "backend": backend}
    return nn.Sequential([
        conv2d.ConvolutionLayer((2, 8, 8), (3, 3), 4, padding=1, activation="relu", seed=seed, **kw),
        nn.MaxPoolLayer((4, 8, 8), 2, backend=backend),
        conv2d.ConvolutionLayer((4, 4, 4), (2, 2), 3, 1, activation="tanh", seed=seed + 1, **kw),
        nn.AvgPoolLayer((3, 3, 3), 2, 1, backend=backend),
        nn.FlattenLayer(),
        nn.DenseLayer(12, 5, activation="sigmoid", seed=seed + 2, **kw),
    ])


def _torch_network(state, x):
    """The same network in PyTorch, from a state dict of host arrays; returns (output, leaf tensors)."""
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in state.items()}
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    h = F.relu(F.conv2d(xt, leaves["0.weights"], leaves["0.biases"], padding=1))
    h = F.max_pool2d(h, 2)
    h = torch.tanh(F.conv2d(h, leaves["2.weights"], leaves["2.biases"]))
    h = F.avg_pool2d(h, 2, 1).flatten(1)
    out = torch.sigmoid(F.linear(h, leaves["5.weights"], leaves["5.biases"]))
    return out, xt, leaves


def _host(backend, params):
    return {k: np.array(backend.to_numpy(v)) for k, v in params.items()}


def test_parameters_keys(backend):
    net = _network(backend)
    assert list(net.parameters()) == ["0.weights", "0.biases", "2.weights", "2.biases", "5.weights", "5.biases"]
    for index in (1, 3, 4):
        assert net.layers[index].parameters() == {}
    assert net.parameters()["2.weights"] is net.layers[2].weights


def test_backward_matches_torch_autograd_and_changes_nothing(backend):
    """dE/dX and every gradient equal PyTorch autograd's; the parameters stay as they were, bit for bit."""
    net = _network(backend)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 8, 8))
    before = net.state_dict()
    out = net.forwardpass(backend.asarray(x))
    delta = rng.standard_normal((3, 5))
    delta_prev, grads = net.backward(x, backend.asarray(delta))
    out_t, xt, leaves = _torch_network(before, x)
    out_t.backward(torch.tensor(delta))
    assert_close(backend, out, out_t.detach().numpy(), "float64", "forward")
    assert_close(backend, delta_prev, xt.grad.numpy(), "float64", "dE/dX")
    assert list(grads) == list(net.parameters())
    for key, grad in grads.items():
        assert backend.owns(grad)
        assert_close(backend, grad, leaves[key].grad.numpy(), "float64", key)
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"backward changed {key}")


def test_backwardpass_is_backward_then_sgd_bitwise(backend):
    """backwardpass gives, bit for bit, backward's dE/dX and ``p - lr * grad`` (the seed's update)."""
    dtype = "float32"  # where a careless scalar would promote; float64 is the same code
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 2, 8, 8)).astype(dtype)
    delta = rng.standard_normal((3, 5)).astype(dtype)
    lr = np.float64(0.3)  # a NumPy scalar, as callers pass: it must not promote float32 parameters
    by_parts, whole = _network(backend, dtype), _network(backend, dtype)
    by_parts.forwardpass(x)
    delta_prev, grads = by_parts.backward(x, delta)
    expected = {k: p - float(lr) * grads[k] for k, p in by_parts.parameters().items()}
    whole.forwardpass(x)
    got = whole.backwardpass(lr, x, delta)
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(delta_prev))
    for key, value in whole.parameters().items():
        assert backend.to_numpy(value).dtype == np.dtype(dtype)
        np.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(expected[key]), err_msg=key)


def test_set_parameters_checks_all_before_replacing(backend):
    net = _network(backend)
    params = net.parameters()
    good = backend.asarray(np.ones(tuple(params["0.biases"].shape)))
    with pytest.raises(KeyError, match="7.weights"):
        net.set_parameters({"7.weights": good})
    with pytest.raises(ValueError, match=r"2\.biases must have shape \(3,\)"):
        net.set_parameters({"0.biases": good, "2.biases": backend.asarray(np.ones(4))})
    with pytest.raises(TypeError, match=r"0\.biases has dtype \S*float32 but the layer computes in \S*float64"):
        net.set_parameters({"0.biases": backend.asarray(np.ones(4, dtype=np.float32))})
    if backend.name != "numpy":
        with pytest.raises(TypeError, match=r"0\.biases is a numpy array but the layer lives on"):
            net.set_parameters({"0.biases": np.ones(4)})
    assert net.parameters()["0.biases"] is params["0.biases"]  # nothing replaced by the failed calls
    net.set_parameters({"0.biases": good})
    assert net.layers[0].biases is good


def test_state_dict_is_host_copies_and_loads_across_backends(backend):
    """A network's state dict loads into a NumPy network, which then gives the same outputs."""
    net = _network(backend)
    x = np.random.default_rng(1).standard_normal((3, 2, 8, 8))
    net.forwardpass(x)
    net.backwardpass(0.5, x, np.ones((3, 5)))  # trained away from the seeded weights
    state = net.state_dict()
    assert all(type(v) is np.ndarray for v in state.values())
    state["0.weights"][...] = 0.0  # a copy: the layer keeps its weights
    assert float(np.abs(backend.to_numpy(net.layers[0].weights)).max()) > 0
    on_numpy = _network("numpy", seed=10)
    on_numpy.load_state_dict(net.state_dict())
    assert_close(backend, net.forwardpass(x), on_numpy.forwardpass(x), "float64", "outputs after loading")
    back = _network(backend, seed=20)
    back.load_state_dict(on_numpy.parameters())  # another library's arrays load too
    for key, value in back.parameters().items():
        assert backend.owns(value)
        np.testing.assert_array_equal(backend.to_numpy(value), on_numpy.parameters()[key])


def test_load_state_dict_errors_name_the_key():
    net = _network("numpy")
    state = net.state_dict()
    with pytest.raises(KeyError, match="2.biases"):
        net.load_state_dict({k: v for k, v in state.items() if k != "2.biases"})
    with pytest.raises(KeyError, match="9.weights"):
        net.load_state_dict({**state, "9.weights": state["0.weights"]})
    with pytest.raises(ValueError, match=r"state\['5.weights'\] has shape \(5, 11\)"):
        net.load_state_dict({**state, "5.weights": state["5.weights"][:, 1:]})
    with pytest.raises(TypeError, match=r"state\['0.weights'\] has dtype float32"):
        net.load_state_dict({**state, "0.weights": state["0.weights"].astype(np.float32)})
    with pytest.raises(KeyError, match="weights"):
        net.layers[5].load_state_dict({"weights": state["5.weights"]})
    np.testing.assert_array_equal(net.state_dict()["5.weights"], state["5.weights"])  # unchanged


def test_backend_pickles_as_its_registry_object(backend):
    assert pickle.loads(pickle.dumps(backend)) is backend


def test_layers_pickle_without_forward_state(backend):
    """Every layer and the network round-trip through pickle, predict identically and keep no saved batch."""
    net = _network(backend, "float32")
    x = np.random.default_rng(2).standard_normal((3, 2, 8, 8)).astype(np.float32)
    out = backend.to_numpy(net.forwardpass(x))
    copy = pickle.loads(pickle.dumps(net))
    assert copy._inputs is None
    assert all(getattr(layer, "_saved", None) is None and getattr(layer, "_shape", None) is None for layer in copy.layers)
    assert all(getattr(layer, "backend", backend) is backend for layer in copy.layers)
    with pytest.raises(RuntimeError, match="needs a forwardpass first"):
        copy.backwardpass(0.1, x, out)
    np.testing.assert_array_equal(backend.to_numpy(copy.forwardpass(x)), out)
    for layer in net.layers:
        layer_copy = pickle.loads(pickle.dumps(layer))
        assert type(layer_copy) is type(layer)
        for key, value in layer_copy.parameters().items():
            assert backend.owns(value)
            np.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(layer.parameters()[key]))


_PREDICT = """
import pickle, sys
import numpy as np
nets = pickle.load(open(sys.argv[1], "rb"))
x = np.load(sys.argv[2])
outs = {name: net.layers[0].backend.to_numpy(net.forwardpass(x)) for name, net in nets.items()}
np.savez(sys.argv[3], **outs)
"""


def test_pickled_network_predicts_identically_in_a_fresh_process(tmp_path):
    """Networks of every CPU backend, pickled after a training step, predict bit for bit the same in a new process."""
    x = np.random.default_rng(4).standard_normal((3, 2, 8, 8)).astype(np.float32)
    nets, expected = {}, {}
    for spec in CPU_BACKENDS:  # one process for all: each start imports torch and JAX
        try:
            backend = conv2d.get_backend(spec)
        except conv2d.BackendUnavailableError:
            continue
        net = nets[spec] = _network(backend, "float32")
        net.forwardpass(x)
        net.backwardpass(0.2, x, np.ones((3, 5), dtype=np.float32))
        expected[spec] = backend.to_numpy(net.forwardpass(x))
    (tmp_path / "nets.pkl").write_bytes(pickle.dumps(nets))
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", _PREDICT, str(tmp_path / "nets.pkl"), str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz", allow_pickle=False) as outs:
        assert sorted(outs.files) == sorted(expected)
        for spec, out in expected.items():
            np.testing.assert_array_equal(outs[spec], out, err_msg=spec)

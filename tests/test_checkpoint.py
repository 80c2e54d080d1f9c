"""conv2d.nn.save / conv2d.nn.load: JSON architecture plus .npz state, read back on any backend.

Oracle: the saved network's own outputs (and, across backends, to the float tolerance of assert_close).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import conv2d
from conv2d import nn
from conv2d._geometry import make_geometry

from .algorithms import algorithm_names, applicable_to_all
from .oracle import assert_close

# The two convolutions of _network, for the algorithms that compute both.
_LAYERS = [make_geometry((3, 2, 7, 7), (3, 2, 2, 3), None, padding="same"),
           make_geometry((3, 3, 3, 3), (4, 3, 2, 2), None, stride=(1, 2), padding=(1, 0), dilation=(2, 1))]


def _network(backend, dtype="float32", algorithm="auto") -> nn.Sequential:
    kw = {"dtype": dtype, "backend": backend, "algorithm": algorithm}
    return nn.Sequential([
        conv2d.ConvolutionLayer((2, 7, 7), (2, 3), 3, padding="same", activation="tanh", seed=0, **kw),
        nn.AvgPoolLayer((3, 7, 7), 3, 2, backend=backend),
        conv2d.ConvolutionLayer((3, 3, 3), (2, 2), 4, (1, 2), padding=(1, 0), dilation=(2, 1), activation=None,
                                seed=1, **kw),
        nn.MaxPoolLayer((4, 3, 1), (2, 1), backend=backend),
        nn.Sequential([nn.FlattenLayer(), nn.DenseLayer(4, 3, activation="relu", seed=2, dtype=dtype, backend=backend)]),
    ])


@pytest.mark.parametrize("algorithm", applicable_to_all(algorithm_names("auto"), _LAYERS))
def test_save_and_load_on_every_backend(backend, tmp_path, algorithm):
    """A trained network saved from any backend (its convolutions by each algorithm that computes them)
    loads on NumPy and on its own backend, predicting the same."""
    net = _network(backend, algorithm=algorithm)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 7, 7)).astype(np.float32)
    net.forwardpass(x)
    net.backwardpass(0.5, x, rng.standard_normal((3, 3)).astype(np.float32))  # away from the seeded weights
    expected = net.forwardpass(x)
    folder = nn.save(net, tmp_path / "model")
    assert json.loads((folder / "architecture.json").read_text())["network"] == net.architecture()
    same = nn.load(folder, backend=backend)
    assert same.architecture() == net.architecture()
    for layer in (same.layers[0], same.layers[2]):  # a file cannot choose the algorithm: the caller does
        layer.algorithm = algorithm
    np.testing.assert_array_equal(backend.to_numpy(same.forwardpass(x)), backend.to_numpy(expected))
    on_numpy = nn.load(folder, backend="numpy")
    assert_close(backend, expected, on_numpy.forwardpass(x).astype(np.float64), "float32", "NumPy copy")
    with conv2d.use_backend(backend):  # the default: the active backend
        assert nn.load(folder).layers[0].backend is backend


def test_load_rejects_what_is_not_a_conv2d_network(tmp_path):
    net = _network("numpy", "float64")
    folder = nn.save(net, tmp_path / "m")
    document = json.loads((folder / "architecture.json").read_text())

    def write(network=None, **top):
        (folder / "architecture.json").write_text(json.dumps({**document, **top, "network": network or document["network"]}))

    write(format="pickle")
    with pytest.raises(ValueError, match="is not a conv2d.nn network"):
        nn.load(folder)
    write({"type": "Sequential", "layers": [{"type": "os.system", "command": "echo"}]})
    with pytest.raises(ValueError, match=r"network.layers\[0\]: expected a layer"):
        nn.load(folder)
    bad = json.loads(json.dumps(document["network"]))
    bad["layers"][2]["numfilters"] = 5
    write(bad)
    with pytest.raises(ValueError, match=r"state\['2.weights'\] has shape \(4, 3, 2, 2\), the layer needs \(5, 3, 2, 2\)"):
        nn.load(folder)
    bad["layers"][2]["numfilters"] = 4
    bad["layers"][2]["backend"] = "torch"
    write(bad)
    with pytest.raises(ValueError, match=r"network.layers\[2\]: cannot build ConvolutionLayer.*backend"):
        nn.load(folder)
    (folder / "state.npz").unlink()
    with pytest.raises(FileNotFoundError, match="state.npz"):
        nn.load(folder)

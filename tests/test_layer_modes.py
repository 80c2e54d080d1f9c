"""ConvolutionLayer(padding_mode=..., data_format=...) against torch.nn.Conv2d, and through nn.save/nn.load."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import conv2d
from conv2d import nn
from tests.modes_oracle import assert_close, first, last

from .conftest import require_or_skip

torch = require_or_skip("torch")

# (padding_mode, data_format, stride, padding, dilation): every mode, both layouts, "same" with an even kernel.
CASES = [
    ("reflect", "NHWC", 1, "same", 1),
    ("replicate", "NCHW", 2, (2, 1), 1),
    ("circular", "NHWC", (1, 2), 3, (2, 1)),
    ("zeros", "NHWC", 1, 1, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def test_layer_matches_torch(cpu_backend, case):
    mode, layout, stride, padding, dilation = case
    kernel = (4, 3) if padding == "same" else (3, 3)
    layer = conv2d.ConvolutionLayer((2, 7, 6), kernel, 3, stride, padding=padding, dilation=dilation, activation=None,
                                    seed=1, backend=cpu_backend, padding_mode=mode, data_format=layout)
    reference = torch.nn.Conv2d(2, 3, kernel, stride, padding, dilation, padding_mode=mode, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(cpu_backend.to_numpy(layer.weights)))
        reference.bias.copy_(torch.tensor(cpu_backend.to_numpy(layer.biases)))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 7, 6))
    xt = torch.tensor(x, requires_grad=True)
    with warnings.catch_warnings():  # PyTorch warns that asymmetric "same" padding costs it a copy
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        y_ref = reference(xt)
    g = rng.standard_normal(tuple(y_ref.shape))
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (xt, reference.weight, reference.bias), torch.tensor(g))
    to, back = (last, first) if layout == "NHWC" else (np.asarray, np.asarray)
    X = cpu_backend.asarray(to(x))
    out = layer.forwardpass(X)
    assert (layer.out_row, layer.out_col) == tuple(y_ref.shape[2:])
    assert_close(back(cpu_backend.to_numpy(out)), y_ref.detach().numpy(), "float64", "output")
    grad_x, grads = layer.backward(X, cpu_backend.asarray(to(g)))
    assert_close(back(cpu_backend.to_numpy(grad_x)), gx_ref.numpy(), "float64", "grad_x")
    assert_close(cpu_backend.to_numpy(grads["weights"]), gw_ref.numpy(), "float64", "grad_w")
    assert_close(cpu_backend.to_numpy(grads["biases"]), gb_ref.numpy(), "float64", "grad_b")


def test_save_load_round_trip(tmp_path):
    net = nn.Sequential([
        conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, padding=1, padding_mode="circular", data_format="NHWC", seed=0),
        conv2d.ConvolutionLayer((3, 6, 6), (2, 2), 2, padding="same", padding_mode="reflect", data_format="NHWC", seed=1),
    ])
    x = np.random.default_rng(3).standard_normal((2, 6, 6, 2))
    nn.save(net, tmp_path)
    spec = json.loads((tmp_path / "architecture.json").read_text())
    assert [layer.get("padding_mode") for layer in spec["network"]["layers"]] == ["circular", "reflect"]
    loaded = nn.load(tmp_path)
    assert [(layer.padding_mode, layer.data_format) for layer in loaded.layers] == [("circular", "NHWC"), ("reflect", "NHWC")]
    np.testing.assert_array_equal(loaded.forwardpass(x), net.forwardpass(x))


def test_default_layer_writes_no_new_keys(tmp_path):
    """Files of default layers stay as before, readable by earlier versions."""
    nn.save(conv2d.ConvolutionLayer((1, 4, 4), (3, 3), 1, seed=0), tmp_path)
    spec = json.loads((tmp_path / "architecture.json").read_text())
    assert "padding_mode" not in spec["network"] and "data_format" not in spec["network"] and spec["network"]["padding"] == [0, 0]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(padding=4, padding_mode="reflect"), ValueError, r"padding_mode='reflect' needs each padding smaller than the input height"),
    (dict(padding_mode="wrap"), ValueError, r"padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular'"),
    (dict(data_format="CHWN"), ValueError, r"data_format must be 'NCHW' or 'NHWC'"),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        conv2d.ConvolutionLayer((1, 4, 4), (3, 3), 1, **kwargs)


def test_nhwc_shape_errors():
    layer = conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 3, data_format="NHWC", seed=0)
    with pytest.raises(ValueError, match=r"X must have shape \(n, 5, 5, 2\), got \(1, 2, 5, 5\) \(the layer's data_format='NHWC'"):
        layer.forwardpass(np.zeros((1, 2, 5, 5)))
    layer.forwardpass(np.zeros((1, 5, 5, 2)))
    with pytest.raises(ValueError, match=r"delta must have the forward output's shape \(1, 3, 3, 3\) \(N, H, W, O\)"):
        layer.backward(np.zeros((1, 5, 5, 2)), np.zeros((1, 3, 3, 4)))

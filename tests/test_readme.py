"""Every Python block of README.md runs as written (NumPy, the default backend), and its claims hold."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from array_api_compat import is_array_api_obj

from .conftest import require_or_skip

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number, tmp_path, monkeypatch):
    """A block that used names it never defined (X, labels) failed for every reader who pasted it."""
    monkeypatch.chdir(tmp_path)  # a block that saves a network writes here, not into the checkout
    namespace: dict = {"__name__": "__main__"}  # as a pasted script runs, main guard included
    exec(compile(BLOCKS[number], f"README.md python block {number}", "exec"), namespace)
    # Every block leaves arrays (NumPy's, JAX's or PyTorch's), all finite: no NaN from a misused example.
    arrays = [np.asarray(value.detach() if hasattr(value, "detach") else value)  # a tensor that requires grad
              for value in namespace.values() if is_array_api_obj(value)]
    assert arrays and all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")


def test_readme_block_results_are_what_the_comments_say():
    """The example's stated shapes and the network's loss: the blocks compute what they claim."""
    first: dict = {"__name__": "readme_example"}
    exec(compile(BLOCKS[0], "README.md python block 0", "exec"), first)
    assert first["y"].shape == (8, 16, 32, 32) and first["grad_x"].shape == first["x"].shape
    second: dict = {"__name__": "readme_network"}
    network = next(block for block in BLOCKS if "softmax_cross_entropy(logits" in block)
    exec(compile(network, "README.md network block", "exec"), second)
    assert second["logits"].shape == (32, 10) and 0 < float(second["loss"]) < 10


def test_readme_family_block_matches_pytorch():
    """The convolution family's block: each line's result is PyTorch's (the last one, complex, is checked)."""
    torch = require_or_skip("torch")
    block = next(block for block in BLOCKS if "conv_transpose2d" in block)
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("y = "))
    namespace: dict = {"__name__": "readme_family"}
    exec(compile("\n".join(lines[:first]), "README.md family block", "exec"), namespace)
    x, w = namespace["x"], namespace["w"]
    F = torch.nn.functional
    expected = {
        "circular": F.conv2d(F.pad(torch.tensor(x), (1, 1, 1, 1), mode="circular"), torch.tensor(w)).numpy(),
        "NHWC": F.conv2d(torch.tensor(x), torch.tensor(w), padding=1).numpy().transpose(0, 2, 3, 1),
    }
    results = []
    for line in lines[first:]:
        exec(compile(line, "README.md family block", "exec"), namespace)
        results.append(np.asarray(namespace["y"]))
    np.testing.assert_allclose(results[0], expected["circular"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(results[1], expected["NHWC"], rtol=1e-10, atol=1e-10)
    assert results[2].shape == (8, 3, 14, 14) and results[3].shape == (8, 4, 100)
    xc = torch.tensor(x + 1j * x)
    np.testing.assert_allclose(results[4], F.conv2d(xc, torch.tensor(w + 0j), padding=1).numpy(), rtol=1e-10, atol=1e-10)


def test_readme_torch_block_computes_the_weight_gradient():
    """The PyTorch block's autograd reaches the weights through conv2d.conv2d."""
    torch = require_or_skip("torch")
    block = next(block for block in BLOCKS if "import torch" in block)
    namespace: dict = {"__name__": "readme_torch"}
    exec(compile(block, "README.md torch block", "exec"), namespace)
    w = namespace["w"]
    expected = torch.autograd.grad(
        torch.nn.functional.conv2d(namespace["x"], w, padding=1).square().sum(), w)[0]
    assert w.grad is not None and torch.allclose(w.grad, expected, rtol=1e-4, atol=1e-3)

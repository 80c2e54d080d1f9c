"""conv2d inside PyTorch's machinery: autograd through conv2d.conv2d, and torch.compile with fullgraph=True.

Oracle: torch.nn.functional.conv2d and its autograd gradients, float64, random data. torch.compile uses
the "aot_eager" backend (Dynamo and AOT autograd, no C++ compilation: inductor takes tens of seconds);
the compiled graph is the same, conv2d being one custom operator in it.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import conv2d

from .conftest import require_or_skip

torch = require_or_skip("torch")
F = torch.nn.functional

OPTIONS = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)


def _leaves(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((batch, 4, 9, 8), (6, 2, 3, 3), (6,))
    return [torch.tensor(rng.standard_normal(shape), requires_grad=True) for shape in shapes]


def _target(batch):
    """A random weighting of the output (made outside the compiled function, which sees it as an input)."""
    return torch.tensor(np.random.default_rng(batch).standard_normal((batch, 6, 5, 8)))


def _loss(conv, x, w, b, target):
    return (torch.tanh(conv(x, w, b, **OPTIONS)) * target).sum()


def _grads(conv, leaves):
    loss = _loss(conv, *leaves, _target(leaves[0].shape[0]))
    return [loss, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("algorithm", ["gather", "slices"])
def test_autograd_through_conv2d_matches_torch(algorithm):
    leaves = _leaves()
    ours = _grads(functools.partial(conv2d.conv2d, algorithm=algorithm), leaves)
    for got, expected in zip(ours, _grads(F.conv2d, leaves), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_no_graph_break():
    """Forward and gradients under torch.compile(fullgraph=True) equal F.conv2d's, at two batch sizes."""
    def step(x, w, b, target):
        return _loss(conv2d.conv2d, x, w, b, target)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*_leaves(), _target(2))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for batch in (2, 3):  # the second compiles with a symbolic batch size
        leaves = _leaves(batch, seed=batch)
        loss = compiled(*leaves, _target(batch))
        ours = [loss, *torch.autograd.grad(loss, leaves)]
        for got, expected in zip(ours, _grads(F.conv2d, leaves), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_torch_compile_conv2d_backward():
    x, w, _ = (t.detach() for t in _leaves())
    grad_out = torch.tensor(np.random.default_rng(4).standard_normal((2, 6, 5, 8)))
    compiled = torch.compile(functools.partial(conv2d.conv2d_backward, **OPTIONS), fullgraph=True, backend="aot_eager")
    x.requires_grad_(True)
    w.requires_grad_(True)
    expected = torch.autograd.grad(F.conv2d(x, w, **OPTIONS), (x, w), grad_out)
    grad_x, grad_w, grad_b = compiled(grad_out, x.detach(), w.detach())
    torch.testing.assert_close(grad_x, expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_w, expected[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, grad_out.sum(dim=(0, 2, 3)), rtol=1e-10, atol=1e-12)

"""The plan caches are bounded in bytes (CONV2D_PLAN_CACHE), and conv2d.clear_caches() empties them."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d

from .oracle import assert_close, torch_conv


@pytest.fixture(autouse=True)
def _empty_caches():
    conv2d.clear_caches()
    yield
    conv2d.clear_caches()


def test_each_backend_keeps_at_most_the_limit_in_bytes(cpu_backend, monkeypatch):
    """Twelve geometries used to stay cached whatever their size (+469 MiB on NumPy, +953 MiB on torch
    for 16x256..267x256..267): a cache counted entries, not bytes."""
    monkeypatch.setenv("CONV2D_PLAN_CACHE", "300KB")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 4, 3, 3))
    for h in range(20, 32):  # plans of 4*9*h*h int32: 58 KB to 138 KB each, 1.1 MB in all
        x = rng.standard_normal((2, 4, h, h))
        y = conv2d.conv2d(cpu_backend.asarray(x), cpu_backend.asarray(w), padding=1, algorithm="gather")
        assert 0 < cpu_backend._constants.nbytes <= 300_000, (h, cpu_backend._constants.nbytes)
    assert_close(cpu_backend, y, torch_conv(x, w, np.zeros(3), padding=1)[0], "float64", "y")
    conv2d.clear_caches()
    assert cpu_backend._constants.nbytes == 0


def test_a_plan_larger_than_the_limit_is_used_not_kept(monkeypatch):
    monkeypatch.setenv("CONV2D_PLAN_CACHE", "0")
    numpy = conv2d.get_backend("numpy")
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 3, 9, 7)), rng.standard_normal((4, 3, 2, 3))
    y = conv2d.conv2d(x, w, stride=(2, 1), padding=1, algorithm="gather")
    assert numpy._constants.nbytes == 0
    assert_close(numpy, y, torch_conv(x, w, np.zeros(4), stride=(2, 1), padding=1)[0], "float64", "y")


def test_a_kept_plan_is_built_once():
    numpy = conv2d.get_backend("numpy")
    built = []

    def make():
        built.append(1)
        return np.arange(10, dtype=np.int32)

    first, second = numpy.constant(("test", 1), make), numpy.constant(("test", 1), make)
    assert first is second and len(built) == 1 and numpy._constants.nbytes == 40


@pytest.mark.parametrize("value", ["lots", "-1MB"])
def test_a_bad_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("CONV2D_PLAN_CACHE", value)
    x, w = np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2))
    with pytest.raises(ValueError, match=rf"CONV2D_PLAN_CACHE environment variable must be a size.*{value!r}"):
        conv2d.conv2d(x, w, algorithm="gather")

"""Cache-sized chunks: the CPU cache size read from the OS, and the chunks sized from it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conv2d import _conv
from conv2d._geometry import make_geometry
from conv2d._workspace import plan_chunks
from conv2d.backends import _cpu_cache

from .oracle import assert_close, torch_conv


def _write_cache(root, index: int, level: str, kind: str, size: str) -> None:
    folder = root / f"index{index}"
    folder.mkdir()
    for name, text in (("level", level), ("type", kind), ("size", size)):
        (folder / name).write_text(text + "\n")


@pytest.fixture
def fake_sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(_cpu_cache, "_SYSFS", tmp_path)
    _cpu_cache.l2_cache_bytes.cache_clear()
    yield tmp_path
    _cpu_cache.l2_cache_bytes.cache_clear()


def test_l2_size_is_read_from_sysfs(fake_sysfs):
    _write_cache(fake_sysfs, 0, "1", "Data", "48K")
    _write_cache(fake_sysfs, 1, "1", "Instruction", "32K")
    _write_cache(fake_sysfs, 2, "2", "Unified", "2048K")
    _write_cache(fake_sysfs, 3, "3", "Unified", "32M")
    assert _cpu_cache.l2_cache_bytes() == 2048 * 2**10


@pytest.mark.parametrize("size", ["", "junk", "0K"])
def test_an_unreadable_l2_size_falls_back(fake_sysfs, size):
    _write_cache(fake_sysfs, 0, "2", "Unified", size)
    assert _cpu_cache.l2_cache_bytes() == _cpu_cache.FALLBACK_L2_BYTES


def test_no_cache_description_falls_back(fake_sysfs):
    assert _cpu_cache.l2_cache_bytes() == _cpu_cache.FALLBACK_L2_BYTES


@pytest.mark.parametrize("cache", [1, 20_000, 40_000, 10**9])
def test_chunks_hold_the_samples_that_fit_the_cache_evenly_and_never_split_rows(cpu_backend, cache):
    backend = dataclasses.replace(cpu_backend, cache_bytes=cache)
    geom = make_geometry((7, 3, 9, 8), (4, 3, 3, 3), None, padding=1)
    itemsize, limit = 8, 2**30
    per_sample = itemsize * 3 * 9 * geom.out_h * geom.out_w  # 15,552 bytes of patches
    chunks = plan_chunks(geom, 7, itemsize, _conv.cache_limit(backend, geom, 7, itemsize, limit))
    sizes = [c.stop - c.start for c in chunks]
    assert all((c.row_start, c.row_stop) == (0, geom.out_h) for c in chunks)
    assert sum(sizes) == 7 and max(sizes) - min(sizes) <= 1
    fitting = max(1, cache // per_sample)
    assert max(sizes) <= fitting
    assert len(chunks) == -(-7 // fitting)


def test_the_workspace_limit_stays_the_upper_bound(cpu_backend):
    backend = dataclasses.replace(cpu_backend, cache_bytes=10**9)
    geom = make_geometry((7, 3, 9, 8), (4, 3, 3, 3), None, padding=1)
    assert _conv.cache_limit(backend, geom, 7, 8, 5000) == 5000
    assert _conv.cache_limit(dataclasses.replace(cpu_backend, cache_bytes=None), geom, 7, 8, 5000) == 5000


def test_cache_sized_chunks_give_pytorchs_results(cpu_backend):
    """A cache of a few samples' patches splits the batch; forward and gradients still match PyTorch."""
    backend = dataclasses.replace(cpu_backend, cache_bytes=3 * 8 * 4 * 3 * 3 * 8 * 7)  # 3 samples' patches
    kw = dict(stride=1, padding=(1, 0), dilation=1, groups=2)
    geom = make_geometry((8, 4, 8, 9), (6, 2, 3, 3), (6,), **kw)
    assert len(_conv._chunks(backend, backend.asarray(np.zeros((8, 1, 1, 1))), geom, 2**30)) == 3
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal((8, 4, 8, 9)), rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6)
    g = rng.standard_normal((8, 6, geom.out_h, geom.out_w))
    X, W, B, G = (backend.asarray(a) for a in (x, w, b, g))
    y, cols = _conv.forward(backend, X, W, B, geom, "slices", 2**30)
    assert cols is None  # split: the patches are rebuilt per chunk in the backward pass
    grads = _conv.backward(backend, G, X, W, geom, "slices", 2**30)
    for name, actual, expected in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, *grads),
                                      torch_conv(x, w, b, g, **kw)):
        assert_close(backend, actual, expected, "float64", name)

"""Backend.scatter_add on every backend: duplicates accumulate, against a NumPy bincount oracle."""

from __future__ import annotations

import numpy as np
import pytest


def _scatter_case(case: str, rng: np.random.Generator, n: int = 50):
    if case == "many-duplicates":
        indices = rng.integers(0, n, 5000)
    elif case == "one-index-1000-times":
        indices = np.full(1000, 7)
    elif case == "mixed":
        indices = np.concatenate([rng.integers(0, n, 5000), np.full(1000, 7), np.arange(n)])
        rng.shuffle(indices)
    elif case == "empty":
        indices = np.zeros(0, dtype=np.int64)
    elif case == "permutation":
        indices = rng.permutation(n)
    else:
        raise AssertionError(case)
    return indices


SCATTER_CASES = ["many-duplicates", "one-index-1000-times", "mixed", "empty", "permutation"]


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", SCATTER_CASES)
def test_scatter_add_matches_bincount(backend, case, dtype, index_dtype):
    rng = np.random.default_rng(SCATTER_CASES.index(case))
    n = 50
    indices = _scatter_case(case, rng, n)
    values = rng.standard_normal(indices.size).astype(dtype)
    target = (rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)).astype(dtype)  # random, never zero

    expected = target.astype(np.float64) + np.bincount(indices, weights=values.astype(np.float64), minlength=n)
    # A bound on the rounding of any summation order in `dtype`, plus the float64 prefix sums
    # that the array-API-only scatter subtracts.
    eps = np.finfo(dtype).eps
    count = np.bincount(indices, minlength=n)
    magnitude = np.abs(target.astype(np.float64)) + np.bincount(indices, weights=np.abs(values.astype(np.float64)), minlength=n)
    tolerance = eps * (count + 2) * magnitude + 4 * np.finfo(np.float64).eps * indices.size * np.abs(values).sum()

    result = backend.scatter_add(
        backend.asarray(target.copy(), dtype=dtype),
        backend.asarray(indices.astype(index_dtype)),
        backend.asarray(values.copy(), dtype=dtype),
    )
    assert backend.owns(result)
    assert result.dtype == backend.dtype(dtype)
    got = backend.to_numpy(result)
    assert got.shape == (n,)
    error = np.abs(got.astype(np.float64) - expected)
    assert np.all(error <= tolerance), f"worst error {error.max()} at {error.argmax()}, allowed {tolerance[error.argmax()]}"
    if case == "empty":
        np.testing.assert_array_equal(got, target, strict=True)


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scatter_add_is_exact_on_small_integers(backend, dtype, index_dtype):
    """Integer-valued floats add exactly in any order: every duplicate must count, exactly once."""
    rng = np.random.default_rng(5)
    n = 50
    indices = np.concatenate([rng.integers(0, n, 5000), np.full(1000, 13)])
    rng.shuffle(indices)
    values = rng.integers(-8, 9, indices.size).astype(dtype)
    target = rng.integers(1, 50, n).astype(dtype) * rng.choice([-1, 1], n).astype(dtype)
    expected = (target.astype(np.int64) + np.bincount(indices, weights=values, minlength=n).astype(np.int64)).astype(dtype)
    result = backend.scatter_add(
        backend.asarray(target.copy()), backend.asarray(indices.astype(index_dtype)), backend.asarray(values.copy())
    )
    np.testing.assert_array_equal(backend.to_numpy(result), expected, strict=True)

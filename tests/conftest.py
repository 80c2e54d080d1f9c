"""The `backend` fixture: every backend this machine can run, GPU ones skipped with the reason; and the
hypothesis profiles: "ci" (loaded by default: fixed examples, reproducible) and "thorough" (10x the
examples, freshly random each run), chosen with ``--hypothesis-profile=thorough``."""

from __future__ import annotations

import os

# JAX turns float64 into float32 unless told otherwise; the float64 tests need the real thing.
os.environ.setdefault("JAX_ENABLE_X64", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import conv2d  # noqa: E402
from conv2d.backends import BackendUnavailableError  # noqa: E402

# The properties run on small arrays but compile (JAX) or call PyTorch per example: no deadline.
# "ci" is derandomized (the examples are a function of the test alone) and keeps no example database,
# so every CI run checks the same inputs; tests scale their own max_examples with this profile's.
settings.register_profile(
    "ci", max_examples=100, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow], print_blob=True,
)
settings.register_profile(
    "thorough", max_examples=1000, derandomize=False, deadline=None,
    suppress_health_check=[HealthCheck.too_slow], print_blob=True,
)
settings.load_profile("ci")  # --hypothesis-profile=NAME (read after this file) replaces it

CPU_BACKENDS = ["numpy", "array_api_strict", "torch", "jax"]
GPU_BACKENDS = ["cupy", "torch:cuda"]
_LIBRARY = {"numpy": "numpy", "array_api_strict": "array_api_strict", "torch": "torch", "jax": "jax", "cupy": "cupy"}
# CI names the backends that must run, so that a missing install fails instead of skipping to green.
REQUIRED = {name for name in os.environ.get("CONV2D_TEST_REQUIRE", "").split(",") if name}


def _get(spec: str) -> conv2d.Backend:
    library = _LIBRARY[spec.split(":")[0]]
    if spec in REQUIRED:
        return conv2d.get_backend(spec)
    pytest.importorskip(library)
    try:
        return conv2d.get_backend(spec)
    except BackendUnavailableError as exc:
        pytest.skip(f"{spec}: {exc}")


@pytest.fixture(params=[*CPU_BACKENDS, *[pytest.param(s, marks=pytest.mark.gpu) for s in GPU_BACKENDS]])
def backend(request) -> conv2d.Backend:
    """Each backend in turn: NumPy, array-api-strict, torch (CPU), JAX, then CuPy and torch on CUDA."""
    return _get(request.param)


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request) -> conv2d.Backend:
    return _get(request.param)


@pytest.fixture(autouse=True)
def _fresh_selector(monkeypatch):
    """No test sees another's set_backend() or CONV2D_BACKEND."""
    monkeypatch.delenv("CONV2D_BACKEND", raising=False)
    conv2d.set_backend(None)
    yield
    conv2d.set_backend(None)

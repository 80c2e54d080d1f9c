"""The `backend` fixture: every backend this machine can run, GPU ones skipped with the reason; and the
hypothesis profiles: "ci" (loaded by default: fixed examples, reproducible) and "thorough" (10x the
examples, freshly random each run), chosen with ``--hypothesis-profile=thorough``.

Two environment variables choose what runs:

- ``CONV2D_TEST_BACKENDS=cupy,torch:cuda`` (comma list of backend specs; default: every CPU and GPU
  backend below) restricts the suite to those backends: `backend` is parametrized over them only,
  `cpu_backend` over those of them that run on the CPU (NumPy alone when none does, so that the
  CPU-only tests still run once), and a test that asks for another backend by name through `_get`
  (the per-backend property tests) is skipped. A GPU machine runs the GPU backends without spending
  its time on the CPU ones (ci/gpu-check).
- ``CONV2D_TEST_REQUIRE=numpy,torch,...`` turns a backend that is missing (library not installed, no
  device), or an optional dependency that does not import (dask, distributed, sklearn, matplotlib, numba,
  threadpoolctl, hypothesis; see :func:`require_or_skip`), from a skip into a failure, so that CI
  cannot go green by skipping. A required backend that ``CONV2D_TEST_BACKENDS`` leaves out is an
  error at start-up rather than a silent skip.
"""

from __future__ import annotations

import dataclasses
import os

# JAX turns float64 into float32 unless told otherwise; the float64 tests need the real thing.
os.environ.setdefault("JAX_ENABLE_X64", "1")
# JAX compiles every operation for every new shape, and the suite's hundreds of small geometries made
# compiling most of its time. Without LLVM's backend optimisations XLA compiles them about 3x faster
# (measured: 8 geometries, both algorithms, forward and backward, 97 s -> 29 s on the busy 2-core
# machine); the HLO, hence what is computed, is the same. Set XLA_FLAGS yourself to test otherwise.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
# JAX keeps what it compiled in .pytest_cache (git-ignored), so a later run skips most compiling (measured:
# the 8 geometries above 16 s -> 7 s warm, 19 s cold). Set JAX_COMPILATION_CACHE_DIR yourself to move it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the suite's compiles are many and small
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# One BLAS/OpenMP thread (NumPy's OpenBLAS, torch): the suite's arrays are tiny, so more threads cost more
# in hand-offs than they save, and on a shared machine they wait for each other (measured on the busy
# 2-core machine: test_layer.py + test_nn.py 15 s -> 9-11 s, half the CPU time). Set any of these
# variables yourself to test with other thread counts.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_ONE_THREAD = not any(name in os.environ for name in _THREAD_VARIABLES)
if _ONE_THREAD:
    os.environ.update(dict.fromkeys(_THREAD_VARIABLES, "1"))  # libraries loaded from now on, subprocesses

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import conv2d  # noqa: E402
from conv2d import _conv  # noqa: E402
from conv2d.backends import BackendUnavailableError  # noqa: E402

if _ONE_THREAD:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # and the libraries loaded before this file (NumPy, by pytest's plugins)

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


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


# CI names the backends that must run, so that a missing install fails instead of skipping to green.
REQUIRED = set(_env_list("CONV2D_TEST_REQUIRE"))
# None: no restriction. Otherwise the specs to test, in the order given.
SELECTED: list[str] | None = _env_list("CONV2D_TEST_BACKENDS") or None


def require_or_skip(module: str):
    """``import module`` for a test that needs an optional dependency: the module, or a skip where it does
    not import, or a failure (the ImportError) where ``CONV2D_TEST_REQUIRE`` names it (or its top-level
    package: "dask" covers "dask.array"). Use it instead of ``pytest.importorskip``, at module level too."""
    if module in REQUIRED or module.split(".")[0] in REQUIRED:
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module)


def _on_cpu(spec: str) -> bool:
    """Whether `spec` names a CPU backend: a plain library name of CPU_BACKENDS, or a ``:cpu`` device."""
    return spec in CPU_BACKENDS or spec.endswith(":cpu")


def _selection_errors() -> list[str]:
    """What is wrong with CONV2D_TEST_BACKENDS and CONV2D_TEST_REQUIRE together (empty: nothing)."""
    if SELECTED is None:
        return []
    errors = [f"CONV2D_TEST_BACKENDS: {spec!r} is not a backend spec of {', '.join(_LIBRARY)}"
              for spec in SELECTED if spec.split(":")[0] not in _LIBRARY]
    errors += [f"CONV2D_TEST_REQUIRE names {spec!r}, which CONV2D_TEST_BACKENDS={','.join(SELECTED)} leaves out"
               for spec in sorted(REQUIRED - set(SELECTED)) if spec.split(":")[0] in _LIBRARY]  # not host_compiler
    return errors


def pytest_configure(config) -> None:
    # A typo in either variable would otherwise test less than asked and still pass.
    errors = _selection_errors()
    if errors:
        raise pytest.UsageError("; ".join(errors))


def _load(spec: str) -> conv2d.Backend:
    """The backend `spec`; skipped with the reason where its library or device is missing, unless required."""
    library = _LIBRARY[spec.split(":")[0]]
    if spec in REQUIRED:
        return conv2d.get_backend(spec)
    require_or_skip(library)
    try:
        return conv2d.get_backend(spec)
    except BackendUnavailableError as exc:
        pytest.skip(f"{spec}: {exc}")


def _get(spec: str) -> conv2d.Backend:
    """The backend `spec` for a test that names it; skipped where CONV2D_TEST_BACKENDS leaves it out."""
    if SELECTED is not None and spec not in SELECTED:
        pytest.skip(f"{spec}: not in CONV2D_TEST_BACKENDS={','.join(SELECTED)}")
    return _load(spec)


def _params(specs: list[str]) -> list:
    # GPU specs carry the gpu marker, so that `-m "not gpu"` leaves them out.
    return [spec if _on_cpu(spec) else pytest.param(spec, marks=pytest.mark.gpu) for spec in specs]


_BACKEND_SPECS = [*CPU_BACKENDS, *GPU_BACKENDS] if SELECTED is None else SELECTED
_CPU_BACKEND_SPECS = CPU_BACKENDS if SELECTED is None else [s for s in SELECTED if _on_cpu(s)] or ["numpy"]


@pytest.fixture(params=_params(_BACKEND_SPECS))
def backend(request) -> conv2d.Backend:
    """Each backend in turn: NumPy, array-api-strict, torch (CPU), JAX, then CuPy and torch on CUDA
    (or those of CONV2D_TEST_BACKENDS)."""
    return _load(request.param)


@pytest.fixture(params=_CPU_BACKEND_SPECS)
def cpu_backend(request) -> conv2d.Backend:
    """Each CPU backend in turn (those of CONV2D_TEST_BACKENDS; NumPy where it names none)."""
    return _load(request.param)


@pytest.fixture
def without_compiled_kernels(monkeypatch):
    """The registry's CPU backends as they are where Numba is not installed: NumPy without its compiled
    kernels (``Backend.kernels`` None), for the tests of that path; restored after the test."""
    from conv2d import backends as registry

    for spec in _CPU_BACKEND_SPECS:
        conv2d.get_backend(spec)
    for key, backend in list(registry._built.items()):
        if backend.kernels is not None and backend.name == "numpy":
            monkeypatch.setitem(registry._built, key, dataclasses.replace(backend, kernels=None))


@pytest.fixture(autouse=True)
def _fresh_selector(monkeypatch):
    """No test sees another's set_backend() or CONV2D_BACKEND."""
    monkeypatch.delenv("CONV2D_BACKEND", raising=False)
    conv2d.set_backend(None)
    yield
    conv2d.set_backend(None)


def _position(values: list, value: object) -> int:
    """Where `value` (a parameter, the very object; or a tuple of them) is in the module's list of them.
    (pytest's ``callspec.indices`` counts the combined parametrizations, not the place in one list.)"""
    def same(a: object, b: object) -> bool:
        if isinstance(a, tuple) and isinstance(b, tuple):
            return len(a) == len(b) and all(x is y or (isinstance(x, str) and x == y) for x, y in zip(a, b))
        return a is b
    return next(i for i, candidate in enumerate(values) if same(candidate, value))


_BACKENDS_SEEN: dict[str, conv2d.Backend | None] = {}


def _backend_lacks(spec: str, algorithm: str) -> bool:
    """Whether backend `spec` cannot run `algorithm` on any layer (``kernels`` without device kernels,
    ``native`` without the library's convolution). Unknown where the backend does not load here: its
    items stay, and its fixture skips (or, where required, fails) them."""
    if spec not in _BACKENDS_SEEN:
        try:
            _BACKENDS_SEEN[spec] = conv2d.get_backend(spec)
        except Exception:
            _BACKENDS_SEEN[spec] = None
    backend = _BACKENDS_SEEN[spec]
    return backend is not None and algorithm != "auto" and not _conv.applicable(algorithm, backend)


# Under the default profile JAX runs one item in JAX_SHARE of each test (and at least one per algorithm);
# a test module may choose its own JAX items instead with ``jax_keeps(test_name, params) -> bool | None``
# (None: the default for that test).
JAX_SHARE = 3


def one_layer_in_three(test: str, name: str, layers: list, params: dict) -> bool | None:
    """A module's ``jax_keeps`` for test `name` over `layers`: layer ``3k`` in float64 where ``k`` is even
    and in float32 where it is odd (a third of the layers, both dtypes); None (the default) for other tests."""
    if test != name:
        return None
    place = next(i for i, layer in enumerate(layers) if layer is params["layer"])
    return place % 3 == 0 and (place // 3 + (params["dtype"] == "float32")) % 2 == 0


def _spread(group: list) -> list:
    """The items of one test that JAX runs by default: one in :data:`JAX_SHARE`, and each algorithm's first."""
    seen: set = set()
    kept = []
    for index, item in enumerate(group):
        algorithm = item.callspec.params.get("algorithm")
        if index % JAX_SHARE == 0 or (algorithm is not None and algorithm not in seen):
            kept.append(item)
        seen.add(algorithm)
    return kept


def _jax_default_items(on_jax: list) -> set[int]:
    """ids of the JAX items the default profile runs: per module's ``jax_keeps`` where it has one, else
    :func:`_spread` over each test's items (a test with fewer than JAX_SHARE of them runs them all)."""
    groups: dict[tuple[str, str], list] = {}
    for item in on_jax:
        groups.setdefault((item.module.__name__, item.originalname), []).append(item)
    kept: set[int] = set()
    for group in groups.values():
        keeps = getattr(group[0].module, "jax_keeps", lambda test, params: None)
        answers = [keeps(item.originalname, item.callspec.params) for item in group]
        chosen = _spread(group) if None in answers else [item for item, keep in zip(group, answers) if keep]
        kept.update(map(id, chosen))
    return kept


def pytest_collection_modifyitems(config, items) -> None:
    """Leaves out the (algorithm, backend) items where the backend cannot run the algorithm at all, and,
    under the default profile, most of JAX's items.

    An item with an ``algorithm`` parameter and a ``backend`` or ``cpu_backend`` one whose backend lacks
    what the algorithm needs (tests/algorithms.py) is not an oracle item: it is deselected rather than
    skipped or passed (test_oracle.py's ``test_inapplicable_pairs_raise`` checks those pairs raise).

    JAX compiles every new shape of every operation: from a cold compile cache it took three quarters of
    the suite's time (about 770 of 1000 s). By default it runs one item in :data:`JAX_SHARE` of each test
    parametrized over backends, and every algorithm's first (:func:`_spread`), or the items the test's
    module picks with ``jax_keeps``: every other backend runs every item, every algorithm still runs on
    JAX, and the ``thorough`` profile runs everything. Left out items are reported as deselected, not skipped.
    """
    thorough = config.getoption("hypothesis_profile", None) == "thorough"
    kept, dropped, on_jax = [], [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        params = spec.params if spec is not None else {}
        backend_spec = str(params.get("backend", params.get("cpu_backend", "")))
        if "algorithm" in params and backend_spec != "" and _backend_lacks(backend_spec, params["algorithm"]):
            dropped.append(item)
            continue
        kept.append(item)
        if backend_spec.split(":")[0] == "jax":
            on_jax.append(item)
    if not thorough and on_jax:
        chosen = _jax_default_items(on_jax)
        dropped += [item for item in on_jax if id(item) not in chosen]
        jax_ids = set(map(id, on_jax))
        kept = [item for item in kept if id(item) in chosen or id(item) not in jax_ids]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept

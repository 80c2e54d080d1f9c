"""The backend selector: specs, errors, CONV2D_BACKEND, precedence, threads, import hygiene, and
moving arrays between backends (asarray, to_numpy). scatter_add has its own file."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from array_api_compat import device as device_of

import conv2d
import conv2d.backends as registry
from conv2d import BackendUnavailableError

from .conftest import require_or_skip

CPU_SPECS = ["numpy", "torch", "jax", "array_api_strict"]
_LIBRARY = {"numpy": "numpy", "torch": "torch", "jax": "jax", "array_api_strict": "array_api_strict"}


def _need(spec: str) -> conv2d.Backend:
    """The backend `spec`, skipping the test where its library is not installed."""
    name = spec.split(":")[0].strip().lower().replace("-", "_")
    require_or_skip(_LIBRARY[name])
    return conv2d.get_backend(spec)


def _device(spec: str):
    """The library's own device object that `spec` must land on."""
    name, _, device = spec.partition(":")
    if name == "numpy":
        return "cpu"
    if name == "torch":
        import torch

        return torch.device("cpu")
    if name == "jax":
        import jax

        return jax.devices("cpu")[0]
    import array_api_strict

    return array_api_strict.Device(device or "CPU_DEVICE")


def _usable(spec: str) -> bool:
    try:
        conv2d.get_backend(spec)
    except BackendUnavailableError:
        return False
    return True


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (this one's), with CONV2D_BACKEND unset unless given."""
    full_env = {k: v for k, v in os.environ.items() if k != "CONV2D_BACKEND"}
    full_env.update(env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=120
    )
    assert result.returncode == 0, f"subprocess failed:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# --------------------------------------------------------------------------------------------
# Valid specs
# --------------------------------------------------------------------------------------------

# (spec as typed, registry name, canonical spec, spec whose device it must be on)
VALID = [
    ("numpy", "numpy", "numpy", "numpy"),
    ("numpy:cpu", "numpy", "numpy", "numpy"),
    ("torch", "torch", "torch:cpu", "torch"),
    ("torch:cpu", "torch", "torch:cpu", "torch"),
    ("jax", "jax", "jax:cpu:0", "jax"),
    ("jax:cpu", "jax", "jax:cpu:0", "jax"),
    ("jax:cpu:0", "jax", "jax:cpu:0", "jax"),
    ("array_api_strict", "array_api_strict", "array_api_strict", "array_api_strict"),
    ("array-api-strict", "array_api_strict", "array_api_strict", "array_api_strict"),
    ("array_api_strict:device1", "array_api_strict", "array_api_strict:device1", "array_api_strict:device1"),
    # Whitespace around the spec and the case of the library name do not matter.
    ("  numpy  ", "numpy", "numpy", "numpy"),
    ("NumPy", "numpy", "numpy", "numpy"),
    ("NUMPY:cpu", "numpy", "numpy", "numpy"),
    ("\tTorch:cpu\n", "torch", "torch:cpu", "torch"),
    (" JAX:cpu:0 ", "jax", "jax:cpu:0", "jax"),
    ("Array-API-Strict", "array_api_strict", "array_api_strict", "array_api_strict"),
    ("ARRAY_API_STRICT:device1", "array_api_strict", "array_api_strict:device1", "array_api_strict:device1"),
    ("torch : cpu", "torch", "torch:cpu", "torch"),
]


@pytest.mark.parametrize(("spec", "name", "canonical", "device_of"), VALID, ids=[repr(v[0]) for v in VALID])
def test_valid_spec(spec, name, canonical, device_of):
    if name != "numpy":
        require_or_skip(_LIBRARY[name])
    backend = conv2d.get_backend(spec)
    assert isinstance(backend, conv2d.Backend)
    assert backend.name == name
    assert backend.spec == canonical
    assert backend.device == _device(device_of)
    # Asking again gives the same object; the canonical spec selects the same library and device
    # (that it is the same *object* too is test_same_library_and_device_give_the_same_object...).
    assert conv2d.get_backend(spec) is backend
    again = conv2d.get_backend(backend.spec)
    assert (again.name, again.spec, again.device) == (backend.name, backend.spec, backend.device)
    # A Backend object is its own spec.
    assert conv2d.get_backend(backend) is backend


@pytest.mark.parametrize("spec", ["auto", "AUTO", "  Auto "])
def test_auto_is_cupy_where_it_works_else_numpy(spec):
    expected = conv2d.get_backend("cupy") if _usable("cupy") else conv2d.get_backend("numpy")
    assert conv2d.get_backend(spec) is expected


# Pairs of specs naming one library on one device: each must give one object, whichever is asked first.
SAME_BACKEND = [
    ("numpy", "numpy:cpu"),
    ("torch", "torch:cpu"),
    ("jax", "jax:cpu"),
    ("jax", "jax:cpu:0"),
    ("jax:cpu", "jax:cpu:0"),
    ("array_api_strict", "array-api-strict"),
    ("array_api_strict", "array_api_strict:CPU_DEVICE"),
    ("numpy", "auto"),
]


@pytest.mark.parametrize("first_second", [*SAME_BACKEND, *[(b, a) for a, b in SAME_BACKEND]], ids=repr)
def test_same_library_and_device_give_the_same_object_in_either_order(monkeypatch, first_second):
    """get_backend promises "the same object for the same library and device", whichever spec
    is asked for first; a fresh registry makes the order of this test the order that counts."""
    first, second = first_second
    for spec in first_second:
        if spec != "auto":
            _need(spec)
    if "auto" in first_second and _usable("cupy"):
        pytest.skip("auto is cupy here")
    monkeypatch.setattr(registry, "_built", {})
    a = conv2d.get_backend(first)
    b = conv2d.get_backend(second)
    assert a is b, f"get_backend({first!r}) is not get_backend({second!r}): specs {a.spec!r} and {b.spec!r}"


@pytest.mark.parametrize("spec", ["numpy", "torch", "jax", "array_api_strict", "array_api_strict:device1"])
@pytest.mark.parametrize("array_first", [True, False], ids=["array-first", "spec-first"])
def test_backend_of_an_array_is_the_backend_that_made_it(monkeypatch, spec, array_first):
    """The backend recognised from an array is the object get_backend gives for its device."""
    backend = _need(spec)
    array = backend.asarray(np.zeros(3))
    monkeypatch.setattr(registry, "_built", {})
    if array_first:
        found = registry.backend_of(array)
        asked = conv2d.get_backend(spec)
    else:
        asked = conv2d.get_backend(spec)
        found = registry.backend_of(array)
    assert found is asked, f"{found.spec!r} vs {asked.spec!r}"


# --------------------------------------------------------------------------------------------
# Bad specs and their messages
# --------------------------------------------------------------------------------------------

CHOICES = "numpy, cupy, torch, jax, array_api_strict, auto"


@pytest.mark.parametrize("spec", ["nope", "", "tensorflow", "torch cpu", "np", ":cpu"])
def test_unknown_name_names_the_value_and_lists_the_choices(spec):
    with pytest.raises(ValueError, match=re.escape(f"unknown conv2d backend {spec!r} (from get_backend()); choose one of: ")) as info:
        conv2d.get_backend(spec)
    assert CHOICES in str(info.value)


@pytest.mark.parametrize("spec", [3, 1.5, b"numpy", ["numpy"], object()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("entry", ["get_backend", "set_backend", "use_backend"])
def test_non_string_spec_is_a_type_error(spec, entry):
    with pytest.raises(TypeError, match=rf"backend spec from {entry}\(\) must be a string.*got {type(spec).__name__}"):
        if entry == "use_backend":
            with conv2d.use_backend(spec):
                pass
        else:
            getattr(conv2d, entry)(spec)


@pytest.mark.parametrize("spec", ["auto:1", "auto:cpu", "AUTO:cuda"])
def test_auto_takes_no_device(spec):
    with pytest.raises(ValueError, match=rf"backend 'auto' takes no device, got {spec!r}"):
        conv2d.get_backend(spec)


def _check_unavailable_message(message: str, spec: str, source: str = "get_backend()") -> None:
    assert f"conv2d backend {spec!r} (from {source}) cannot be used here" in message
    assert "Usable here: numpy" in message
    assert "CONV2D_BACKEND=NAME or conv2d.set_backend('NAME')" in message


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("numpy:gpu", r"NumPy runs on the CPU only, got device 'gpu'; use 'numpy' or 'numpy:cpu'"),
        ("numpy:cuda:0", r"NumPy runs on the CPU only, got device 'cuda:0'"),
        ("array_api_strict:nope", r"array-api-strict has no device 'nope'; its devices are \[.*'device1'.*\]"),
        ("torch:nope", r"'nope' is not a torch device .*use e.g. 'torch:cpu', 'torch:cuda'"),
        ("jax:cpu:7", r"JAX has no device 'cpu:7'; it has \['cpu:0'.*\]"),
    ],
)
def test_unusable_device_names_spec_reason_and_fix(spec, reason):
    _need(spec.split(":")[0])
    with pytest.raises(BackendUnavailableError, match=reason) as info:
        conv2d.get_backend(spec)
    _check_unavailable_message(str(info.value), spec)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("spec", ["torch:cuda", "torch:cuda:0", "torch:cuda:1"])
def test_torch_cuda_without_cuda(spec):
    torch = require_or_skip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailableError, match="this PyTorch build sees no CUDA device") as info:
        conv2d.get_backend(spec)
    _check_unavailable_message(str(info.value), spec)
    assert "a CUDA build of PyTorch" in str(info.value)


@pytest.mark.parametrize("spec", ["cupy", "cupy:0", "CuPy"])
def test_cupy_without_cupy_suggests_the_cuda_extra(spec):
    if _usable("cupy"):
        pytest.skip("cupy works here")
    with pytest.raises(BackendUnavailableError) as info:
        conv2d.get_backend(spec)
    message = str(info.value)
    _check_unavailable_message(message, spec)
    assert "pip install 'conv2d[cuda12]'" in message
    if importlib.util.find_spec("cupy") is None:
        assert "CuPy is not installed" in message


@pytest.mark.parametrize("spec", ["jax:gpu", "jax:gpu:0", "jax:cuda"])
def test_jax_gpu_without_gpu(spec):
    jax = require_or_skip("jax")
    if any(d.platform != "cpu" for d in jax.devices()):
        pytest.skip("JAX sees an accelerator here")
    with pytest.raises(BackendUnavailableError, match=r"JAX has no '(gpu|cuda)' devices") as info:
        conv2d.get_backend(spec)
    _check_unavailable_message(str(info.value), spec)
    assert "pip install 'jax[cuda12]'" in str(info.value)


def test_unavailable_error_names_where_the_spec_came_from():
    with pytest.raises(BackendUnavailableError) as info:
        conv2d.set_backend("numpy:gpu")
    _check_unavailable_message(str(info.value), "numpy:gpu", "set_backend()")
    with pytest.raises(BackendUnavailableError) as info, conv2d.use_backend("numpy:gpu"):
        pass
    _check_unavailable_message(str(info.value), "numpy:gpu", "use_backend()")


# --------------------------------------------------------------------------------------------
# CONV2D_BACKEND
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "spec"),
    [
        ("torch", "torch"),
        (" Torch:cpu ", "torch"),
        ("jax", "jax"),
        ("array-api-strict", "array_api_strict"),
        ("array_api_strict:device1", "array_api_strict:device1"),
        ("numpy", "numpy"),
        ("", "numpy"),
        ("   ", "numpy"),
    ],
)
def test_env_var_picks_the_active_backend(monkeypatch, value, spec):
    expected = _need(spec)
    monkeypatch.setenv("CONV2D_BACKEND", value)
    conv2d.set_backend(None)
    active = conv2d.get_backend()
    # Same library and device (whether it is the same *object* as another spelling's is
    # test_same_library_and_device_give_the_same_object_in_either_order's business).
    assert (active.name, active.spec, active.device) == (expected.name, expected.spec, expected.device)
    assert conv2d.get_backend() is active
    # ... and new layers live there.
    layer = conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 2, seed=0)
    assert layer.backend is active
    assert active.owns(layer.weights)
    assert registry.backend_of(layer.weights).spec == expected.spec


def test_env_var_is_read_at_first_use_and_again_after_set_backend_none(monkeypatch):
    """CONV2D_BACKEND is read when a backend is first needed and cached; changing the variable
    later has no effect until set_backend(None) makes the next get_backend() read it again."""
    torch_backend, jax_backend = _need("torch"), _need("jax")
    monkeypatch.setenv("CONV2D_BACKEND", "torch")
    conv2d.set_backend(None)
    assert conv2d.get_backend() is torch_backend  # first use: read
    monkeypatch.setenv("CONV2D_BACKEND", "jax")
    assert conv2d.get_backend() is torch_backend  # cached
    conv2d.set_backend(None)
    assert conv2d.get_backend() is jax_backend  # read again
    monkeypatch.delenv("CONV2D_BACKEND")
    assert conv2d.get_backend() is jax_backend  # still cached
    conv2d.set_backend(None)
    assert conv2d.get_backend() is conv2d.get_backend("numpy")


def test_env_var_is_not_read_at_import():
    """A bad CONV2D_BACKEND neither breaks `import conv2d` nor the functional API (which follows
    its arrays); only asking for the active backend fails, and imports are deferred until then."""
    code = """
        import sys
        import numpy as np
        import conv2d
        heavy = ("torch", "jax", "cupy", "array_api_strict")
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        x = np.ones((1, 1, 4, 4)); w = np.ones((1, 1, 2, 2))
        assert conv2d.conv2d(x, w).shape == (1, 1, 3, 3)
        try:
            conv2d.get_backend()
        except ValueError as exc:
            assert "CONV2D_BACKEND" in str(exc) and "'nope'" in str(exc), exc
        else:
            raise AssertionError("no error")
        print("ok")
    """
    assert _run_python(code, CONV2D_BACKEND="nope").stdout.strip() == "ok"


def test_env_var_names_a_library_that_is_imported_only_when_needed():
    require_or_skip("torch")
    code = """
        import sys
        import conv2d
        assert "torch" not in sys.modules
        assert conv2d.get_backend().spec == "torch:cpu"
        assert "torch" in sys.modules
        print("ok")
    """
    assert _run_python(code, CONV2D_BACKEND="torch").stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        ("nope", ValueError, r"unknown conv2d backend 'nope' \(from the CONV2D_BACKEND environment variable\); choose one of: numpy"),
        ("auto:2", ValueError, r"backend 'auto' takes no device, got 'auto:2' \(from the CONV2D_BACKEND environment variable\)"),
        ("numpy:gpu", BackendUnavailableError, r"'numpy:gpu' \(from the CONV2D_BACKEND environment variable\) cannot be used here"),
        ("array_api_strict:nope", BackendUnavailableError, r"\(from the CONV2D_BACKEND environment variable\).*no device 'nope'"),
    ],
)
def test_bad_env_var_fails_at_get_backend_naming_the_variable(monkeypatch, value, error, pattern):
    monkeypatch.setenv("CONV2D_BACKEND", value)
    conv2d.set_backend(None)
    with pytest.raises(error, match=pattern):
        conv2d.get_backend()
    with pytest.raises(error, match="CONV2D_BACKEND"):  # not cached as a success: fails again
        conv2d.get_backend()
    with pytest.raises(error, match="CONV2D_BACKEND"):
        conv2d.ConvolutionLayer((1, 4, 4), (2, 2), 1)
    # Explicit choices do not consult the variable.
    assert conv2d.get_backend("numpy").name == "numpy"
    with conv2d.use_backend("numpy") as backend:
        assert conv2d.get_backend() is backend
    conv2d.set_backend("numpy")
    assert conv2d.get_backend().name == "numpy"


def test_bad_env_var_cupy_suggests_the_cuda_extra(monkeypatch):
    if _usable("cupy"):
        pytest.skip("cupy works here")
    monkeypatch.setenv("CONV2D_BACKEND", "cupy")
    conv2d.set_backend(None)
    with pytest.raises(BackendUnavailableError, match=r"CONV2D_BACKEND.*pip install 'conv2d\[cuda12\]'"):
        conv2d.get_backend()


# --------------------------------------------------------------------------------------------
# Precedence
# --------------------------------------------------------------------------------------------


def test_precedence_spec_over_use_over_set_over_env_over_default(monkeypatch):
    numpy_b, torch_b, jax_b, strict_b = (_need(s) for s in CPU_SPECS)
    assert conv2d.get_backend() is numpy_b  # default
    monkeypatch.setenv("CONV2D_BACKEND", "jax")
    conv2d.set_backend(None)
    assert conv2d.get_backend() is jax_b  # env over default
    assert conv2d.set_backend("torch") is torch_b
    assert conv2d.get_backend() is torch_b  # set over env
    with conv2d.use_backend("array_api_strict") as active:
        assert active is strict_b
        assert conv2d.get_backend() is strict_b  # use over set
        assert conv2d.get_backend("numpy") is numpy_b  # an explicit spec over everything
        assert conv2d.ConvolutionLayer((1, 4, 4), (2, 2), 1).backend is strict_b
        assert conv2d.ConvolutionLayer((1, 4, 4), (2, 2), 1, backend="numpy").backend is numpy_b
    assert conv2d.get_backend() is torch_b
    assert conv2d.set_backend(None) is None  # clears: back to the env var
    assert conv2d.get_backend() is jax_b
    monkeypatch.delenv("CONV2D_BACKEND")
    conv2d.set_backend(None)
    assert conv2d.get_backend() is numpy_b


def test_set_backend_accepts_a_backend_object():
    torch_b = _need("torch")
    assert conv2d.set_backend(torch_b) is torch_b
    assert conv2d.get_backend() is torch_b
    with conv2d.use_backend(conv2d.get_backend("numpy")) as inner:
        assert inner is conv2d.get_backend("numpy")
        assert conv2d.get_backend() is inner


def test_nested_use_backend_restores_the_outer_one():
    numpy_b, torch_b, jax_b, strict_b = (_need(s) for s in CPU_SPECS)
    conv2d.set_backend("array_api_strict")
    with conv2d.use_backend("torch"):
        assert conv2d.get_backend() is torch_b
        with conv2d.use_backend("jax"):
            assert conv2d.get_backend() is jax_b
            with conv2d.use_backend("torch"):
                assert conv2d.get_backend() is torch_b
            assert conv2d.get_backend() is jax_b
        assert conv2d.get_backend() is torch_b
    assert conv2d.get_backend() is strict_b
    conv2d.set_backend(None)
    assert conv2d.get_backend() is numpy_b


def test_nested_use_backend_restores_the_outer_one_when_the_block_raises():
    numpy_b, torch_b = _need("numpy"), _need("torch")
    with conv2d.use_backend("torch"):
        with pytest.raises(KeyError), conv2d.use_backend("jax"):
            raise KeyError("inside")
        assert conv2d.get_backend() is torch_b
        with pytest.raises(ZeroDivisionError), conv2d.use_backend("numpy"), conv2d.use_backend("array_api_strict"):
            1 / 0  # noqa: B018
        assert conv2d.get_backend() is torch_b
    assert conv2d.get_backend() is numpy_b


def test_use_backend_with_a_bad_spec_fails_on_entry_and_changes_nothing():
    torch_b = _need("torch")
    with conv2d.use_backend("torch"):
        entered = False
        with pytest.raises(ValueError, match=r"unknown conv2d backend 'nope' \(from use_backend\(\)\)"):
            with conv2d.use_backend("nope"):
                entered = True
        assert not entered
        assert conv2d.get_backend() is torch_b


@pytest.mark.parametrize(
    ("bad", "error"),
    [("nope", ValueError), ("auto:1", ValueError), (3, TypeError), ("numpy:gpu", BackendUnavailableError)],
)
def test_set_backend_with_a_bad_spec_fails_at_once_and_keeps_the_previous_choice(monkeypatch, bad, error):
    jax_b, torch_b = _need("jax"), _need("torch")
    monkeypatch.setenv("CONV2D_BACKEND", "jax")
    conv2d.set_backend(None)
    with pytest.raises(error, match="set_backend"):
        conv2d.set_backend(bad)
    assert conv2d.get_backend() is jax_b  # nothing set: still the env var
    conv2d.set_backend("torch")
    with pytest.raises(error, match="set_backend"):
        conv2d.set_backend(bad)
    assert conv2d.get_backend() is torch_b


# --------------------------------------------------------------------------------------------
# Threads and tasks
# --------------------------------------------------------------------------------------------


def _in_threads(targets, barrier: threading.Barrier | None = None):
    """Run each callable in its own thread; re-raise the first exception any of them raised.

    A failing thread breaks `barrier`, so that the others stop waiting for it at once."""
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
                if barrier is not None:
                    barrier.abort()

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "thread hung"
    if errors:
        raise errors[0]


def test_use_backend_is_per_thread_while_threads_overlap():
    backends = [_need(s) for s in CPU_SPECS]
    barrier = threading.Barrier(len(backends), timeout=30)
    seen: dict[str, list] = {}

    def worker(spec):
        def run():
            with conv2d.use_backend(spec) as mine:
                barrier.wait()  # every thread is now inside its own block
                looks = [conv2d.get_backend() for _ in range(50)]
                layer = conv2d.ConvolutionLayer((1, 5, 5), (2, 2), 1, seed=0)
                barrier.wait()  # nobody has left yet
                looks += [conv2d.get_backend() for _ in range(50)]
                seen[spec] = [mine, *looks, layer.backend]
            barrier.wait()  # all have left
            seen[spec].append(conv2d.get_backend())

        return run

    _in_threads([worker(b.spec) for b in backends], barrier)
    numpy_b = conv2d.get_backend("numpy")
    for backend in backends:
        mine, *inside, after = seen[backend.spec]
        assert mine.spec == backend.spec
        assert all(b is mine for b in inside), backend.spec
        assert after is numpy_b


def test_use_backend_in_the_main_thread_does_not_leak_into_a_new_thread():
    torch_b, numpy_b = _need("torch"), _need("numpy")
    seen = []
    with conv2d.use_backend("torch"):
        _in_threads([lambda: seen.append(conv2d.get_backend())])
        assert conv2d.get_backend() is torch_b
    assert seen == [numpy_b]


def test_set_backend_is_process_wide():
    jax_b, torch_b = _need("jax"), _need("torch")
    seen = []
    conv2d.set_backend("jax")
    _in_threads([lambda: seen.append(conv2d.get_backend())])
    assert seen == [jax_b]
    # ... and a thread's set_backend is seen by the main thread, which keeps its own use_backend.
    with conv2d.use_backend("numpy"):
        _in_threads([lambda: conv2d.set_backend("torch")])
        assert conv2d.get_backend().name == "numpy"
    assert conv2d.get_backend() is torch_b


def test_use_backend_is_per_asyncio_task():
    torch_b, jax_b = _need("torch"), _need("jax")

    async def task(spec, others_inside, mine_inside, results):
        with conv2d.use_backend(spec):
            mine_inside.set()
            await others_inside.wait()  # both tasks are inside their blocks now
            await asyncio.sleep(0)
            results[spec] = conv2d.get_backend()

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        results = {}
        await asyncio.gather(task("torch", a, b, results), task("jax", b, a, results))
        return results, conv2d.get_backend()

    results, after = asyncio.run(main())
    assert results == {"torch": torch_b, "jax": jax_b}
    assert after is conv2d.get_backend("numpy")


# --------------------------------------------------------------------------------------------
# available_backends and import hygiene
# --------------------------------------------------------------------------------------------


def test_available_backends():
    report = conv2d.available_backends()
    assert isinstance(report, dict)
    assert set(report) == {"numpy", "cupy", "torch", "jax", "array_api_strict"}
    for name in ("torch", "jax", "array_api_strict"):
        if importlib.util.find_spec(name) is not None:
            assert report[name] is True, (name, report[name])
    assert report["numpy"] is True
    if report["cupy"] is not True:
        assert isinstance(report["cupy"], str)
        assert "pip install 'conv2d[cuda12]'" in report["cupy"]
        if importlib.util.find_spec("cupy") is None:
            assert "CuPy is not installed" in report["cupy"]
    assert (report["cupy"] is True) == _usable("cupy")


_LOADED = (
    "def loaded():\n"
    "    return sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'jax', 'jaxlib', 'cupy', 'array_api_strict'})\n"
)


def test_import_and_numpy_convolution_load_no_other_library():
    code = "import json, sys\n" + _LOADED + textwrap.dedent("""
        import conv2d
        stages = {"import conv2d": loaded()}
        import numpy as np
        rng = np.random.default_rng(0)
        x, w, b = rng.standard_normal((2, 4, 7, 6)), rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6)
        y = conv2d.conv2d(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
        conv2d.conv2d_backward(np.ones_like(y), x, w, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
        stages["conv2d on numpy"] = loaded()
        layer = conv2d.ConvolutionLayer((4, 7, 6), (3, 3), 2, seed=0)
        out = layer.forwardpass(x)
        layer.backwardpass(0.1, x, out)
        conv2d.get_backend(); conv2d.get_backend("numpy:cpu")
        with conv2d.use_backend("numpy"):
            pass
        stages["layer and selector on numpy"] = loaded()
        print(json.dumps(stages))
    """)
    stages = json.loads(_run_python(code).stdout)
    assert stages == {stage: [] for stage in stages}, stages


def test_auto_without_cupy_loads_no_other_library():
    """Falling back from cupy to numpy must not import torch, JAX and array-api-strict (seconds
    of import) just to word an error message nobody sees."""
    if _usable("cupy"):
        pytest.skip("auto is cupy here")
    code = "import json, sys\n" + _LOADED + textwrap.dedent("""
        import conv2d
        assert conv2d.get_backend("auto").name == "numpy"
        print(json.dumps(loaded()))
    """)
    assert set(json.loads(_run_python(code).stdout)) <= {"cupy"}


# --------------------------------------------------------------------------------------------
# asarray / to_numpy
# --------------------------------------------------------------------------------------------

ROUND_TRIP = [*CPU_SPECS, "array_api_strict:device1"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dst", ROUND_TRIP)
@pytest.mark.parametrize("src", ROUND_TRIP)
def test_asarray_round_trip_between_backends(src, dst, dtype):
    source, target = _need(src), _need(dst)
    data = np.random.default_rng(7).standard_normal((3, 4, 5)).astype(dtype)
    a = source.asarray(data.copy())
    b = target.asarray(a)
    assert target.owns(b)
    if source.name != target.name:
        assert not source.owns(b)
    assert device_of(b) == target.device
    back = target.to_numpy(b)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back, data, strict=True)
    assert back.tobytes() == data.tobytes()  # bitwise, signed zeros and all


@pytest.mark.parametrize("name", ["float32", "float64"])
@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_asarray_with_a_dtype_name(spec, name):
    backend = _need(spec)
    rows = np.random.default_rng(3).standard_normal((2, 3))
    array = backend.asarray(rows.tolist(), dtype=name)
    assert array.dtype == backend.dtype(name)
    assert backend.owns(array)
    np.testing.assert_array_equal(backend.to_numpy(array), rows.astype(name), strict=True)
    # From a NumPy array of the other width, the name wins.
    other = "float32" if name == "float64" else "float64"
    converted = backend.asarray(rows.astype(other), dtype=name)
    assert converted.dtype == backend.dtype(name)
    np.testing.assert_array_equal(backend.to_numpy(converted), rows.astype(other).astype(name), strict=True)


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_dtype_with_an_unknown_name_names_it_and_lists_the_choices(spec):
    backend = _need(spec)
    with pytest.raises(TypeError, match=rf"dtype 'float7' is not available on backend {backend.spec!r}; choose one of \[.*'float32'"):
        backend.dtype("float7")


# --------------------------------------------------------------------------------------------
# End to end with CONV2D_BACKEND=array_api_strict
# --------------------------------------------------------------------------------------------


def test_end_to_end_with_env_array_api_strict():
    require_or_skip("array_api_strict")
    code = """
        import numpy as np
        import array_api_strict
        import conv2d
        from conv2d.backends import backend_of

        b = conv2d.get_backend()
        assert b.name == "array_api_strict" and b.spec == "array_api_strict", b.spec
        Array = type(array_api_strict.asarray(0.0))
        ref = conv2d.get_backend("numpy")

        rng = np.random.default_rng(42)
        kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
        xn = rng.standard_normal((3, 4, 9, 8))
        wn = rng.standard_normal((6, 2, 3, 2))
        bn = rng.standard_normal(6)
        x, w, bias = b.asarray(xn), b.asarray(wn), b.asarray(bn)
        assert all(isinstance(a, Array) for a in (x, w, bias))

        y = conv2d.conv2d(x, w, bias, **kw)
        y_ref = conv2d.conv2d(xn, wn, bn, **kw)
        gn = rng.standard_normal(y_ref.shape)
        grads = conv2d.conv2d_backward(b.asarray(gn), x, w, **kw)
        grads_ref = conv2d.conv2d_backward(gn, xn, wn, **kw)
        for got, want in zip((y, *grads), (y_ref, *grads_ref)):
            assert isinstance(got, Array), type(got)
            assert backend_of(got) is b
            np.testing.assert_allclose(b.to_numpy(got), want, rtol=1e-12, atol=1e-12)

        layer = conv2d.ConvolutionLayer((4, 9, 8), (3, 3), 5, 2, padding=1, activation="tanh", seed=3)
        layer_ref = conv2d.ConvolutionLayer((4, 9, 8), (3, 3), 5, 2, padding=1, activation="tanh", seed=3, backend="numpy")
        assert layer.backend is b and layer_ref.backend is ref
        assert isinstance(layer.weights, Array) and isinstance(layer.biases, Array)
        out = layer.forwardpass(x)
        out_ref = layer_ref.forwardpass(xn)
        assert isinstance(out, Array)
        np.testing.assert_allclose(b.to_numpy(out), out_ref, rtol=1e-12, atol=1e-12)
        delta = rng.standard_normal(out_ref.shape)
        dx = layer.backwardpass(0.05, x, b.asarray(delta))
        dx_ref = layer_ref.backwardpass(0.05, xn, delta)
        for got, want in ((dx, dx_ref), (layer.weights, layer_ref.weights), (layer.biases, layer_ref.biases)):
            assert isinstance(got, Array), type(got)
            np.testing.assert_allclose(b.to_numpy(got), want, rtol=1e-12, atol=1e-12)
        # A second step from the updated weights still agrees.
        out2 = layer.forwardpass(x)
        np.testing.assert_allclose(b.to_numpy(out2), layer_ref.forwardpass(xn), rtol=1e-12, atol=1e-12)
        print("ok")
    """
    assert _run_python(code, CONV2D_BACKEND="array_api_strict").stdout.strip() == "ok"


def test_require_or_skip_fails_for_a_required_dependency(monkeypatch):
    """An optional dependency that does not import skips, unless CONV2D_TEST_REQUIRE names it (or its
    top-level package): then the ImportError fails the test, so that CI cannot go green by skipping."""
    from . import conftest

    monkeypatch.setattr(conftest, "REQUIRED", set())
    with pytest.raises(pytest.skip.Exception):
        conftest.require_or_skip("conv2d_no_such_module.sub")
    for named in ("conv2d_no_such_module", "conv2d_no_such_module.sub"):
        monkeypatch.setattr(conftest, "REQUIRED", {named})
        with pytest.raises(ImportError):
            conftest.require_or_skip("conv2d_no_such_module.sub")
    assert conftest.require_or_skip("numpy") is np


def test_no_test_file_bypasses_require_or_skip():
    """``pytest.importorskip`` skips whatever CONV2D_TEST_REQUIRE says: every test file goes through
    require_or_skip instead (the conftest's own backend loader checks REQUIRED itself)."""
    here, call = Path(__file__).parent, "pytest." + "importorskip("  # split: this file names it too
    bypassing = sorted(path.name for path in here.glob("*.py")
                       if path.name != "conftest.py" and call in path.read_text())
    assert not bypassing, f"use require_or_skip (tests/conftest.py) instead of pytest.importorskip in {bypassing}"

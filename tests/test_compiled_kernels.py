"""NumPy's compiled kernels (``conv2d[cpu]``: Numba) from the outside: present exactly where Numba is
installed, nothing changed or warned without it, Numba loaded only by a kernel's first run, and the
compiled kernels cached on disk where the install is read-only.

The first tests assert in both cases, on whichever this environment is: CI runs this file once
without Numba (numba and llvmlite uninstalled, ``.ci/run``) and once with it (the main run). Their
numerics against PyTorch are tests/test_oracle.py's and the other algorithm-parametrised files'.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._geometry import make_geometry

from .conftest import require_or_skip

HAS_NUMBA = importlib.util.find_spec("numba") is not None
PACKAGE = Path(conv2d.__file__).parent
NOBODY = 65534  # the unprivileged user (and group) of most Linux systems

# Layers of every kind auto tells apart: plain, strided, dilated, depthwise, 1x1, 3x3 wide.
LAYERS = [
    ((2, 3, 9, 8), (4, 3, 5, 5), {"padding": 2}),
    ((1, 4, 11, 11), (6, 4, 3, 3), {"stride": 2}),
    ((1, 2, 12, 12), (2, 2, 3, 2), {"dilation": (2, 3)}),
    ((2, 8, 10, 10), (8, 1, 3, 3), {"groups": 8, "padding": 1}),
    ((2, 16, 6, 6), (8, 16, 1, 1), {}),
    ((1, 64, 8, 8), (64, 64, 3, 3), {"padding": 1}),
]


def _python(code: str, timeout: float, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter (this one's); its output, or a failure with its stderr."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=timeout, env=env, **kwargs)
    assert result.returncode == 0, f"subprocess failed:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _data(x_shape, w_shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32),
            rng.standard_normal(w_shape[0]).astype(np.float32))


def test_numpy_has_compiled_kernels_exactly_where_numba_is_installed():
    """``conv2d[cpu]`` (Numba) gives NumPy its kernels; without Numba the backend has none (threadpoolctl,
    the extra's other half, is a test dependency: present in both cases)."""
    assert importlib.util.find_spec("threadpoolctl") is not None
    assert (conv2d.get_backend("numpy").kernels is not None) == HAS_NUMBA


@pytest.mark.parametrize(("x_shape", "w_shape", "kwargs"), LAYERS)
def test_auto_picks_the_kernels_only_where_numba_is_installed(x_shape, w_shape, kwargs):
    """Without Numba auto never picks "kernels" on NumPy; with it, exactly where the kernels say they pay."""
    backend = conv2d.get_backend("numpy")
    geom = make_geometry(x_shape, w_shape, (w_shape[0],), **kwargs)
    for deterministic in (False, True):
        chosen = _conv.auto_algorithm(backend, deterministic, geom)
        assert chosen == "kernels" if HAS_NUMBA and backend.kernels.prefers(geom) else chosen != "kernels"
    assert _conv.auto_algorithm(backend, False, None) != "kernels"  # the pooling layers' patches


def test_algorithm_kernels_needs_numba():
    """Without Numba algorithm="kernels" says how to get it; with Numba it computes what slices does."""
    x, w, b = _data((2, 3, 9, 8), (4, 3, 5, 5))
    if not HAS_NUMBA:
        message = r"numpy where Numba is installed: pip install 'conv2d\[cpu\]'"
        with pytest.raises(ValueError, match=message):
            conv2d.conv2d(x, w, b, padding=2, algorithm="kernels")
        with pytest.raises(ValueError, match=message):
            conv2d.conv2d_backward(np.ones((2, 4, 9, 8), np.float32), x, w, padding=2, algorithm="kernels")
        assert not _conv.applicable("kernels", conv2d.get_backend("numpy"))
        return
    y = conv2d.conv2d(x, w, b, padding=2, algorithm="kernels")
    np.testing.assert_allclose(y, conv2d.conv2d(x, w, b, padding=2, algorithm="slices"), rtol=1e-5, atol=1e-5)
    grad_out = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    for ours, reference in zip(conv2d.conv2d_backward(grad_out, x, w, padding=2, algorithm="kernels"),
                               conv2d.conv2d_backward(grad_out, x, w, padding=2, algorithm="slices")):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_import_loads_numba_only_when_a_kernel_runs():
    """``import conv2d`` and calls on other algorithms import no Numba and warn nothing (``-W error``), with
    Numba installed or not; a call on the kernels imports it, where installed."""
    code = """
        import sys
        import numpy as np
        import conv2d
        x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
        w = np.random.default_rng(1).standard_normal((3, 2, 3, 3)).astype(np.float32)
        y = conv2d.conv2d(x, w, algorithm="slices")
        conv2d.conv2d_backward(y, x, w, algorithm="slices")
        conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, algorithm="slices").forwardpass(x)
        before = "numba" in sys.modules
        kernels = conv2d.get_backend("numpy").kernels is not None
        if kernels:
            conv2d.conv2d(x, w, algorithm="kernels")
        print(before, kernels, "numba" in sys.modules)
    """
    result = _python(code, timeout=240, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert result.stdout.split() == ["False", str(HAS_NUMBA), str(HAS_NUMBA)]
    assert result.stderr == ""


# -- the compile cache, on a read-only install -------------------------------------------------

# One forward and backward of algorithm="kernels" on an im2col layer (5x5, no groups), checked against
# slices, then what each compiled kernel of the package loaded from Numba's disk cache or compiled.
_CACHE_RUN = """
    import json, sys, time
    import numpy as np
    import conv2d
    from numba.core.registry import CPUDispatcher
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    g = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    start = time.perf_counter()
    ours = (conv2d.conv2d(x, w, b, padding=2, algorithm="kernels"),
            *conv2d.conv2d_backward(g, x, w, padding=2, algorithm="kernels"))
    seconds = time.perf_counter() - start
    reference = (conv2d.conv2d(x, w, b, padding=2, algorithm="slices"),
                 *conv2d.conv2d_backward(g, x, w, padding=2, algorithm="slices"))
    error = max(float(np.max(np.abs(a - r)) / (1 + np.max(np.abs(r)))) for a, r in zip(ours, reference))
    stats = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("conv2d.backends._numba."):
            for attr, obj in vars(module).items():
                if isinstance(obj, CPUDispatcher) and obj.signatures:
                    s = obj.stats
                    stats[name + "." + attr] = [sum(s.cache_hits.values()), sum(s.cache_misses.values()),
                                                s.cache_path]
    print(json.dumps({"file": conv2d.__file__, "seconds": seconds, "error": error, "stats": stats}))
"""


def _listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))}


def _make_read_only(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _nobody_can_run(env: dict[str, str]) -> bool:
    """Whether user nobody can start this interpreter and import Numba and the copy (not where the
    interpreter or the environment lies in a folder only root may enter, such as /root)."""
    try:
        result = subprocess.run([sys.executable, "-c", "import numba, threadpoolctl, conv2d"], capture_output=True,
                                timeout=120, env=env, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def test_kernels_compile_once_into_the_user_cache_where_the_install_is_read_only():
    """The package copied where its process may not write: a first process compiles the kernels into
    the user's cache folder (XDG_CACHE_HOME, Numba's fallback where it cannot write beside the
    sources), a second loads every one of them from there (no compile), and the copy is unchanged.

    Root ignores permission bits, so as root the processes run as user nobody; where nobody cannot
    start this interpreter (it lies under /root, say), the copy's ``__pycache__`` folders are files
    instead, which makes Numba's in-tree cache fail for root as a read-only folder makes it fail for
    a user (the OSError of creating it)."""
    require_or_skip("numba")
    base = Path(tempfile.mkdtemp(prefix="conv2d-readonly-"))  # not tmp_path: its parent is private to root
    try:
        base.chmod(0o755)
        install = base / "install"
        shutil.copytree(PACKAGE, install / "conv2d", ignore=shutil.ignore_patterns("__pycache__"))
        cache_home = base / "home"
        cache_home.mkdir(mode=0o777)
        cache_home.chmod(0o777)  # whoever runs the processes writes here
        env = {key: value for key, value in os.environ.items() if not key.startswith(("NUMBA_", "PYTHON"))}
        env.update(PYTHONPATH=str(install), HOME=str(cache_home), XDG_CACHE_HOME=str(cache_home / "cache"))
        as_user: dict = {}
        if os.geteuid() == 0:
            if _nobody_can_run(env):
                as_user = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
            else:
                for folder in [install / "conv2d", *(p for p in (install / "conv2d").rglob("*") if p.is_dir())]:
                    (folder / "__pycache__").write_text("not a folder: Numba's in-tree cache cannot be made here\n")
        _make_read_only(install)
        before = _listing(install)

        runs = []
        for timeout in (240, 120):  # compiling the kernels takes seconds; loading them, milliseconds
            result = _python(_CACHE_RUN, timeout=timeout, env=env, cwd="/", **as_user)
            runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        cold, warm = runs

        for run in runs:
            assert run["file"] == str(install / "conv2d" / "__init__.py")  # the copy, not this checkout
            assert run["error"] < 1e-5
            assert run["stats"], "no compiled kernel ran"
            for name, (_, _, path) in run["stats"].items():
                assert path is not None and Path(path).is_relative_to(cache_home / "cache" / "numba"), (name, path)
        # Every kernel the call runs was loaded; a helper that only kernels call (compiled into them) is
        # compiled in the cold run and not even loaded in the warm one.
        assert "conv2d.backends._numba.im2col._im2col" in warm["stats"] and set(warm["stats"]) <= set(cold["stats"])
        assert all(misses > 0 for _, misses, _ in cold["stats"].values()), cold["stats"]  # an empty cache
        assert all(hits > 0 and misses == 0 for hits, misses, _ in warm["stats"].values()), warm["stats"]
        assert _listing(install) == before  # nothing written into the install
        assert list((cache_home / "cache" / "numba").rglob("*.nbi"))
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)

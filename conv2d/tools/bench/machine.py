"""Machine details for the JSON and the header: CPU, BLAS threads, Numba, library versions, load average."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any

from ... import __version__
from ...backends import Backend

_DISTRIBUTIONS = ("numpy", "array-api-compat", "torch", "jax", "jaxlib", "cupy-cuda12x", "cupy-cuda13x",
                  "array-api-strict", "threadpoolctl", "numba", "llvmlite", "matplotlib")


# The environment variables that change what is measured, recorded where set.
_ENV_VARS = ("CONV2D_BACKEND", "CONV2D_MAX_WORKSPACE", "CONV2D_DETERMINISTIC", "OMP_NUM_THREADS",
             "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUPY_TF32",
             "NVIDIA_TF32_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG")
# And every variable of these families: OpenBLAS's settings (OPENBLAS_CORETYPE picks its kernels),
# glibc's malloc tunables (MALLOC_MMAP_THRESHOLD_ changes how the first calls page-fault).
_ENV_PREFIXES = ("OPENBLAS_", "MALLOC_", "GLIBC_TUNABLES")


def _cpu_model() -> str | None:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    for line in lscpu.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def _numba_info(versions: dict[str, str]) -> dict[str, Any]:
    """Numba's version (None: not installed) and whether NumPy's compiled kernels can run (Numba and
    threadpoolctl both importable): what ``algorithm="kernels"`` and ``auto`` on NumPy run. Numba is
    not imported (a second or more), only looked up."""
    from ...backends import _numba

    return {"version": versions.get("numba"), "compiled_kernels": _numba.available()}


def _numba_line(info: dict[str, Any]) -> str:
    """"Numba: 0.68.1 (compiled CPU kernels available)", or why ``algorithm='kernels'`` is not, on NumPy."""
    numba = info.get("numba") or {}
    version = numba.get("version")
    if version is None:
        return "Numba: not installed (algorithm='kernels' unavailable on NumPy; pip install 'conv2d[cpu]')"
    if not numba.get("compiled_kernels"):
        return f"Numba: {version} (compiled CPU kernels unavailable: threadpoolctl is not installed)"
    return f"Numba: {version} (compiled CPU kernels available)"


def machine_info(backend: Backend) -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, BLAS and its threads, Numba, library versions, device."""
    versions = {"conv2d": __version__}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "versions": versions,
        "numba": _numba_info(versions),
        "backend": backend.spec,
        "env": {key: value for key, value in sorted(os.environ.items())
                if key in _ENV_VARS or key.startswith(_ENV_PREFIXES)},
    }
    try:
        import threadpoolctl

        info["threadpools"] = threadpoolctl.threadpool_info()
    except ImportError:
        info["threadpools"] = "threadpoolctl is not installed (pip install 'conv2d[bench]')"
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name()
    if backend.name == "cupy":
        import cupy

        info["cuda_device"] = cupy.cuda.runtime.getDeviceProperties(backend.device.id)["name"].decode()
    return info


def _load_average() -> float | None:
    """The 1-minute load average, where the OS has one: it says how much else was running."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _other_load(load: dict[str, float | None], cores: int | None) -> float | None:
    """Roughly how many cores other processes kept busy throughout, or None where unknown.

    This run itself adds up to `cores` to the load after it; the load before it may still be that
    of the previous command. Busy on both counts means busy throughout.
    """
    if load["before"] is None or load["after"] is None or not cores:
        return None
    return max(0.0, min(load["before"], load["after"] - cores))


def _blas_line(info: dict[str, Any]) -> str:
    """"BLAS: openblas 0.3.31 (Haswell kernels, 2 threads)": the library, its kernel family where it says one."""
    pools = info.get("threadpools")
    if not isinstance(pools, list):
        return "BLAS: unknown (no threadpoolctl)"
    blas = []
    for p in pools:
        if p.get("user_api") == "blas":
            # OpenBLAS's kernel family is its own guess from the CPU's model number (see blas_kernels).
            kernels = f"{p['architecture']} kernels, " if p.get("architecture") else ""
            blas.append(f"{p.get('internal_api')} {p.get('version')} ({kernels}{p.get('num_threads')} threads)")
    return "BLAS: " + (", ".join(blas) or "none found")

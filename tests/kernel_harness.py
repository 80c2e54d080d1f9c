"""Run the CUDA kernel sources of ``conv2d/backends/_cuda_source.py`` on the CPU.

The sources are ``cupy.ElementwiseKernel`` bodies: ``i`` is the element index and arrays are raw
pointers. Wrapped in a loop over ``i`` they are also plain C++, so the host compiler builds the
very same text into a shared library, and :class:`HostKernels` offers it with the interface of
``CupyKernels``. What this checks without a GPU: the index arithmetic, padding, strides,
dilation, groups, row chunks and the fixed summation order. What it cannot check: CUDA
compilation, launch configuration, and CuPy's float16 type (``tests/test_gpu.py`` on a GPU).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from conv2d.backends import _cuda_source

# numpy dtype -> (C++ element type, accumulator type as CupyKernels picks it)
TYPES = {
    "float32": ("float", _cuda_source.accumulator("float32")),
    "float64": ("double", _cuda_source.accumulator("float64")),
    "float16": ("_Float16", _cuda_source.accumulator("float16")),
}
KERNELS = {
    "im2col": (_cuda_source.IM2COL_PARAMS, _cuda_source.IM2COL),
    "col2im": (_cuda_source.COL2IM_PARAMS, _cuda_source.COL2IM),
}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _signature(params: tuple[str, str]) -> str:
    """C++ parameters from ElementwiseKernel's: ``raw T x`` is a pointer, ``int64 C`` a long long."""
    parts = []
    for index, text in enumerate(params):
        for param in text.split(","):
            words = param.split()
            if words[0] == "raw":
                parts.append(f"{'const ' if index == 0 else ''}T* {words[2]}")
            else:
                assert words[0] == "int64", param
                parts.append(f"long long {words[1]}")
    return ", ".join(parts)


def source() -> str:
    """One C++ file: each kernel for each dtype, as ``extern "C"`` loops over ``i``."""
    lines = []
    for dtype, (ctype, acc) in TYPES.items():
        lines.append(f"namespace {dtype} {{ typedef {ctype} T; }}")
        for name, (params, body) in KERNELS.items():
            lines += [
                f'extern "C" void {name}_{dtype}({_signature(params).replace("T*", f"{dtype}::T*")}, long long size) {{',
                f"    typedef {dtype}::T T;",
                "    for (long long i = 0; i < size; ++i) {",
                body.replace("ACC", acc),
                "    }",
                "}",
            ]
    return "\n".join(lines)


def build(directory: Path) -> ctypes.CDLL:
    """Compile :func:`source` into `directory` and load it."""
    src, lib = directory / "kernels.cpp", directory / "kernels.so"
    src.write_text(source())
    command = [compiler(), "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(lib), str(src)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"the kernel sources do not compile as C++:\n{done.stderr}")
    return ctypes.CDLL(str(lib))


class HostKernels:
    """``CupyKernels``'s interface on NumPy arrays, running the compiled sources."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self.calls: list[str] = []  # which kernels ran: tests check the algorithm used them

    def _launch(self, name: str, source_array: np.ndarray, target: np.ndarray, args: tuple[int, ...]) -> np.ndarray:
        assert target.flags.c_contiguous and target.ndim == 1, "kernels write flat contiguous arrays"
        source_array = np.ascontiguousarray(source_array).reshape(-1)
        assert source_array.dtype == target.dtype
        function = getattr(self._library, f"{name}_{target.dtype.name}")
        function(
            ctypes.c_void_p(source_array.ctypes.data),
            *(ctypes.c_longlong(a) for a in args),
            ctypes.c_void_p(target.ctypes.data),
            ctypes.c_longlong(target.size),
        )
        self.calls.append(name)
        return target

    def im2col(self, x, cols, args):
        return self._launch("im2col", x, cols, args)

    def col2im(self, grad_cols, grad_x, args):
        return self._launch("col2im", grad_cols, grad_x, args)

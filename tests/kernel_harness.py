"""Run the CUDA kernel sources of ``conv2d/backends/_cuda_source.py`` on the CPU, through CuPy's own code.

``CupyKernels`` (``conv2d/backends/cupy.py``) builds its kernels with ``cupy.ElementwiseKernel``
and launches them with ``cupy.ascontiguousarray``-ed flat arrays. :func:`host_cupy` returns a
stand-in for those two names of CuPy, on NumPy arrays: its ``ElementwiseKernel`` wraps the
operation in a loop over ``i`` and compiles it with the host C++ compiler, one shared library per
kernel and dtype. So the real ``CupyKernels``, the real sources and the real ``"kernels"``
algorithm run here. What this checks without a GPU: the index arithmetic, padding, strides,
dilation, groups, row chunks, the argument order of the launches and the fixed summation order.
What it cannot check: CUDA compilation, launches, and CuPy's float16 type (it uses the host
compiler's ``_Float16``, and ``std::complex`` for CuPy's ``complex``); ``ci/gpu-check`` runs the suite on a GPU for those.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import conv2d
from conv2d.backends import Backend
from conv2d.backends.cupy import CupyKernels

_CTYPES = {"float16": "_Float16", "float32": "float", "float64": "double",
           "complex64": "complex<float>", "complex128": "complex<double>"}
# ElementwiseKernel's integer types -> (C type, ctypes type)
_INTEGERS = {"int32": ("int", ctypes.c_int), "int64": ("long long", ctypes.c_longlong)}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _parameters(in_params: str, out_params: str) -> tuple[str, list[str]]:
    """C++ parameters from ElementwiseKernel's (``raw T x`` a pointer, ``int64 C`` a long long), and their kinds."""
    declared, kinds = [], []
    for text, writable in ((in_params, False), (out_params, True)):
        for param in text.split(","):
            words = param.split()
            if words[0] == "raw":
                assert words[1] == "T", f"the harness knows raw T arrays only: {param!r}"
                declared.append(f"{'' if writable else 'const '}T* {words[2]}")
                kinds.append("array")
            else:
                assert words[0] in _INTEGERS, f"the harness knows int32 and int64 scalars only: {param!r}"
                declared.append(f"{_INTEGERS[words[0]][0]} {words[1]}")
                kinds.append(words[0])
    return ", ".join(declared), kinds


class HostElementwiseKernel:
    """``cupy.ElementwiseKernel`` for raw arrays and int32/int64 scalars, compiled for the CPU."""

    def __init__(self, directory: Path, in_params: str, out_params: str, operation: str, name: str) -> None:
        self._directory, self.name = directory, name
        self._signature, self._kinds = _parameters(in_params, out_params)
        self._operation = operation
        self._libraries: dict[str, ctypes.CDLL] = {}

    def _library(self, dtype: str) -> ctypes.CDLL:
        if dtype not in self._libraries:
            text = "\n".join([
                # The accumulator of complex types is spelled as CuPy spells it: complex<float>.
                "#include <complex>",
                "using std::complex;",
                f"typedef {_CTYPES[dtype]} T;",
                f'extern "C" void run({self._signature}, long long size) {{',
                "    for (long long i = 0; i < size; ++i) {",
                self._operation,
                "    }",
                "}",
            ])
            stem = f"{self.name}_{dtype}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"
            source, library = self._directory / f"{stem}.cpp", self._directory / f"{stem}.so"
            source.write_text(text)
            command = [compiler(), "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(library), str(source)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise AssertionError(f"kernel {self.name} does not compile as C++ for {dtype}:\n{done.stderr}")
            self._libraries[dtype] = ctypes.CDLL(str(library))
        return self._libraries[dtype]

    def __call__(self, *args, size: int):
        assert len(args) == len(self._kinds), f"{self.name}: {len(args)} arguments for {len(self._kinds)} parameters"
        arrays = [a for a, kind in zip(args, self._kinds) if kind == "array"]
        dtypes = {a.dtype.name for a in arrays}
        assert len(dtypes) == 1, f"{self.name}: raw T arrays of several dtypes {dtypes}"
        converted = []
        for value, kind in zip(args, self._kinds):
            if kind == "array":
                assert value.ndim == 1 and value.flags.c_contiguous, f"{self.name}: arrays must be flat and contiguous"
                converted.append(ctypes.c_void_p(value.ctypes.data))
            else:
                assert isinstance(value, int), f"{self.name}: {kind} scalar given {value!r}"
                c_type = _INTEGERS[kind][1]
                assert c_type(value).value == value, f"{self.name}: {value} does not fit {kind}"
                converted.append(c_type(value))
        assert all(a.size >= 1 for a in arrays) and size >= 1
        self._library(dtypes.pop()).run(*converted, ctypes.c_longlong(size))


def host_cupy(directory: Path) -> SimpleNamespace:
    """The part of the ``cupy`` module that ``CupyKernels`` uses, on NumPy, compiling into `directory`."""
    built: list[HostElementwiseKernel] = []

    def elementwise_kernel(in_params, out_params, operation, name):
        kernel = HostElementwiseKernel(directory, in_params, out_params, operation, name)
        built.append(kernel)
        return kernel

    return SimpleNamespace(
        ElementwiseKernel=elementwise_kernel, ascontiguousarray=np.ascontiguousarray, built=built
    )


@functools.cache
def host_kernels_backend() -> Backend:
    """A NumPy backend whose ``kernels`` are the real ``CupyKernels`` over :func:`host_cupy`.

    Its scatter-add is marked non-deterministic, as on a GPU, so that deterministic mode takes the
    same paths as it does there. Built once per test session (compiling takes about a second).
    """
    if compiler() is None:
        # CI names the compiler as required (CONV2D_TEST_REQUIRE), so there this fails instead.
        if "host_compiler" in os.environ.get("CONV2D_TEST_REQUIRE", "").split(","):
            pytest.fail("no C++ compiler (g++ or c++) to build the kernel sources with")
        pytest.skip("no C++ compiler (g++ or c++) to build the kernel sources with")
    cupy = host_cupy(Path(tempfile.mkdtemp(prefix="conv2d-kernels-")))
    return dataclasses.replace(
        conv2d.get_backend("numpy"), kernels=CupyKernels(cupy, contextlib.nullcontext()), deterministic_scatter=False
    )

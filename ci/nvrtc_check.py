"""Compile every CUDA kernel variant conv2d can launch with NVIDIA's NVRTC, without a GPU.

Run by ``ci/nvrtc-check`` (which makes the virtual environment with CuPy and the NVRTC wheels);
by hand, in that environment: ``python ci/nvrtc_check.py [--self-test] [--arch 90,80]``.

What it proves: the exact source CuPy builds for each of our ``ElementwiseKernel`` launches compiles
for the named architectures with CuPy's own compiler options, with no error and no warning. What it
does not prove: that the kernels run, or compute the right thing, on a GPU (``ci/gpu-check`` does).

How the variants are found, from the library's own code rather than a list kept here:
``CupyKernels`` (``conv2d/backends/cupy.py``) is run with a stand-in for the ``cupy`` module whose
``ElementwiseKernel`` is CuPy's real one, wrapped to record each launch instead of running it, and
with stand-in arrays of every size that changes the generated source: both sides of the 32-bit
limits of our index width (``_cuda_source.index_width``) and of CuPy's own 32/64-bit indexing of
arrays and of the launch range (``_cuda_source.launch_size``), for every real and complex floating
dtype that conv2d accepts and CuPy supports. Each recorded launch is turned into the argument descriptions CuPy
builds at call time, and CuPy's code generator makes the source; identical sources count once.

CuPy builds and compiles that source only when a kernel is called, which needs a device, so this
uses CuPy internals (a list in ``_cupy_internals``). They are private: the CuPy major version is
pinned in ``ci/nvrtc-check``, and a missing name fails the check with a line naming what moved.

Exit status: 0 if everything compiled cleanly, 1 if a variant failed (one ``FAIL`` line each, then
the compiler's log), 2 if the check itself cannot run (a moved CuPy internal, NVRTC not loadable).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import importlib.metadata
import io
import itertools
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from conv2d.backends import _cuda_source  # noqa: E402
from conv2d.backends.cupy import CupyKernels  # noqa: E402

# CuPy's 32-bit indexing limits (CuPy 14, cupy/_core/core.pyx and _carray.pyx): an array indexes in
# 32 bits when its size in bytes is at most 2**31, the launch range (CIndexer) when its size is.
_CUPY_32BIT_LIMIT = 2**31
# CuPy's enum _ArgKind (cupy/_core/_kernel.pxd) is not visible from Python; its values are checked
# against the generated source in _check_signature, so a change fails loudly.
_ARG_KIND_NDARRAY, _ARG_KIND_INDEXER, _ARG_KIND_SCALAR = 1, 2, 3


class CheckError(Exception):
    """The check cannot run (not a kernel's fault): exit status 2."""


def _cupy_internals() -> SimpleNamespace:
    """CuPy's private names this check relies on, each found or reported by its full name."""
    try:
        import cupy
    except ImportError as exc:
        raise CheckError(f"cannot import cupy ({exc}): run this through ci/nvrtc-check, which installs it") from exc
    names = {
        "ArgInfo": ("cupy._core._kernel", "_ArgInfo"),
        "kernel_code": ("cupy._core._kernel", "_get_elementwise_kernel_code"),
        "CScalar": ("cupy._core._scalar", "CScalar"),
        "Indexer": ("cupy._core._carray", "Indexer"),
        "dtype_with_itemsize": ("cupy._core._dtype", "get_dtype_with_itemsize"),
        "compiler_options": ("cupy._core.core", "assemble_cupy_compiler_options"),
        "header_list": ("cupy._core.core", "_cupy_header_list"),
        "compile_using_nvrtc": ("cupy.cuda.compiler", "compile_using_nvrtc"),
        "arch_option": ("cupy.cuda.compiler", "_get_arch_for_options_for_nvrtc"),
        "CompileException": ("cupy.cuda.compiler", "CompileException"),
        "nvrtc_version": ("cupy.cuda.compiler", "_get_nvrtc_version"),
    }
    found = {"cupy": cupy}
    missing = []
    for key, (module_name, attr) in names.items():
        try:
            found[key] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{module_name}.{attr} ({type(exc).__name__}: {exc})")
    # The arch option is memoized per device, which asks the driver; the undecorated function does not.
    arch_option = found.get("arch_option")
    if arch_option is not None and not hasattr(arch_option, "__wrapped__"):
        missing.append("cupy.cuda.compiler._get_arch_for_options_for_nvrtc.__wrapped__ (no longer memoized)")
    for method in ("_decide_params_type", "in_params", "out_params", "params", "operation", "name", "preamble",
                   "kwargs"):
        if not hasattr(cupy.ElementwiseKernel, method):
            missing.append(f"cupy.ElementwiseKernel.{method}")
    if missing:
        raise CheckError(
            f"CuPy {cupy.__version__} moved private names this check uses: {'; '.join(missing)}. "
            "Update ci/nvrtc_check.py to this CuPy's internals (cupy/cuda/compiler.py is in the venv, the .pyx "
            "sources in CuPy's repository at this version's tag), or pin the CuPy it was written for (14.2) "
            "in ci/nvrtc-check"
        )
    return SimpleNamespace(**found)


# --- the library's launches, recorded -------------------------------------------------------------


class _StandInArray:
    """What a launch reads of a ``cupy.ndarray``: size, dtype, shape, and CuPy's 32-bit flag.

    ``index_32_bits`` is CuPy's own: set from the size in bytes when an array is allocated, and
    inherited by its views, so a small view of a big array indexes in 64 bits.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, index_32_bits: bool) -> None:
        self.shape = shape
        self.dtype = dtype
        self.size = int(np.prod(shape, dtype=object))
        self.ndim = len(shape)
        self.index_32_bits = index_32_bits

    def reshape(self, *shape: Any) -> _StandInArray:
        if len(shape) == 1 and isinstance(shape[0], tuple):
            shape = shape[0]
        if shape.count(-1) == 1:
            known = int(np.prod([s for s in shape if s != -1], dtype=object))
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        return _StandInArray(tuple(shape), self.dtype, self.index_32_bits)  # a view: same flag


@dataclass(frozen=True)
class Launch:
    """One recorded call of a CuPy ElementwiseKernel: the kernel object and what it was called with."""

    kernel: Any
    args: tuple[Any, ...]
    size: int


class _RecordingCupy:
    """Stands in for the ``cupy`` module inside ``CupyKernels``: real kernels, recorded launches.

    `edit` changes each kernel body on its way into CuPy (the self-test breaks kernels with it).
    """

    def __init__(self, cupy: Any, launches: list[Launch], edit: Callable[[str], str] | None = None) -> None:
        self._cupy = cupy
        self._launches = launches
        self._edit = edit

    def ElementwiseKernel(
        self, in_params: str, out_params: str, operation: str, *args: Any, **kwargs: Any
    ) -> Any:
        if self._edit is not None:
            operation = self._edit(operation)
        kernel = self._cupy.ElementwiseKernel(in_params, out_params, operation, *args, **kwargs)
        launches = self._launches

        def launch(*call_args: Any, size: int = -1, **call_kwargs: Any) -> None:
            if call_kwargs:
                raise CheckError(
                    f"CupyKernels launches {kernel.name} with {sorted(call_kwargs)}; "
                    "teach ci/nvrtc_check.py what they change in the source"
                )
            if size != 0:  # CuPy returns before compiling a launch of no elements
                launches.append(Launch(kernel, call_args, size))

        return launch

    def ascontiguousarray(self, array: _StandInArray) -> _StandInArray:
        return array  # the stand-ins are C-contiguous already

    def __getattr__(self, name: str) -> Any:
        raise CheckError(f"CupyKernels uses cupy.{name}, which ci/nvrtc_check.py's stand-in lacks: add it there")


def _boundary_sizes(itemsize: int) -> list[int]:
    """Element counts on both sides of every 32-bit limit that changes the generated source: CuPy's
    for arrays (bytes) and launch ranges (elements), and our index width's (int32 elements)."""
    int32_max = int(np.iinfo(np.int32).max)
    if (_cuda_source.index_width(int32_max), _cuda_source.index_width(int32_max + 1)) != ("int32", "int64"):
        raise CheckError("_cuda_source.index_width no longer switches to int64 above the int32 maximum: "
                         "update _boundary_sizes in ci/nvrtc_check.py to its new limit")
    limits = {_CUPY_32BIT_LIMIT // itemsize, _CUPY_32BIT_LIMIT, int32_max}
    return sorted({1} | {n + d for n in limits for d in (0, 1)})


def cuda_dtypes(internals: SimpleNamespace) -> list[np.dtype]:
    """The real and complex floating dtypes conv2d accepts that CuPy supports."""
    import array_api_compat.cupy as xp

    dtypes = []
    for code in np.typecodes["Float"] + np.typecodes["Complex"]:
        dtype = np.dtype(code)
        if not xp.isdtype(dtype, ("real floating", "complex floating")):
            continue
        try:
            internals.dtype_with_itemsize(dtype, True)
        except (TypeError, ValueError):  # e.g. long double: CuPy has no arrays of it
            continue
        dtypes.append(dtype)
    return dtypes


def record_launches(
    internals: SimpleNamespace, dtypes: list[np.dtype], edit: Callable[[str], str] | None = None
) -> list[Launch]:
    """Every launch shape of CupyKernels.im2col and .col2im, through the library's own launch code."""
    launched = {"im2col", "col2im"}  # the calls below
    launch_free = {"prefers"}  # auto's rule: answers from the layer alone, compiles and launches nothing
    public = {name for name in vars(CupyKernels) if not name.startswith("_")}
    if public != launched | launch_free:
        raise CheckError(f"CupyKernels has the methods {sorted(public)}, but ci/nvrtc_check.py launches only "
                         f"{sorted(launched)}: teach record_launches the others")
    launches: list[Launch] = []
    kernels = CupyKernels(_RecordingCupy(internals.cupy, launches, edit), contextlib.nullcontext())
    # The scalars' values do not change the source, except kH*kW, which sets im2col's launch range.
    kernel_shapes = [(1, 1), (3, 3)]
    for dtype, (kh, kw) in itertools.product(dtypes, kernel_shapes):
        args = tuple({"KH": kh, "KW": kw}.get(name, 1) for name in _cuda_source.PARAMS)
        sizes = _boundary_sizes(dtype.itemsize)
        for source_size, target_size in itertools.product(sizes, sizes):
            source_fits = source_size * dtype.itemsize <= _CUPY_32BIT_LIMIT
            target_fits = target_size * dtype.itemsize <= _CUPY_32BIT_LIMIT
            # An array that fits may still be a view of one that does not (see _StandInArray).
            for source_32, target_32 in itertools.product({source_fits, False}, {target_fits, False}):
                source = _StandInArray((source_size,), dtype, source_32)
                target = _StandInArray((target_size,), dtype, target_32)
                kernels.im2col(source, target, args)
                kernels.col2im(source, target, args)
    return launches


# --- CuPy's source for a launch ---------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One source CuPy would compile: the kernel's name, a short description, the full source."""

    name: str
    label: str
    source: str
    options: tuple[str, ...]


def _argument_infos(internals: SimpleNamespace, launch: Launch) -> tuple[tuple[Any, ...], Any, str]:
    """(arginfos, type_map, label) as ``ElementwiseKernel.__call__`` builds them for `launch`."""
    kernel = launch.kernel
    n_in = len(kernel.in_params)
    if len(launch.args) != n_in + len(kernel.out_params):
        raise CheckError(f"{kernel.name} launched with {len(launch.args)} arguments for "
                         f"{n_in + len(kernel.out_params)} parameters")
    in_types = tuple(a.dtype if isinstance(a, _StandInArray) else None for a in launch.args[:n_in])
    out_types = tuple(a.dtype for a in launch.args[n_in:])
    in_types, _, type_map = kernel._decide_params_type(in_types, out_types)
    infos = []
    for i, arg in enumerate(launch.args):
        if isinstance(arg, _StandInArray):
            infos.append(internals.ArgInfo(
                _ARG_KIND_NDARRAY, internals.cupy.ndarray, arg.dtype, arg.ndim, True, arg.index_32_bits
            ))
        elif isinstance(arg, int) and i < n_in:  # a Python int becomes a CScalar of its parameter's type
            infos.append(internals.ArgInfo(_ARG_KIND_SCALAR, internals.CScalar, in_types[i], 0, True, True))
        else:
            raise CheckError(f"{kernel.name}: argument {i} is a {type(arg).__name__}; teach ci/nvrtc_check.py about it")
    # All parameters are raw, so CuPy keeps the launch range 1-D, of `size` elements.
    indexer_32 = launch.size <= _CUPY_32BIT_LIMIT
    infos.append(internals.ArgInfo(_ARG_KIND_INDEXER, internals.Indexer, None, 1, True, indexer_32))
    bits = [f"{p.name}:{32 if a.index_32_bits else 64}"
            for p, a in zip(kernel.params, launch.args) if isinstance(a, _StandInArray)]
    label = " ".join([launch.args[-1].dtype.name, *bits, f"_ind:{32 if indexer_32 else 64}"])
    return tuple(infos), type_map, label


def _check_signature(code: str, kernel: Any, infos: tuple[Any, ...]) -> None:
    """Fail loudly if CuPy's argument kinds no longer mean what _ARG_KIND_* say."""
    signature = code[code.index(kernel.name):].split("{", 1)[0]
    # The element type may itself be a template (thrust::complex<float>): one level of <> inside.
    arrays = re.findall(r"CArray<(?:[^<>]|<[^<>]*>)*, (\d+), (\d+), (\d+)> (\w+)", signature)
    expected_arrays = [(str(i.ndim), "1", str(int(i.index_32_bits))) for i in infos if i.arg_kind == _ARG_KIND_NDARRAY]
    indexer = infos[-1]
    if [a[:3] for a in arrays] != expected_arrays or f"CIndexer<1, {int(indexer.index_32_bits)}> _ind" not in signature:
        raise CheckError(
            f"CuPy's generated signature for {kernel.name} does not match the argument kinds this check passes "
            f"(cupy/_core/_kernel.pxd _ArgKind moved?): {signature.strip()}"
        )


def variants(internals: SimpleNamespace, launches: list[Launch]) -> list[Variant]:
    """The distinct sources CuPy would compile for `launches`, in first-seen order."""
    # CuPy's compile_with_cache puts these includes before every kernel's code.
    headers = "".join(f"#include <{header}>\n" for header in internals.header_list)
    seen: dict[str, Variant] = {}
    for launch in launches:
        kernel = launch.kernel
        infos, type_map, label = _argument_infos(internals, launch)
        kwargs = dict(kernel.kwargs)
        code = internals.kernel_code(
            infos, type_map, kernel.params, kernel.operation, kernel.name, kernel.preamble, **kwargs
        )
        _check_signature(code, kernel, infos)
        source = headers + code
        if source not in seen:
            # compile_with_cache's options, then _compile_with_cache_cuda's -ftz=true; the arch options
            # follow in CuPy's compile_using_nvrtc.
            options = (*internals.compiler_options(tuple(kwargs.get("options", ()))), "-ftz=true")
            seen[source] = Variant(kernel.name, label, source, options)
    return list(seen.values())


# --- compiling ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    variant: Variant
    arch: str
    problem: str  # "" when it compiled cleanly, else "compiler error", "compiler warning", ...
    log: str

    @property
    def ok(self) -> bool:
        return not self.problem


@contextlib.contextmanager
def _arch_without_device() -> Iterator[None]:
    """Let CuPy's compile_using_nvrtc choose its arch options for a given arch without asking a driver."""
    from cupy.cuda import compiler

    memoized = compiler._get_arch_for_options_for_nvrtc
    compiler._get_arch_for_options_for_nvrtc = memoized.__wrapped__
    try:
        yield
    finally:
        compiler._get_arch_for_options_for_nvrtc = memoized


def compile_variant(internals: SimpleNamespace, variant: Variant, arch: str) -> Result:
    """Compile `variant` for sm_`arch` as CuPy would; any log output (a warning) counts as a failure."""
    log = io.StringIO()
    try:
        with _arch_without_device():
            binary, _ = internals.compile_using_nvrtc(
                variant.source, variant.options, arch, filename=f"{variant.name}.cu", log_stream=log
            )
    except internals.CompileException as exc:
        return Result(variant, arch, "compiler error", f"{exc.get_message()}\noptions: {' '.join(exc.options)}")
    except Exception as exc:
        raise CheckError(
            f"CuPy's compile_using_nvrtc failed before NVRTC gave a verdict ({type(exc).__name__}: {exc}); "
            "if it now asks the driver, ci/nvrtc_check.py's _arch_without_device needs updating"
        ) from exc
    text = log.getvalue().strip()
    if text:  # NVRTC's log is empty on a clean compile: anything in it is a warning
        return Result(variant, arch, "compiler warning", text)
    if variant.name.encode() not in binary:
        return Result(variant, arch, "no kernel", f"the compiled binary has no symbol {variant.name}")
    return Result(variant, arch, "", "")


def describe(result: Result) -> str:
    """One FAIL line naming the variant and what went wrong, then the compiler's log, indented."""
    head = f"FAIL sm_{result.arch} {result.variant.name} [{result.variant.label}]: {result.problem}"
    return head + "\n" + "\n".join(f"    {line}" for line in result.log.splitlines())


# --- the check and its self-test -----------------------------------------------------------------------


def _environment(internals: SimpleNamespace) -> str:
    """NVRTC's version and where its library and CUDA's headers come from; fails unless from this venv."""
    try:
        major, minor = internals.nvrtc_version()
    except Exception as exc:
        raise CheckError(
            f"NVRTC does not load ({type(exc).__name__}: {exc}): is nvidia-cuda-nvrtc installed in this venv?"
        ) from exc
    with open("/proc/self/maps", encoding="utf-8") as maps:
        libraries = sorted({line.split()[-1] for line in maps if "libnvrtc.so" in line})
    from cuda.pathfinder import find_nvidia_header_directory  # where CuPy's options take CUDA's headers from

    found = find_nvidia_header_directory("cudart")
    include = [found] if found else []
    prefix = os.path.realpath(sys.prefix)
    # A system CUDA found first would test another NVRTC than the pinned wheel's.
    foreign = [p for p in libraries + include if not os.path.realpath(p).startswith(prefix + os.sep)]
    if not libraries or not include or foreign:
        raise CheckError(
            f"NVRTC or the CUDA headers do not come from this venv ({prefix}): library {libraries or 'not found'}, "
            f"headers {include or 'not found'}; unset CUDA_PATH/CUDA_HOME/LD_LIBRARY_PATH or reinstall the wheels"
        )
    wheels = ", ".join(f"{name} {_version(name)}" for name in ("nvidia-cuda-nvrtc", "nvidia-cuda-runtime"))
    return f"NVRTC {major}.{minor} ({libraries[0]}), CUDA headers {include[0]}; {wheels}"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_check(internals: SimpleNamespace, archs: list[str]) -> int:
    started = time.perf_counter()
    dtypes = cuda_dtypes(internals)
    found = variants(internals, record_launches(internals, dtypes))
    # Kernel names end in _<accumulator>_<index width> (CupyKernels): count per kernel.
    per_kernel = collections.Counter(v.name.rsplit("_", 2)[0] for v in found)
    print(f"nvrtc-check: {len(found)} variants ({', '.join(f'{k}: {n}' for k, n in per_kernel.items())}) "
          f"over {', '.join(d.name for d in dtypes)}; compiling each for {', '.join(f'sm_{a}' for a in archs)}",
          flush=True)
    failed = 0
    counts = {arch: 0 for arch in archs}
    for variant, arch in itertools.product(found, archs):
        result = compile_variant(internals, variant, arch)
        counts[arch] += 1
        if not result.ok:
            failed += 1
            print(describe(result), flush=True)
    seconds = time.perf_counter() - started
    per_arch = ", ".join(f"sm_{arch}: {n}" for arch, n in counts.items())
    print(f"nvrtc-check: {sum(counts.values())} compiles ({per_arch}), {failed} failed, {seconds:.1f} s")
    return 1 if failed else 0


def run_self_test(internals: SimpleNamespace, archs: list[str]) -> int:
    """A deliberately broken kernel must be reported as failing, a warning alone too, an intact one not."""
    cases = {
        "intact im2col": (None, ""),
        "syntax error (a ';' removed)": (lambda body: body.replace(";", "", 1), "compiler error"),
        "warning only (an unused variable)": (
            lambda body: body + "\nint conv2d_self_test_unused = 0;\n", "compiler warning"
        ),
    }
    float32 = [np.dtype("float32")]
    wrong = 0
    for description, (edit, expected) in cases.items():
        launches = record_launches(internals, float32, edit)
        variant = variants(internals, launches[:1])[0]  # one im2col launch: the self-test is about the reporting
        for arch in archs:
            result = compile_variant(internals, variant, arch)
            right = result.problem == expected
            outcome = result.problem or "compiled cleanly"
            print(f"self-test sm_{arch} {description}: {outcome} -> {'ok' if right else 'WRONG'}")
            if not right:
                wrong += 1
                if not result.ok:
                    print(describe(result))
    print(f"nvrtc-check self-test: {len(cases) * len(archs) - wrong} of {len(cases) * len(archs)} as expected")
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--self-test", action="store_true", help="check that broken kernels are reported, then stop")
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated [90,80]")
    options = parser.parse_args(argv)
    archs = [a.strip().removeprefix("sm_") for a in options.arch.split(",") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        parser.error(f"--arch takes compute capabilities such as 90,80, got {options.arch!r}")
    try:
        internals = _cupy_internals()
        print(f"nvrtc-check: CuPy {internals.cupy.__version__}, {_environment(internals)}", flush=True)
        return run_self_test(internals, archs) if options.self_test else run_check(internals, archs)
    except CheckError as exc:
        print(f"nvrtc-check: cannot run: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

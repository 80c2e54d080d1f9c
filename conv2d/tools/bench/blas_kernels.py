"""Which kernels OpenBLAS runs, whether the CPU has wider ones, and ``--openblas-coretype``.

OpenBLAS (NumPy's BLAS) picks its kernel family once, when it is loaded, from the CPU's model
number, unless the environment variable ``OPENBLAS_CORETYPE`` names one. A CPU newer than its table
can get an older family (OpenMathLib/OpenBLAS#6029, Zen 5), and an environment can force one: this
project's machines set ``OPENBLAS_CORETYPE=Haswell`` on an AMD Zen 5 with AVX-512, so OpenBLAS runs
its AVX2 kernels at about half the float32 GEMM speed of its SkylakeX (AVX-512) ones, while
PyTorch's MKL/oneDNN uses AVX-512 there. The variable works only before OpenBLAS is loaded: a library
cannot fix it at run time, so the bench reports it (:func:`narrow_kernels_hint`) and can set it
for the processes it starts (``--openblas-coretype``, checked by :func:`coretype_refusal` and
:func:`coretype_mismatch`). Everything here takes its inputs as arguments, so that the tests can
inject any CPU and any OpenBLAS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

ENV_VAR = "OPENBLAS_CORETYPE"

# What OpenBLAS's SkylakeX kernels need (its runtime check asks for AVX512VL; the kernels use F, BW, DQ).
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl")

# OpenBLAS's x86-64 kernel families that use AVX-512 (lower case: OpenBLAS compares names case-insensitively).
AVX512_FAMILIES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})

# The CPU flags each family's kernels need (a necessary condition; OpenBLAS itself does not check a
# forced family): without them the first matrix product dies of SIGILL.
_NEEDS = {"skylakex": AVX512_FLAGS, "cooperlake": (*AVX512_FLAGS, "avx512_bf16"), "sapphirerapids": AVX512_FLAGS,
          "haswell": ("avx2", "fma"), "zen": ("avx2", "fma"), "sandybridge": ("avx",), "nehalem": ("sse4_2",)}

# The widest vector instructions of the other common families, for the hint's wording.
_WIDTH = {"haswell": "AVX2", "zen": "AVX2", "sandybridge": "AVX", "bulldozer": "AVX", "piledriver": "AVX",
          "steamroller": "AVX", "excavator": "AVX", "nehalem": "SSE4.2", "barcelona": "SSE4a",
          "core2": "SSSE3", "prescott": "SSE3", "katmai": "SSE"}


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags from Linux's ``/proc/cpuinfo``, or None where they are unknown.

    None (another OS, or a ``cpuinfo`` without an x86 "flags" line) means: do not guess.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def openblas_families(pools: Any) -> list[str]:
    """The kernel family (threadpoolctl's "architecture") of every OpenBLAS loaded, where it says one."""
    if not isinstance(pools, list):
        return []
    return [str(p["architecture"]) for p in pools
            if p.get("internal_api") == "openblas" and p.get("architecture")]


def threadpool_info() -> list[dict[str, Any]] | None:
    """``threadpoolctl.threadpool_info()`` of this process, or None without threadpoolctl."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl.threadpool_info()


def narrow_kernels_hint(flags: frozenset[str] | None, pools: Any, environ: Mapping[str, str] | None = None,
                        coretype: str | None = None) -> str | None:
    """One line when OpenBLAS runs kernels narrower than the CPU has, else None.

    Parameters
    ----------
    flags : frozenset of str or None
        The CPU's flags (:func:`cpu_flags`); None, unknown, gives no hint.
    pools : list of dict
        ``threadpoolctl.threadpool_info()``; the OpenBLAS entries' "architecture" is their family.
    environ : mapping, optional
        The environment (default ``os.environ``). With ``OPENBLAS_CORETYPE`` set the family is
        somebody's choice: no hint when OpenBLAS runs AVX-512 kernels by it, and a line that names
        the variable (not OpenBLAS's detection) when it holds OpenBLAS to narrower ones.
    coretype : str, optional
        The family ``--openblas-coretype`` sets for the timing processes: no hint, whatever this
        process runs.

    Returns
    -------
    str or None
        For example "OpenBLAS runs its Haswell (AVX2) kernels on this AVX-512 CPU; ...", when the
        CPU has every flag of :data:`AVX512_FLAGS` and an OpenBLAS reports a family outside
        :data:`AVX512_FAMILIES`.
    """
    environ = os.environ if environ is None else environ
    if coretype or flags is None or not set(AVX512_FLAGS) <= flags:
        return None
    narrow = [family for family in openblas_families(pools) if family.lower() not in AVX512_FAMILIES]
    if not narrow:
        return None
    family = narrow[0]
    kernels = f"{family} ({_WIDTH[family.lower()]})" if family.lower() in _WIDTH else family
    fix = f"{ENV_VAR}=SkylakeX in the environment gives it its AVX-512 kernels (--openblas-coretype SkylakeX here)"
    if environ.get(ENV_VAR):
        return (f"{ENV_VAR}={environ[ENV_VAR]} in the environment holds OpenBLAS to its {kernels} kernels on this "
                f"AVX-512 CPU; {fix}")
    return f"OpenBLAS runs its {kernels} kernels on this AVX-512 CPU; {fix}"


def coretype_refusal(name: str, flags: frozenset[str] | None, pools: Any) -> str | None:
    """Why ``--openblas-coretype NAME`` cannot run here, or None.

    A family whose instructions the CPU's flags lack (an AVX-512 family on a CPU without AVX-512)
    would die of SIGILL in the first matrix product; flags unknown (not Linux) are not held against
    it. Without an OpenBLAS (or without threadpoolctl) nothing could confirm the choice.
    """
    if not name.strip():
        return "--openblas-coretype needs a kernel family name, e.g. SkylakeX, Haswell or Nehalem"
    missing = [flag for flag in _NEEDS.get(name.lower(), ()) if flags is not None and flag not in flags]
    if missing:
        uses = "AVX-512" if name.lower() in AVX512_FAMILIES else ", ".join(_NEEDS[name.lower()])
        return (f"--openblas-coretype {name}: OpenBLAS's {name} kernels use {uses}, and this CPU's flags lack "
                f"{', '.join(missing)}; they would stop the bench with an illegal instruction (SIGILL). Choose a "
                "family the CPU runs (Haswell needs avx2 and fma, Sandybridge avx, Nehalem sse4_2), or leave the "
                "choice to OpenBLAS")
    if pools is None:
        return ("--openblas-coretype needs threadpoolctl to confirm which kernels OpenBLAS runs: "
                "pip install 'conv2d[bench]'")
    if not openblas_families(pools):
        found = ", ".join(f"{p.get('internal_api')}" for p in pools if p.get("user_api") == "blas") or "none"
        return (f"--openblas-coretype: NumPy here uses no OpenBLAS that reports its kernels (BLAS found: {found}); "
                f"{ENV_VAR} would change nothing")
    return None


def coretype_mismatch(name: str, pools: Any) -> str | None:
    """In a timing process: None when every OpenBLAS runs family `name`, else what it runs instead.

    OpenBLAS ignores a name it does not know (it prints "Core not found" only when
    ``OPENBLAS_VERBOSE`` is set) and falls back to a family of its own, and maps some names to
    another family where its build lacks their kernels: only what it reports counts.
    """
    families = openblas_families(pools)
    if families and all(family.lower() == name.lower() for family in families):
        return None
    reported = ", ".join(families) or "no OpenBLAS at all"
    return (f"{ENV_VAR}={name} is not in effect: OpenBLAS reports {reported} kernels. OpenBLAS replaces a name it "
            "does not know, or has no kernels for in this build, with a family of its own; pass the name that "
            f"`OPENBLAS_VERBOSE=2 {ENV_VAR}=NAME python -c 'import numpy'` shows after 'Core:' (OpenBLAS's own "
            "spelling, e.g. SkylakeX, Haswell, Sandybridge, Nehalem)")


def coretype_line(coretype: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Which OpenBLAS kernel family was asked for, and by whom; None when OpenBLAS chose."""
    environ = os.environ if environ is None else environ
    if coretype:
        before = f" (replacing {ENV_VAR}={environ[ENV_VAR]} of the environment)" if environ.get(ENV_VAR) else ""
        return (f"OpenBLAS kernels: {coretype}, set by --openblas-coretype ({ENV_VAR}={coretype} in each timing "
                f"process, confirmed there){before}")
    if environ.get(ENV_VAR):
        return f"OpenBLAS kernels: {ENV_VAR}={environ[ENV_VAR]} from the environment"
    return None


def current_hint(coretype: str | None = None, environ: Mapping[str, str] | None = None,
                 pools: Sequence[dict[str, Any]] | None = None) -> str | None:
    """:func:`narrow_kernels_hint` for this machine and this process's OpenBLAS."""
    return narrow_kernels_hint(cpu_flags(), threadpool_info() if pools is None else pools, environ, coretype)

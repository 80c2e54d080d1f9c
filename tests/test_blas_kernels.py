"""OpenBLAS's kernel family: the hint, the BLAS line, and ``bench --openblas-coretype`` end to end.

The CPU's flags and threadpoolctl's answer are injected, so that every direction is tested on any
machine; the end-to-end runs use a family every x86-64 CPU runs (Nehalem: SSE4.2).
"""

from __future__ import annotations

import json
import platform

import pytest

from conv2d.__main__ import main
from conv2d.tools.bench import blas_kernels
from conv2d.tools.bench.machine import _blas_line, _numba_line

TINY = "2,3,8,8,4,3,3,1,1"
AVX2_CPU = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_CPU = AVX2_CPU | set(blas_kernels.AVX512_FLAGS) | {"avx512_bf16"}


def _openblas(family: str | None, version: str = "0.3.31") -> dict:
    pool = {"user_api": "blas", "internal_api": "openblas", "version": version, "num_threads": 2}
    if family is not None:
        pool["architecture"] = family
    return pool


MKL = {"user_api": "blas", "internal_api": "mkl", "version": "2025.0", "num_threads": 2}


def _runs_openblas_here() -> bool:
    return bool(blas_kernels.openblas_families(blas_kernels.threadpool_info() or []))


def test_cpu_flags_read_the_first_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n", encoding="utf-8")
    assert blas_kernels.cpu_flags(str(cpuinfo)) == frozenset({"fpu", "sse2", "avx2", "avx512f"})
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n", encoding="utf-8")
    assert blas_kernels.cpu_flags(str(arm)) is None  # no x86 flags line: unknown, not "no AVX-512"
    assert blas_kernels.cpu_flags(str(tmp_path / "missing")) is None


def test_hint_when_openblas_runs_avx2_kernels_on_an_avx512_cpu():
    hint = blas_kernels.narrow_kernels_hint(AVX512_CPU, [_openblas("Haswell")], environ={})
    assert hint == ("OpenBLAS runs its Haswell (AVX2) kernels on this AVX-512 CPU; OPENBLAS_CORETYPE=SkylakeX in "
                    "the environment gives it its AVX-512 kernels (--openblas-coretype SkylakeX here)")
    assert "its Sandybridge (AVX) kernels" in blas_kernels.narrow_kernels_hint(
        AVX512_CPU, [MKL, _openblas("Sandybridge")], environ={})
    assert "its Oddname kernels" in blas_kernels.narrow_kernels_hint(AVX512_CPU, [_openblas("Oddname")], environ={})


@pytest.mark.parametrize(
    ("flags", "pools", "environ", "coretype"),
    [
        (AVX512_CPU, [_openblas("SkylakeX")], {}, None),  # already its AVX-512 kernels
        (AVX512_CPU, [_openblas("cooperlake")], {}, None),  # an AVX-512 family, whatever the case
        (AVX2_CPU, [_openblas("Haswell")], {}, None),  # the CPU has no AVX-512: Haswell is its best
        (AVX2_CPU | {"avx512f", "avx512bw", "avx512dq"}, [_openblas("Haswell")], {}, None),  # no AVX512VL
        (None, [_openblas("Haswell")], {}, None),  # flags unknown (not Linux): no guess
        (AVX512_CPU, [MKL], {}, None),  # no OpenBLAS
        (AVX512_CPU, [_openblas(None)], {}, None),  # an OpenBLAS that does not say its kernels
        (AVX512_CPU, "threadpoolctl is not installed", {}, None),
        (AVX512_CPU, [_openblas("SkylakeX")], {"OPENBLAS_CORETYPE": "SkylakeX"}, None),  # set, and in effect
        (AVX512_CPU, [_openblas("Haswell")], {}, "SkylakeX"),  # --openblas-coretype sets it for the timing
    ],
)
def test_no_hint(flags, pools, environ, coretype):
    assert blas_kernels.narrow_kernels_hint(flags, pools, environ, coretype) is None


def test_hint_names_the_variable_when_the_environment_holds_openblas_back():
    hint = blas_kernels.narrow_kernels_hint(AVX512_CPU, [_openblas("Haswell")], {"OPENBLAS_CORETYPE": "Haswell"})
    assert hint.startswith("OPENBLAS_CORETYPE=Haswell in the environment holds OpenBLAS to its Haswell (AVX2) "
                           "kernels on this AVX-512 CPU; ")
    assert "--openblas-coretype SkylakeX" in hint


def test_blas_line_names_the_kernel_family():
    info = {"threadpools": [_openblas("Haswell"), MKL, {"user_api": "openmp", "internal_api": "openmp"}]}
    assert _blas_line(info) == "BLAS: openblas 0.3.31 (Haswell kernels, 2 threads), mkl 2025.0 (2 threads)"
    assert _blas_line({"threadpools": "no threadpoolctl"}) == "BLAS: unknown (no threadpoolctl)"


def test_numba_line_says_whether_numpy_has_compiled_kernels():
    assert _numba_line({"numba": {"version": "0.68.1", "compiled_kernels": True}}) == \
        "Numba: 0.68.1 (compiled CPU kernels available)"
    assert _numba_line({"numba": {"version": None, "compiled_kernels": False}}) == \
        "Numba: not installed (algorithm='kernels' unavailable on NumPy; pip install 'conv2d[cpu]')"
    assert _numba_line({"numba": {"version": "0.68.1", "compiled_kernels": False}}) == \
        "Numba: 0.68.1 (compiled CPU kernels unavailable: threadpoolctl is not installed)"


def test_refusals_of_a_coretype():
    refusal = blas_kernels.coretype_refusal("SkylakeX", AVX2_CPU, [_openblas("Haswell")])
    assert "AVX-512" in refusal and "avx512f, avx512bw, avx512dq, avx512vl" in refusal and "SIGILL" in refusal
    assert "avx512vl" in blas_kernels.coretype_refusal("sapphirerapids", AVX512_CPU - {"avx512vl"}, [_openblas("X")])
    assert blas_kernels.coretype_refusal("SkylakeX", AVX512_CPU, [_openblas("Haswell")]) is None
    assert blas_kernels.coretype_refusal("Haswell", AVX2_CPU, [_openblas("Haswell")]) is None
    old_cpu = frozenset({"sse2", "sse4_2", "avx"})
    assert "lack avx2, fma" in blas_kernels.coretype_refusal("haswell", old_cpu, [_openblas("Sandybridge")])
    assert blas_kernels.coretype_refusal("Sandybridge", old_cpu, [_openblas("Sandybridge")]) is None
    assert "lack avx512_bf16" in blas_kernels.coretype_refusal("Cooperlake", AVX512_CPU - {"avx512_bf16"},
                                                              [_openblas("SkylakeX")])
    assert blas_kernels.coretype_refusal("Cooperlake", AVX512_CPU, [_openblas("SkylakeX")]) is None
    assert blas_kernels.coretype_refusal("Katmai", old_cpu, [_openblas("Haswell")]) is None  # no known needs
    assert blas_kernels.coretype_refusal("SkylakeX", None, [_openblas("Haswell")]) is None  # flags unknown
    assert "threadpoolctl" in blas_kernels.coretype_refusal("Nehalem", AVX2_CPU, None)
    assert "no OpenBLAS" in blas_kernels.coretype_refusal("Nehalem", AVX2_CPU, [MKL])
    assert "mkl" in blas_kernels.coretype_refusal("Nehalem", AVX2_CPU, [MKL])
    assert "needs a kernel family name" in blas_kernels.coretype_refusal(" ", AVX2_CPU, [_openblas("Haswell")])


def test_mismatch_says_what_openblas_runs_instead():
    assert blas_kernels.coretype_mismatch("skylakex", [_openblas("SkylakeX"), MKL]) is None
    message = blas_kernels.coretype_mismatch("Cooperlake", [_openblas("SkylakeX")])
    assert "OPENBLAS_CORETYPE=Cooperlake is not in effect: OpenBLAS reports SkylakeX kernels" in message
    assert "no OpenBLAS at all" in blas_kernels.coretype_mismatch("Nehalem", [MKL])
    # Two OpenBLAS copies in one process: both must run the family.
    assert blas_kernels.coretype_mismatch("Nehalem", [_openblas("Nehalem"), _openblas("Haswell")]) is not None


def test_coretype_line_says_who_set_it():
    assert blas_kernels.coretype_line(None, {}) is None
    assert blas_kernels.coretype_line(None, {"OPENBLAS_CORETYPE": "Zen"}) == (
        "OpenBLAS kernels: OPENBLAS_CORETYPE=Zen from the environment")
    line = blas_kernels.coretype_line("SkylakeX", {"OPENBLAS_CORETYPE": "Haswell"})
    assert line.startswith("OpenBLAS kernels: SkylakeX, set by --openblas-coretype")
    assert "replacing OPENBLAS_CORETYPE=Haswell of the environment" in line


def test_cli_refuses_a_coretype_it_cannot_honour(monkeypatch, capsys):
    assert main(["bench", "--shapes", TINY, "--isolation", "none", "--openblas-coretype", "Nehalem"]) == 2
    err = capsys.readouterr().err
    assert "--openblas-coretype Nehalem needs --isolation process" in err
    assert "OPENBLAS_CORETYPE=Nehalem in the shell" in err

    monkeypatch.setattr(blas_kernels, "cpu_flags", lambda: AVX2_CPU)
    monkeypatch.setattr(blas_kernels, "threadpool_info", lambda: [_openblas("Haswell")])
    assert main(["bench", "--shapes", TINY, "--openblas-coretype", "SkylakeX"]) == 2
    assert "SIGILL" in capsys.readouterr().err


def test_cli_prints_and_records_the_hint(monkeypatch, tmp_path, capsys):
    """On an AVX-512 CPU whose OpenBLAS runs Haswell kernels by the environment's choice."""
    monkeypatch.setattr(blas_kernels, "cpu_flags", lambda: AVX512_CPU)
    monkeypatch.setattr(blas_kernels, "threadpool_info", lambda: [_openblas("Haswell")])
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")  # this process's OpenBLAS is loaded: changes nothing
    path, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["bench", "--shapes", TINY, "--repeat", "1", "--warmup", "0", "--no-seed", "--isolation", "none",
                 "--json", str(path), "--markdown", str(markdown)]) == 0
    printed = capsys.readouterr().out
    assert "OpenBLAS kernels: OPENBLAS_CORETYPE=Haswell from the environment" in printed
    assert "note: OPENBLAS_CORETYPE=Haswell in the environment holds OpenBLAS to its Haswell (AVX2)" in printed
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["notes"] == [blas_kernels.narrow_kernels_hint(AVX512_CPU, [_openblas("Haswell")])]
    assert report["settings"]["openblas_coretype"] == {"name": "Haswell", "set_by": "environment"}
    assert report["machine"]["env"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert "holds OpenBLAS to its Haswell (AVX2) kernels" in markdown.read_text(encoding="utf-8")


openblas_on_x86 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not _runs_openblas_here(),
    reason="OPENBLAS_CORETYPE names x86-64 kernel families of an OpenBLAS that reports them",
)


@openblas_on_x86
def test_cli_sets_the_coretype_in_each_timing_process(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--shapes", TINY, "--repeat", "1", "--warmup", "0", "--no-seed",
                 "--openblas-coretype", "nehalem", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "OpenBLAS kernels: nehalem, set by --openblas-coretype" in printed
    report = json.loads(path.read_text(encoding="utf-8"))
    threads = report["settings"]["threads"]
    # Read in each child: its OpenBLAS runs the family asked for (OpenBLAS's spelling).
    assert "(Nehalem kernels," in threads["ours"] and "(Nehalem kernels," in threads["floor"]
    assert report["settings"]["openblas_coretype"] == {"name": "nehalem", "set_by": "--openblas-coretype"}
    assert report["notes"] == []


@openblas_on_x86
def test_cli_fails_when_openblas_ignores_the_name(capsys):
    assert main(["bench", "--shapes", TINY, "--repeat", "1", "--warmup", "0", "--no-seed",
                 "--openblas-coretype", "NoSuchCore"]) == 1
    err = capsys.readouterr().err
    assert "timing ours in its own process failed (exit 1)" in err
    assert "OPENBLAS_CORETYPE=NoSuchCore is not in effect: OpenBLAS reports" in err

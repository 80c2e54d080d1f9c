"""The command line of ``python -m conv2d bench``: its options, :func:`run`, the JSON and the plot."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from ... import __version__
from ..._conv import choose_algorithm
from ..._functional import check_algorithm
from ...backends import Backend, BackendUnavailableError, get_backend
from ...backends import _resolve as resolve_backend
from . import allocator, blas_kernels, plausibility
from .calls import SEED_REPEAT
from .isolation import ISOLATION, group_name, time_all, time_group
from .machine import _blas_line, _load_average, _numba_line, _other_load, machine_info
from .memory import SMALL_LIMIT
from .precision import gpu_precision
from .report import GROUPS, LEGEND, STATISTICS, implausible_lines, markdown, summary, summary_lines, table_header, table_row
from .shapes import PRESETS, SHAPE_FORMAT, Shape, parse_shapes
from .timing import WARMUP, WARMUP_REASON, EventTimer, _on_gpu, backend_timer, default_warmup, device_kind


def write_plot(results: list[dict[str, Any]], path: str, title: str, stat: str = "median") -> None:
    """A grouped bar chart, forward+backward ms per shape: ours, torch, the floor (log scale)."""
    # No pyplot: no global backend, no GUI; Agg draws the PNG.
    from matplotlib.figure import Figure

    series = (("ours", "ours_fwdbwd"), ("PyTorch", "torch_fwdbwd"), ("bare matrix products", "floor_fwdbwd"))
    names = [r["shape"]["name"] for r in results]
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for index, (label, key) in enumerate(series):
        values = [r["ms"].get(key, math.nan) for r in results]
        ax.bar([pos + (index - 1) * width for pos in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"forward+backward, ms ({stat})")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------
# Command line


def _shapes_arg(text: str) -> list[Shape]:
    try:
        return parse_shapes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_arg(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m conv2d bench``."""
    parser.add_argument("--backend", default=None,
                        help="backend spec (numpy, torch, torch:cuda, cupy, jax, ...); default: the active one")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="dtype of ours, torch and the floor (the seed is always float64); default float32")
    parser.add_argument("--shapes", nargs="+", type=_shapes_arg, default=None, metavar="SHAPES",
                        help=f"presets ({', '.join(PRESETS)}) and/or custom shapes {SHAPE_FORMAT}; default cpu, "
                             "or gpu on a GPU backend")
    parser.add_argument("--repeat", type=_int_arg(1), default=5,
                        help=f"timed calls per measurement, summarised by --stat (seed: at most {SEED_REPEAT}); default 5")
    parser.add_argument("--warmup", type=_int_arg(0), default=None,
                        help=f"untimed calls of each measured thing first (seed: 1); default {WARMUP['cpu']} "
                             f"({WARMUP_REASON['cpu']}), {WARMUP['gpu']} on a GPU backend ({WARMUP_REASON['gpu']})")
    parser.add_argument("--stat", default="median", choices=tuple(STATISTICS),
                        help="summary of the repeats: median (default), or min, the least disturbed on a busy machine")
    parser.add_argument("--algorithm", default="auto",
                        help="conv2d's algorithm= (one of conv2d.ALGORITHMS, or auto); default auto")
    parser.add_argument("--op", default="conv2d", choices=("conv2d", "conv_transpose2d"),
                        help="what is timed: conv2d (default), or conv_transpose2d, each shape's convolution "
                             "transposed (from its output size back to its input size; against PyTorch's "
                             "conv_transpose2d, without the seed, the bare products or the peak memory)")
    parser.add_argument("--deterministic", action="store_true",
                        help="also time forward+backward with deterministic=True, and its cost over the default "
                             "(column det/dflt)")
    parser.add_argument("--no-seed", dest="seed", action="store_false",
                        help="do not time the seed (NumPy on the CPU, seconds per call on the seed's layer): "
                             "a GPU run's targets do not read it")
    parser.add_argument("--isolation", default="process", choices=ISOLATION,
                        help="process (default): time each implementation (ours, the bare matrix product, PyTorch, "
                             "the original NumPy layer) in a Python process of its own, one after another, so that "
                             "no library's thread pool disturbs another's; none: one after another in this process")
    parser.add_argument("--rounds", type=_int_arg(1), default=3,
                        help="how many times every implementation is timed, in turns (ours, ..., PyTorch, then "
                             "again in the reverse order), each time in a fresh process with --isolation process; "
                             "the samples of all rounds are summarised together, so that a slow spell of a shared "
                             "machine falls on every implementation alike; default 3")
    parser.add_argument("--malloc", default="steady", choices=allocator.MODES,
                        help="steady (default): glibc malloc's thresholds in every timing process where a long "
                             "training run ends (MALLOC_MMAP_THRESHOLD_=32 MiB, MALLOC_TRIM_THRESHOLD_=64 MiB), so "
                             "that no figure depends on what ran before in the process; default: its start-up "
                             "thresholds, which page-fault large arrays afresh on early calls")
    parser.add_argument("--openblas-coretype", metavar="NAME", default=None,
                        help="OpenBLAS's kernel family (OPENBLAS_CORETYPE=NAME, e.g. SkylakeX for its AVX-512 "
                             "kernels) in each timing process, confirmed there; needs --isolation process, since "
                             "OpenBLAS reads it only when NumPy loads it (or set OPENBLAS_CORETYPE in the shell)")
    # Internal: what a child process of --isolation process times (one of report.GROUPS).
    parser.add_argument("--only", choices=GROUPS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH", help="write every number and the machine's details here")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write the header, the table and the summary as Markdown here (docs/benchmarks.md's tables)")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) here; needs matplotlib")


def _algorithm_extra(algorithm: str, backend: Backend) -> dict[str, Any]:
    """conv2d keyword arguments for --algorithm ("auto", the default, adds none)."""
    if algorithm == "auto":
        return {}
    # Checked now, with conv2d's own messages (the choices; a library that lacks it, like CuPy's
    # "kernels"), rather than after the first shape's data is made. Algorithms for some layers only
    # ("winograd", "pointwise") skip the others, shape by shape (calls.ours_calls).
    choose_algorithm(check_algorithm(algorithm), backend)
    return {"algorithm": algorithm}


def _gpu_line(info: dict[str, Any], precision: dict[str, Any]) -> str:
    """What a GPU run's numbers mean: the device, the clock, the float32 settings of both sides."""
    cupy_type = precision.get("cupy_float32_compute_type")
    cupy = f", CuPy {cupy_type}" if cupy_type else ""
    return (f"GPU: {info.get('cuda_device', 'unknown')}; times from CUDA events; TF32 off (torch matmul "
            f"allow_tf32={precision.get('torch.backends.cuda.matmul.allow_tf32')}, cuDNN "
            f"allow_tf32={precision.get('torch.backends.cudnn.allow_tf32')}{cupy}); torch cudnn.benchmark="
            f"{precision.get('torch.backends.cudnn.benchmark')}")


def _coretype_error(args: argparse.Namespace) -> str | None:
    """Why --openblas-coretype cannot be honoured (or, in a timing process, is not), or None."""
    name = args.openblas_coretype
    if name is None:
        return None
    if args.only is not None:  # a timing process: its OpenBLAS is loaded by now; did it take the name?
        return blas_kernels.coretype_mismatch(name, blas_kernels.threadpool_info())
    if args.isolation == "none":
        return (f"--openblas-coretype {name} needs --isolation process (the default): OpenBLAS reads "
                f"{blas_kernels.ENV_VAR} once, when NumPy loads it, and this process has loaded it already. "
                f"Drop --isolation none, or set {blas_kernels.ENV_VAR}={name} in the shell before Python starts")
    return blas_kernels.coretype_refusal(name, blas_kernels.cpu_flags(), blas_kernels.threadpool_info())


def _print_header(args: argparse.Namespace, backend: Backend, info: dict[str, Any], warmup: int,
                  precision: dict[str, Any], hint: str | None) -> None:
    det = "; also deterministic=True" if args.deterministic else ""
    seed = f"seed: {min(args.repeat, SEED_REPEAT)} after 1, float64" if args.seed else "no seed"
    op = "" if args.op == "conv2d" else f", op {args.op}"
    print(f"conv2d {__version__} bench{op}: backend {backend.spec}, {args.dtype}, algorithm {args.algorithm}{det}; "
          f"{args.stat} of {args.repeat} after {warmup} warm-up{'s' if warmup != 1 else ''} ({seed})")
    print(f"CPU: {info['cpu_model'] or info['processor'] or info['machine']}, {info['cpus_usable']} usable cores; "
          f"{_blas_line(info)}")
    if backend.name == "numpy":  # what algorithm='kernels' and auto can run on NumPy
        print(_numba_line(info))
    if _on_gpu(backend):
        print(_gpu_line(info, precision))
    coretype = blas_kernels.coretype_line(args.openblas_coretype)
    if coretype:
        print(coretype)
    print(allocator.allocator_line(args.malloc, args.isolation))
    if hint:
        print(f"note: {hint}")
    if args.deterministic and os.environ.get("CONV2D_DETERMINISTIC"):
        print(f"note: the default follows CONV2D_DETERMINISTIC={os.environ['CONV2D_DETERMINISTIC']!r}, "
              "so det/dflt may compare deterministic with itself")


def _method_note(args: argparse.Namespace, backend: Backend, warmup: int) -> str:
    where = "a process of its own" if args.isolation == "process" else "this process"
    names = ", ".join(group_name(group, backend) for group in GROUPS)
    why = WARMUP_REASON[device_kind(backend)] if args.warmup is None else "--warmup"
    rounds = (f", in {args.rounds} rounds (the order reversed every other round, a fresh process each time)"
              if args.rounds > 1 else "")
    pooled = f"the {args.stat} of all rounds' calls" if args.rounds > 1 else f"their {args.stat}"
    return (f"method: each implementation ({names}) timed over all shapes in {where}, one after another{rounds}; "
            f"per call {warmup} warm-up{'s' if warmup != 1 else ''} ({why}) then {args.repeat} timed calls in a row, "
            f"{pooled} (the seed: {min(args.repeat, SEED_REPEAT)} after 1); no two libraries' calls interleave")


def _coretype_setting(args: argparse.Namespace) -> dict[str, str | None]:
    """OPENBLAS_CORETYPE of the timing processes, and who set it, for the JSON."""
    if args.openblas_coretype:
        return {"name": args.openblas_coretype, "set_by": "--openblas-coretype"}
    name = os.environ.get(blas_kernels.ENV_VAR) or None
    return {"name": name, "set_by": "environment" if name else None}


def _shown_argv() -> list[str]:
    """The bench's arguments as typed (for the Markdown header), from ``bench`` on."""
    argv = sys.argv[1:]
    return argv[argv.index("bench"):] if "bench" in argv else ["bench", *argv]


def _print_table(results: list[dict[str, Any]]) -> None:
    name_width = max(len("shape"), *(len(r["shape"]["name"]) for r in results))
    print(table_header(name_width))
    for result in results:
        print(table_row(result, name_width))
    for line in sorted({f"{what}: {why}" for r in results for what, why in r["skipped"].items()}):
        print(f"  '-' {line}")
    for line in implausible_lines(results):
        print(f"  {line}")
    print(LEGEND)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m conv2d bench``: print the table, write the JSON and plot if asked; exit code."""
    started = time.perf_counter()
    load_before = _load_average()
    try:  # a bad --backend is named as such in the message, not as a get_backend() argument
        backend = resolve_backend(args.backend, "--backend") if args.backend else get_backend()
        backend.dtype(args.dtype)  # fails now, with the reason, rather than at the first shape
    except (ValueError, TypeError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.shapes is None:
        shapes = list(PRESETS["gpu" if _on_gpu(backend) else "cpu"])
    else:
        shapes = [shape for group in args.shapes for shape in group]
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before the long run, not after it
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'conv2d[bench]'", file=sys.stderr)
            return 2
    warmup = default_warmup(backend) if args.warmup is None else args.warmup

    with gpu_precision(backend) as precision:
        try:
            extra = _algorithm_extra(args.algorithm, backend)
        except (ValueError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.only is not None and not args.json:
            print("error: --only (internal: a child of --isolation process) needs --json PATH", file=sys.stderr)
            return 2
        refusal = _coretype_error(args)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 1 if args.only is not None else 2
        if args.only is not None:  # a child of --isolation process: time one implementation, write its samples
            payload = time_group(args, backend, shapes, extra, warmup, args.only)
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(payload, f)
            return 0
        # From this process's OpenBLAS, loaded with the environment's OPENBLAS_CORETYPE or none.
        hint = blas_kernels.current_hint(args.openblas_coretype)
        _print_header(args, backend, machine_info(backend), warmup, precision, hint)
        print(_method_note(args, backend, warmup), flush=True)
        try:
            results, threads = time_all(args, backend, shapes, extra, warmup, GROUPS)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    _print_table(results)
    if args.op != "conv2d":
        print(f"--op {args.op}: ours is conv2d.{args.op} and PyTorch's torch.nn.functional.{args.op}, each with its "
              "backward, on each shape's convolution transposed (its output size back to its input size)")
    summ = summary(results, args.dtype, _on_gpu(backend))
    for line in summary_lines(summ):
        print(line)
    info = machine_info(backend)  # again: torch is imported by now, so its threads are known
    elapsed = time.perf_counter() - started
    load = {"before": load_before, "after": _load_average()}
    print(f"total {elapsed:.0f} s; times in ms, ratios of the {args.stat} times; peak MB: one forward+backward "
          "including its output and gradients, at the default workspace limit and at 64 MB")
    others = _other_load(load, info["cpus_usable"])
    if others is not None and others >= 1:
        # Other processes competing for the cores make multi-threaded BLAS calls many times slower.
        print(f"warning: about {others:.1f} cores were busy with other work (load average {load['before']:.1f} "
              f"before, {load['after']:.1f} after, on {info['cpus_usable']} cores): the times are noisy; "
              "rerun, or use --stat min")

    if args.json:
        report = {
            "command": sys.argv,
            "settings": {"backend": backend.spec, "dtype": args.dtype, "repeat": args.repeat,
                         "seed_repeat": min(args.repeat, SEED_REPEAT), "warmup": warmup, "seed_warmup": 1,
                         "stat": args.stat, "algorithm": args.algorithm, "op": args.op, "on_gpu": _on_gpu(backend),
                         "timer": "cuda_events" if isinstance(backend_timer(backend), EventTimer) else "perf_counter",
                         "gpu_precision": precision, "deterministic": args.deterministic, "seed": args.seed,
                         "small_limit_bytes": SMALL_LIMIT,
                         # results[i]["implausible"] and ["retimed"]: plausibility.implausible's rules
                         "plausibility": {"spread_limit": plausibility.SPREAD_LIMIT,
                                          "min_spread_ms": plausibility.MIN_SPREAD_MS,
                                          "parts": [list(pair) for pair in plausibility.PARTS]},
                         "isolation": args.isolation, "rounds": args.rounds, "threads": threads,
                         "openblas_coretype": _coretype_setting(args),
                         "malloc": {"mode": args.malloc, "line": allocator.allocator_line(args.malloc, args.isolation)}},
            "machine": info,
            "results": results,
            "summary": summ,
            "total_seconds": elapsed,
            "load_average_1min": load,
            "notes": [hint] if hint else [],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    if args.markdown:
        cpu = info["cpu_model"] or info["processor"] or info["machine"]
        header = [f"Command: `python -m conv2d {' '.join(_shown_argv())}`",
                  f"Machine: {cpu}, {info['cpus_usable']} usable cores; load average {load['before'] or 0:.1f} before, "
                  f"{load['after'] or 0:.1f} after; conv2d {__version__}, backend {backend.spec}, {args.dtype}, "
                  f"algorithm {args.algorithm}.",
                  *([f"{_numba_line(info)}."] if backend.name == "numpy" else []),
                  "Threads: " + "; ".join(f"{group_name(group, backend)}: {note}" for group, note in threads.items()) + ".",
                  *(f"{line}." for line in (blas_kernels.coretype_line(args.openblas_coretype),
                                            allocator.allocator_line(args.malloc, args.isolation), hint) if line),
                  _method_note(args, backend, warmup) + "."]
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(results, summ, header))
    if args.plot:
        title = f"conv2d {__version__} on {backend.spec}, {args.dtype}: {info['cpu_model']}"
        write_plot(results, args.plot, title, args.stat)
    return 0

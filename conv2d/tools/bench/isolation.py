"""One implementation at a time: each timed over every shape in a block, by default in a process of its own.

Two thread pools on one small machine disturb each other: OpenBLAS's threads keep spinning for a
while after a call, so a PyTorch call made right after a NumPy one runs on busy cores (on a 2-core
machine the interleaved bench showed PyTorch up to 2x slower than PyTorch alone). So the bench
times ours, the bare matrix product, PyTorch and the original NumPy layer one after another, each
over all shapes, and by default each in a fresh Python process (``--isolation process``) that
imports only what it times; the parent process only merges the samples. The data are the same in
every process: :meth:`Case.make` draws them from a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from ...backends import Backend
from .allocator import child_env
from .blas_kernels import ENV_VAR
from .calls import Case
from .machine import _blas_line
from .plausibility import group_of
from .report import GROUP_NAMES, assemble, measure
from .shapes import Shape
from .timing import _on_gpu

ISOLATION = ("process", "none")


def group_name(group: str, backend: Backend) -> str:
    """The implementation's name in plain words ("PyTorch CPU", "bare matrix product", ...)."""
    if group == "torch":
        return "PyTorch CUDA" if _on_gpu(backend) else "PyTorch CPU"
    return GROUP_NAMES[group]


def threads_note(group: str, backend: Backend) -> str:
    """The library that runs `group` here and its thread count, read in the process that times it."""
    if group == "torch" or (group in ("ours", "floor") and backend.name == "torch"):
        import torch

        device = str(backend.device) if group != "torch" or _on_gpu(backend) else "cpu"
        return f"PyTorch {torch.__version__} on {device}, {torch.get_num_threads()} CPU threads"
    if group in ("ours", "floor") and backend.name == "jax":
        import jax

        return f"JAX {jax.__version__} on {backend.spec} (XLA's own thread pool)"
    if group in ("ours", "floor") and backend.name == "cupy":
        return f"CuPy on {backend.spec}"
    import numpy as np

    try:
        import threadpoolctl

        pools = threadpoolctl.threadpool_info()
    except ImportError:
        pools = "no threadpoolctl"
    return f"NumPy {np.__version__}, {_blas_line({'threadpools': pools})}"


def time_group(args: argparse.Namespace, backend: Backend, shapes: list[Shape], extra: dict[str, Any],
               warmup: int, group: str) -> dict[str, Any]:
    """Time one implementation over every shape, in this process: its samples, skips and peak memory."""
    per_shape = []
    for shape in shapes:
        case = Case.make(backend, shape, args.dtype, extra, op=getattr(args, "op", "conv2d"))
        result = measure(case, args.repeat, args.stat, warmup, args.deterministic, args.seed, groups=(group,))
        del case  # free the device memory of this shape before the next one is made
        per_shape.append({"samples": {name: [t / 1e3 for t in values] for name, values in result["samples_ms"].items()},
                          "skipped": result["skipped"],
                          "peak_bytes": result["peak_bytes"] if group == "ours" else None})
    return {"group": group, "threads": threads_note(group, backend), "shapes": per_shape}


def child_command(args: argparse.Namespace, shapes: list[Shape], group: str, path: str) -> list[str]:
    """The command line that times `group` alone and writes its samples to `path`."""
    command = [sys.executable, "-m", "conv2d", "bench", "--only", group, "--isolation", "none",
               "--dtype", args.dtype, "--repeat", str(args.repeat), "--stat", args.stat,
               "--algorithm", args.algorithm, "--json", path, "--shapes", *(shape.spec for shape in shapes)]
    if args.backend is not None:
        command += ["--backend", args.backend]
    if args.warmup is not None:
        command += ["--warmup", str(args.warmup)]
    if getattr(args, "op", "conv2d") != "conv2d":
        command += ["--op", args.op]
    if args.deterministic:
        command.append("--deterministic")
    if not args.seed:
        command.append("--no-seed")
    if args.openblas_coretype:  # the child confirms that its OpenBLAS took the name
        command += ["--openblas-coretype", args.openblas_coretype]
    return command


def _exit_text(code: int) -> str:
    """"exit 3", or the signal that ended the process (SIGILL: kernels the CPU lacks; SIGKILL: out of memory)."""
    if code >= 0:
        return f"exit {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def time_in_process(args: argparse.Namespace, shapes: list[Shape], group: str) -> dict[str, Any]:
    """:func:`time_group` in a fresh Python process; RuntimeError with its output if it fails."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    # The child must import this very conv2d, wherever it was imported from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if args.openblas_coretype:
        # Read by OpenBLAS when NumPy loads it; harmless in the children that time other libraries.
        env[ENV_VAR] = args.openblas_coretype
    env.update(child_env(args.malloc))  # read by glibc's malloc at start-up, in every child alike
    with tempfile.TemporaryDirectory(prefix="conv2d-bench-") as tmp:
        path = os.path.join(tmp, f"{group}.json")
        done = subprocess.run(child_command(args, shapes, group, path), env=env, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"timing {group} in its own process failed ({_exit_text(done.returncode)}):\n"
                               f"{done.stdout}{done.stderr}")
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def _time_once(args: argparse.Namespace, backend: Backend, shapes: list[Shape], extra: dict[str, Any], warmup: int,
               group: str) -> dict[str, Any] | None:
    """One implementation over every shape, once (None: the seed, not asked for), with its seconds."""
    if group == "seed" and not args.seed:
        return None
    started = time.perf_counter()
    if args.isolation == "process":
        payload = time_in_process(args, shapes, group)
    else:
        payload = time_group(args, backend, shapes, extra, warmup, group)
    return {**payload, "seconds": time.perf_counter() - started}


def time_all(args: argparse.Namespace, backend: Backend, shapes: list[Shape], extra: dict[str, Any], warmup: int,
             groups: tuple[str, ...]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every shape's result, the implementations timed one after another; and each one's threads.

    With ``args.rounds`` > 1 every implementation is timed that many times, in turns, the order
    reversed every other round, and each one's samples of all rounds are pooled. Prints one line
    per implementation and round as it finishes.
    """
    timed = []
    for round_index in range(args.rounds):
        order = groups if round_index % 2 == 0 else tuple(reversed(groups))
        for group in order:
            payload = _time_once(args, backend, shapes, extra, warmup, group)
            if payload is not None:
                print(f"  {group_name(group, backend)}{f' (round {round_index + 1})' if args.rounds > 1 else ''}: "
                      f"{len(shapes)} shape{'s' if len(shapes) != 1 else ''} in {payload.pop('seconds'):.0f} s; "
                      f"{payload['threads']}", flush=True)
            timed.append(payload or {"group": group, "threads": "not timed", "shapes": [
                {"samples": {}, "skipped": {"seed": "not asked for (--no-seed)"}, "peak_bytes": None} for _ in shapes]})
    results = []
    for index, shape in enumerate(shapes):
        samples: dict[str, list[float]] = {}
        skipped: dict[str, str] = {}
        peaks = None
        for payload in timed:
            part = payload["shapes"][index]
            for name, values in part["samples"].items():
                samples.setdefault(name, []).extend(values)
            skipped.update(part["skipped"])
            peaks = part["peak_bytes"] if part["peak_bytes"] is not None else peaks
        results.append(assemble(shape, args.dtype, samples, skipped, peaks, args.stat))
    return recheck(args, backend, shapes, extra, warmup, results), {payload["group"]: payload["threads"] for payload in timed}


def recheck(args: argparse.Namespace, backend: Backend, shapes: list[Shape], extra: dict[str, Any], warmup: int,
            results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`results` after one more timing of each implementation with an implausible figure, on those shapes.

    Each result carries ``implausible`` (:func:`~conv2d.tools.bench.plausibility.implausible` of its
    samples). An implementation with such a measurement is timed once more, as before (in a
    process of its own by default), over the shapes concerned only; its new samples replace all of
    its old ones there, and the result lists it in ``retimed``. What is still implausible after
    that stays in ``implausible``: the table marks it.
    """
    flagged: dict[str, list[int]] = {}
    for index, result in enumerate(results):
        for group in sorted({group_of(name) for name in result["implausible"]}):
            flagged.setdefault(group, []).append(index)
    results = list(results)
    for group, indices in flagged.items():
        names = sorted({name for i in indices for name in results[i]["implausible"] if group_of(name) == group})
        print(f"  {group_name(group, backend)}: implausible figures ({', '.join(names)}) on {len(indices)} "
              f"shape{'s' if len(indices) != 1 else ''}; timing them again", flush=True)
        payload = _time_once(args, backend, [shapes[i] for i in indices], extra, warmup, group)
        if payload is None:
            continue
        for index, part in zip(indices, payload["shapes"]):
            old = results[index]
            samples = {name: [t / 1e3 for t in values] for name, values in old["samples_ms"].items()
                       if group_of(name) != group}
            samples.update(part["samples"])
            new = assemble(shapes[index], args.dtype, samples, {**old["skipped"], **part["skipped"]},
                           old["peak_bytes"], args.stat)
            new["retimed"] = sorted({*old["retimed"], group})
            results[index] = new
    return results

"""One shape, all of it (:func:`measure`), and its report: the table, the targets and the summary."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...backends import Backend
from .calls import (
    SEED_REPEAT,
    Case,
    _torch_device,
    floor_calls,
    ours_calls,
    seed_calls,
    torch_calls,
    transposed_calls,
)
from .memory import LIMITS, SMALL_LIMIT, peak_memory
from .plausibility import implausible
from .shapes import _SHAPE_FIELDS, SEED_SHAPE, Shape
from .timing import Timer, _torch_timer, backend_timer, default_warmup, time_calls

# --------------------------------------------------------------------------------------------------
# One shape, all of it


# How the repeats of one call are summarised. The median is the default; on a shared machine the
# fastest call is the one least disturbed by other processes.
STATISTICS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _device_scope(backend: Backend) -> contextlib.AbstractContextManager[Any]:
    """The backend's GPU as the current device (events and streams belong to one), else nothing."""
    if backend.name == "cupy":
        return backend.device
    if backend.name == "torch" and backend.device.type == "cuda":
        import torch

        return torch.cuda.device(backend.device)
    return contextlib.nullcontext()


def _timers(case: Case, names: Sequence[str]) -> dict[str, Timer]:
    """The timer of each call: the backend's for ours and the floor, the reference device's for torch."""
    ours = backend_timer(case.backend)
    timers = {name: ours for name in names if not name.startswith("torch_")}
    if any(name.startswith("torch_") for name in names):
        torch_timer = _torch_timer(_torch_device(case.backend)[0])
        timers.update({name: torch_timer for name in names if name.startswith("torch_")})
    return timers


# The implementations timed, in the order they run; each is timed in a block (by default a process)
# of its own. Their names in the output, in plain words.
GROUPS = ("ours", "floor", "torch", "seed")
GROUP_NAMES = {"ours": "conv2d (ours)", "floor": "bare matrix product", "torch": "PyTorch",
               "seed": "the original NumPy layer (np.add.at)"}


def time_group(case: Case, group: str, repeat: int, warmup: int, deterministic: bool = False,
               with_seed: bool = True) -> dict[str, list[float]] | str:
    """Seconds of every call of one implementation on one shape, or why it was not timed.

    The implementation's calls run one after another, each after its own warm-up
    (:func:`time_calls`): nothing of another library runs in between.
    """
    if group == "seed":
        seed = seed_calls(case)
        # NumPy on the CPU, and slow: one warm-up call whatever the device, and fewer repeats.
        return seed if isinstance(seed, str) else time_calls(seed, min(repeat, SEED_REPEAT))
    if case.op != "conv2d" and group in ("floor", "seed"):
        return f"times conv2d only, not {case.op}"
    calls = {"ours": lambda: (ours_calls(case, deterministic, as_layer=with_seed) if case.op == "conv2d"
                              else transposed_calls(case)),
             "floor": lambda: floor_calls(case),
             "torch": lambda: torch_calls(case)}[group]()
    if isinstance(calls, str):
        return calls
    with _device_scope(case.backend):
        return time_calls(calls, repeat, warmup, _timers(case, list(calls)))


def measure(case: Case, repeat: int, stat: str = "median", warmup: int | None = None,
            deterministic: bool = False, with_seed: bool = True, groups: Sequence[str] = GROUPS) -> dict[str, Any]:
    """Every number for one shape: times (ms), ratios, peak memory, what was skipped.

    Parameters
    ----------
    case : Case
        The shape and its data on the backend.
    repeat : int
        Timed calls of each measured thing (the seed: at most :data:`SEED_REPEAT`).
    stat : str
        How ``ms`` and the ratios summarise the repeats, a key of :data:`STATISTICS`; the median,
        the minimum and every sample are kept beside them.
    warmup : int, optional
        Untimed calls of each thing first; default :func:`default_warmup` of the backend.
    deterministic : bool
        Also time forward+backward with ``deterministic=True`` ("ours_fwdbwd_det" and the ratio
        "det_over_default").
    with_seed : bool
        Time the seed (NumPy, float64, on the CPU) where it can run the shape.
    groups : sequence of str
        The implementations to time (of :data:`GROUPS`), one after another in this process; the
        peak memory is measured with "ours".
    """
    warmup = default_warmup(case.backend) if warmup is None else warmup
    samples: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for group in groups:
        if group == "seed" and not with_seed:
            skipped["seed"] = "not asked for (--no-seed)"
            continue
        timed = time_group(case, group, repeat, warmup, deterministic, with_seed)
        if isinstance(timed, str):
            skipped[group] = timed
        else:
            samples.update(timed)
    peaks: dict[str, int | None] | None = None
    if "ours" in groups and "ours" not in skipped:
        measured = peak_memory(case) if case.op == "conv2d" else f"measured for conv2d only, not {case.op}"
        if isinstance(measured, str):
            skipped["memory"] = measured
            measured = dict.fromkeys(LIMITS)
        peaks = measured
    return assemble(case.shape, case.dtype, samples, skipped, peaks, stat)


def assemble(shape: Shape, dtype: str, samples: dict[str, list[float]], skipped: dict[str, str],
             peaks: dict[str, int | None] | None, stat: str) -> dict[str, Any]:
    """One shape's result from its samples (seconds), wherever they were measured: ms, ratios, memory."""
    ms = {name: STATISTICS[stat](values) * 1e3 for name, values in samples.items()}
    if {"floor_fwd", "floor_grad_w", "floor_grad_cols"} <= set(ms):
        ms["floor_fwdbwd"] = ms["floor_fwd"] + ms["floor_grad_w"] + ms["floor_grad_cols"]
    s = shape
    itemsize = np.dtype(dtype).itemsize
    outputs = (s.n * s.o * s.out_h * s.out_w + s.n * s.c * s.h * s.w + s.o * (s.c // s.groups) * s.kh * s.kw + s.o)
    return {
        "shape": {**{key: getattr(s, key) for key in _SHAPE_FIELDS}, "name": s.label, "spec": s.spec,
                  "out_h": s.out_h, "out_w": s.out_w},
        "forward_gflop": s.forward_flops / 1e9,
        "ms": ms,
        "median_ms": {name: statistics.median(values) * 1e3 for name, values in samples.items()},
        "min_ms": {name: min(values) * 1e3 for name, values in samples.items()},
        "samples_ms": {name: [t * 1e3 for t in values] for name, values in samples.items()},
        "ratios": {
            "ours_over_torch": _ratio(ms.get("ours_fwdbwd"), ms.get("torch_fwdbwd")),
            "ours_fwd_over_torch_fwd": _ratio(ms.get("ours_fwd"), ms.get("torch_fwd")),
            "fwd_over_floor": _ratio(ms.get("ours_fwd"), ms.get("floor_fwd")),
            "fwdbwd_over_floor": _ratio(ms.get("ours_fwdbwd"), ms.get("floor_fwdbwd")),
            # The seed's layer keeps its patches for the backward pass: compared with ours as a layer.
            "seed_over_ours": _ratio(ms.get("seed_fwdbwd"), ms.get("ours_layer_fwdbwd", ms.get("ours_fwdbwd"))),
            "det_over_default": _ratio(ms.get("ours_fwdbwd_det"), ms.get("ours_fwdbwd")),
        },
        "peak_bytes": dict.fromkeys(LIMITS) if peaks is None else peaks,
        # What any call must hold: y, grad_x, grad_weight, grad_bias. The workspace limit bounds the rest.
        "outputs_bytes": outputs * itemsize,
        "skipped": skipped,
        # Measurements whose figure cannot be right (plausibility.implausible), and the implementations
        # re-timed once because of such a figure (isolation.recheck).
        "implausible": implausible({name: [t * 1e3 for t in values] for name, values in samples.items()},
                                   STATISTICS[stat]),
        "retimed": [],
    }


# --------------------------------------------------------------------------------------------------
# The table

_FLOOR = ("floor_fwd", "floor_grad_w", "floor_grad_cols")

_COLUMNS = (  # header, width, how to get the text from a result, the measurements it is read from
    ("fwd ms", 8, lambda r: _num(r["ms"].get("ours_fwd")), ("ours_fwd",)),
    ("bwd ms", 8, lambda r: _num(r["ms"].get("ours_bwd")), ("ours_bwd",)),
    ("f+b ms", 8, lambda r: _num(r["ms"].get("ours_fwdbwd")), ("ours_fwdbwd",)),
    ("PyTorch f+b", 11, lambda r: _num(r["ms"].get("torch_fwdbwd")), ("torch_fwdbwd",)),
    ("ours/PyTorch", 12, lambda r: _num(r["ratios"]["ours_over_torch"], 2), ("ours_fwdbwd", "torch_fwdbwd")),
    ("fwd/bare", 8, lambda r: _num(r["ratios"]["fwd_over_floor"], 2), ("ours_fwd", "floor_fwd")),
    ("f+b/bare", 8, lambda r: _num(r["ratios"]["fwdbwd_over_floor"], 2), ("ours_fwdbwd", *_FLOOR)),
    ("det/dflt", 8, lambda r: _num(r["ratios"].get("det_over_default"), 2), ("ours_fwdbwd_det", "ours_fwdbwd")),
    ("add.at/ours", 11, lambda r: _num(r["ratios"]["seed_over_ours"], 2), ("seed_fwdbwd", "ours_layer_fwdbwd")),
    ("peak MB dflt/64MB", 17, lambda r: "/".join(_mb(v) for v in r["peak_bytes"].values()), ()),
)

# The measurements each column's figure is read from, by its header.
_SOURCES = {title: names for title, _, _, names in _COLUMNS}

# Appended to a figure read from an implausible measurement (see implausible_lines).
MARK = "!"

# What the columns mean, printed under the table.
LEGEND = ("PyTorch f+b: torch.nn.functional.conv2d and its autograd backward; ours/PyTorch, fwd/bare, "
          "f+b/bare: ratios of times (bare: the bare matrix products of the same sizes, the im2col floor); "
          "add.at/ours: the original NumPy layer (np.add.at, float64) over ours as a layer (ConvolutionLayer "
          "forward then backward; both layers keep what they need from the forward pass)")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def table_header(name_width: int) -> str:
    head = f"{'shape':<{name_width}}" + "".join(f" {title:>{width}}" for title, width, _, _ in _COLUMNS)
    return f"{head}\n{'-' * len(head)}"


def _marked(result: dict[str, Any], text: str, names: Sequence[str]) -> str:
    """`text` with :data:`MARK` when a figure it is read from is implausible (and shown)."""
    bad = result.get("implausible", {})
    return f"{text}{MARK}" if text != "-" and any(name in bad for name in names) else text


def table_row(result: dict[str, Any], name_width: int) -> str:
    return f"{result['shape']['name']:<{name_width}}" + "".join(
        f" {_marked(result, get(result), names):>{width}}" for _, width, get, names in _COLUMNS
    )


def implausible_lines(results: list[dict[str, Any]]) -> list[str]:
    """The footnotes of :data:`MARK`: each implausible measurement, why, and whether it was re-timed."""
    lines = []
    for r in results:
        for name, why in r.get("implausible", {}).items():
            again = " even after one re-time" if name.split("_")[0] in r.get("retimed", []) else ""
            lines.append(f"'{MARK}' {r['shape']['name']}: {why}{again}; the figures read from it are unreliable "
                         "(the machine was busy?): rerun, with more --rounds or --stat min")
    return lines


@dataclass(frozen=True)
class Target:
    """A project goal on one summary number: ``number <op> value``, printed with its note."""

    op: str  # "<=" or ">="
    value: float
    note: str = ""

    def met(self, number: float) -> bool:
        return number <= self.value if self.op == "<=" else number >= self.value

    @property
    def text(self) -> str:
        return f"goal {self.op} {self.value:g}{self.note}"


# The project's goals, printed beside the numbers they are read from: on the CPU those of NumPy with its
# compiled kernels (Numba installed), on a GPU those of CuPy. The ratios' goals apply to their median over
# the preset, with an odd preset the value of its median shape ("worst": to the largest over the preset);
# "seed_shape" to the seed's own layer alone.
TARGETS: dict[str, dict[str, Target]] = {
    "cpu": {
        "ours_over_torch": Target("<=", 1.5, " in float32"),
        "ours_over_torch_worst": Target("<=", 2.5),
        "fwd_over_floor": Target("<=", 1.3),
        "det_over_default": Target("<=", 1.3),
        "seed_shape": Target(">=", 4.0, " in float64"),
    },
    "gpu": {
        "ours_over_torch": Target("<=", 1.5, " in float32, median shape of the gpu preset"),
        "fwd_over_floor": Target("<=", 1.3, ", median shape of the gpu preset"),
        "det_over_default": Target("<=", 1.3),
    },
}

# Summary key -> the label of its line; ratios where the worst shape is the largest, but for seed/ours.
# "{torch}" is "PyTorch CPU" or "PyTorch CUDA".
_SUMMARISED = {
    "ours_over_torch": "fwd+bwd ours/{torch}",
    "fwd_over_floor": "forward ours/bare matrix product",
    "fwdbwd_over_floor": "fwd+bwd ours/bare matrix products",
    "det_over_default": "fwd+bwd deterministic/default",
    "seed_over_ours": "fwd+bwd the original NumPy layer (np.add.at)/ours",
}


def _ratio_summary(results: list[dict[str, Any]], key: str, targets: dict[str, Target]) -> dict[str, Any] | None:
    """Median and worst of one ratio over the shapes that have it, and the goals' verdicts."""
    values = sorted((r["ratios"].get(key), r["shape"]["name"]) for r in results if r["ratios"].get(key) is not None)
    if not values:
        return None
    # For seed/ours the worst shape is the one we beat the seed by least.
    worst = values[0] if key == "seed_over_ours" else values[-1]
    median = statistics.median(v for v, _ in values)
    out: dict[str, Any] = {"median": median, "worst": worst[0], "worst_shape": worst[1], "shapes": len(values)}
    if len(values) % 2:
        out["median_shape"] = values[len(values) // 2][1]
    if key in targets:
        out.update(target=targets[key].text, met=targets[key].met(median))
    if f"{key}_worst" in targets:
        goal = targets[f"{key}_worst"]
        out.update(worst_target=goal.text, worst_met=goal.met(worst[0]))
    return out


def summary(results: list[dict[str, Any]], dtype: str, on_gpu: bool = False) -> dict[str, Any]:
    """The numbers the goals are read from: medians over shapes, the worst shape, the memory check.

    With an odd number of shapes the median is the value of one shape, "the median shape". The
    goals are those of :data:`TARGETS` for the GPU when `on_gpu`, else for the CPU; each number
    with a goal carries its text and ``met``.
    """
    device = "gpu" if on_gpu else "cpu"
    targets = TARGETS[device]
    out: dict[str, Any] = {"targets_for": device}
    for key in _SUMMARISED:
        entry = _ratio_summary(results, key, targets)
        if entry is not None:
            out[key] = entry
    seed_rows = [r for r in results if r["shape"]["spec"] == SEED_SHAPE.spec and r["ratios"]["seed_over_ours"] is not None]
    if seed_rows:
        value = seed_rows[0]["ratios"]["seed_over_ours"]
        out["seed_shape"] = {"seed_over_ours": value, "ours_dtype": dtype}
        if "seed_shape" in targets:
            target = targets["seed_shape"]
            # Only float64 against the seed's float64 counts for the goal.
            out["seed_shape"].update(target=target.text, met=target.met(value) if dtype == "float64" else None)
    limited = [r for r in results if r["peak_bytes"].get("64MB") is not None]
    if limited:
        # Goal: one forward+backward at a 64 MB limit peaks below 64 MB plus its output and gradients.
        extra = {r["shape"]["name"]: r["peak_bytes"]["64MB"] - r["outputs_bytes"] for r in limited}
        out["limit_64MB"] = {
            "shapes": len(limited),
            "max_extra_bytes": max(extra.values()),
            "over_limit": [name for name, value in extra.items() if value > SMALL_LIMIT],
        }
    return out


def _verdict(goal: str | None, met: bool | None, value: float, note: str = "") -> str:
    """" (goal <= 1.3: met)", or " (goal <= 1.3; measured 1.62x)", or the goal alone; empty without one."""
    if goal is None:
        return ""
    verdict = {True: ": met", False: f"; measured {value:.2f}x", None: ""}[met]
    return f" ({goal}{verdict}{note})"


def summary_lines(summ: dict[str, Any]) -> list[str]:
    """The summary under the table, each number with the goal it is read against."""
    lines = []
    torch_name = "PyTorch CUDA" if summ.get("targets_for") == "gpu" else "PyTorch CPU"
    for key, label in _SUMMARISED.items():
        if key in summ:
            t = summ[key]
            worst = "least" if key == "seed_over_ours" else "worst"
            median_shape = f" ({t['median_shape']})" if "median_shape" in t else ""
            lines.append(
                f"{label.format(torch=torch_name)}: median {t['median']:.2f}{median_shape}"
                f"{_verdict(t.get('target'), t.get('met'), t['median'])}, {worst} {t['worst']:.2f} ({t['worst_shape']})"
                f"{_verdict(t.get('worst_target'), t.get('worst_met'), t['worst'])}"
            )
    if "seed_shape" in summ:
        t = summ["seed_shape"]
        note = "" if t["ours_dtype"] == "float64" else (
            f"; ours ran in {t['ours_dtype']}, rerun with --shapes seed --dtype float64 for the goal"
        )
        lines.append(f"seed layer fwd+bwd, the original NumPy layer (np.add.at)/ours: {t['seed_over_ours']:.2f}"
                     f"{_verdict(t.get('target'), t.get('met'), t['seed_over_ours'], note)}")
    if "limit_64MB" in summ:
        m = summ["limit_64MB"]
        over = f"over 64 MB on {len(m['over_limit'])} of" if m["over_limit"] else "within 64 MB on all"
        names = f" ({', '.join(m['over_limit'])})" if m["over_limit"] else ""
        lines.append(
            f"peak at the 64 MB limit minus output and gradients: at most {m['max_extra_bytes'] / 2**20:.1f} MB, "
            f"{over} {m['shapes']} shape{'s' if m['shapes'] != 1 else ''}{names}"
        )
    return lines


def markdown(results: list[dict[str, Any]], summ: dict[str, Any], header: list[str]) -> str:
    """The report as Markdown: the header lines (command, machine, method), the table, the summary."""
    torch_name = "PyTorch CUDA" if summ.get("targets_for") == "gpu" else "PyTorch CPU"
    heads = ["shape", "fwd ms", "bwd ms", "fwd+bwd ms", f"{torch_name} fwd+bwd ms", f"ours/{torch_name}",
             "fwd / bare matrix product", "np.add.at layer / ours", "peak MB (default / 64 MB limit)"]
    lines = [*header, "", "| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for r in results:
        ms, ratios = r["ms"], r["ratios"]
        cells = [r["shape"]["name"], _num(ms.get("ours_fwd")), _num(ms.get("ours_bwd")), _num(ms.get("ours_fwdbwd")),
                 _num(ms.get("torch_fwdbwd")), _num(ratios["ours_over_torch"], 2), _num(ratios["fwd_over_floor"], 2),
                 _num(ratios["seed_over_ours"], 2), " / ".join(_mb(v) for v in r["peak_bytes"].values())]
        sources = [(), *(_SOURCES[title] for title in ("fwd ms", "bwd ms", "f+b ms", "PyTorch f+b", "ours/PyTorch",
                                                         "fwd/bare", "add.at/ours")), ()]
        lines.append("| " + " | ".join(_marked(r, cell, names) for cell, names in zip(cells, sources)) + " |")
    lines += ["", *(f"- {line}" for line in implausible_lines(results) + summary_lines(summ))]
    return "\n".join(lines) + "\n"

"""One shape, all of it (:func:`measure`), and its report: the table, the targets and the summary."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends import Backend
from .calls import (
    SEED_REPEAT,
    Case,
    _torch_device,
    floor_calls,
    ours_calls,
    seed_calls,
    torch_calls,
)
from .memory import LIMITS, SMALL_LIMIT, peak_memory
from .shapes import _SHAPE_FIELDS, SEED_SHAPE
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


def _time_all(case: Case, repeat: int, warmup: int, deterministic: bool,
              with_seed: bool = True) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds of every call of one shape, and what was skipped and why."""
    torch, seed = torch_calls(case), seed_calls(case) if with_seed else "not asked for (--no-seed)"
    skipped = {label: made for label, made in (("torch", torch), ("seed", seed)) if isinstance(made, str)}
    calls = {**ours_calls(case, deterministic), **floor_calls(case), **({} if isinstance(torch, str) else torch)}
    with _device_scope(case.backend):
        samples = time_calls(calls, repeat, warmup, _timers(case, list(calls)))
    if not isinstance(seed, str):
        # NumPy on the CPU, and slow: one warm-up call whatever the device, and fewer repeats.
        samples.update(time_calls(seed, min(repeat, SEED_REPEAT)))
    return samples, skipped


def measure(case: Case, repeat: int, stat: str = "median", warmup: int | None = None,
            deterministic: bool = False, with_seed: bool = True) -> dict[str, Any]:
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
        "det_over_default"), where conv2d takes that argument; skipped with the reason where not.
    with_seed : bool
        Time the seed (NumPy, float64, on the CPU) where it can run the shape.
    """
    warmup = default_warmup(case.backend) if warmup is None else warmup
    samples, skipped = _time_all(case, repeat, warmup, deterministic, with_seed)
    ms = {name: STATISTICS[stat](values) * 1e3 for name, values in samples.items()}
    ms["floor_fwdbwd"] = ms["floor_fwd"] + ms["floor_grad_w"] + ms["floor_grad_cols"]

    peaks = peak_memory(case)
    if isinstance(peaks, str):
        skipped["memory"] = peaks
        peaks = dict.fromkeys(LIMITS)
    s = case.shape
    return {
        "shape": {**{key: getattr(s, key) for key in _SHAPE_FIELDS}, "name": s.label, "spec": s.spec,
                  "out_h": s.out_h, "out_w": s.out_w},
        "forward_gflop": s.forward_flops / 1e9,
        "ms": ms,
        "median_ms": {name: statistics.median(values) * 1e3 for name, values in samples.items()},
        "min_ms": {name: min(values) * 1e3 for name, values in samples.items()},
        "samples_ms": {name: [t * 1e3 for t in values] for name, values in samples.items()},
        "ratios": {
            "ours_over_torch": _ratio(ms["ours_fwdbwd"], ms.get("torch_fwdbwd")),
            "ours_fwd_over_torch_fwd": _ratio(ms["ours_fwd"], ms.get("torch_fwd")),
            "fwd_over_floor": _ratio(ms["ours_fwd"], ms["floor_fwd"]),
            "fwdbwd_over_floor": _ratio(ms["ours_fwdbwd"], ms["floor_fwdbwd"]),
            "seed_over_ours": _ratio(ms.get("seed_fwdbwd"), ms["ours_fwdbwd"]),
            "det_over_default": _ratio(ms.get("ours_fwdbwd_det"), ms["ours_fwdbwd"]),
        },
        "peak_bytes": peaks,
        # What any call must hold: y, grad_x, grad_weight, grad_bias. The workspace limit bounds the rest.
        "outputs_bytes": case.nbytes((s.n, s.o, s.out_h, s.out_w), (s.n, s.c, s.h, s.w),
                                     (s.o, s.c // s.groups, s.kh, s.kw), (s.o,)),
        "skipped": skipped,
    }


# --------------------------------------------------------------------------------------------------
# The table

_COLUMNS = (  # header, width, how to get the text from a result
    ("fwd ms", 9, lambda r: _num(r["ms"]["ours_fwd"])),
    ("bwd ms", 9, lambda r: _num(r["ms"]["ours_bwd"])),
    ("f+b ms", 9, lambda r: _num(r["ms"]["ours_fwdbwd"])),
    ("torch f+b", 9, lambda r: _num(r["ms"].get("torch_fwdbwd"))),
    ("ours/torch", 10, lambda r: _num(r["ratios"]["ours_over_torch"], 2)),
    ("fwd/floor", 9, lambda r: _num(r["ratios"]["fwd_over_floor"], 2)),
    ("f+b/floor", 9, lambda r: _num(r["ratios"]["fwdbwd_over_floor"], 2)),
    ("det/dflt", 8, lambda r: _num(r["ratios"].get("det_over_default"), 2)),
    ("seed/ours", 9, lambda r: _num(r["ratios"]["seed_over_ours"], 2)),
    ("peak MB dflt/64MB", 17, lambda r: "/".join(_mb(v) for v in r["peak_bytes"].values())),
)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def table_header(name_width: int) -> str:
    head = f"{'shape':<{name_width}}" + "".join(f" {title:>{width}}" for title, width, _ in _COLUMNS)
    return f"{head}\n{'-' * len(head)}"


def table_row(result: dict[str, Any], name_width: int) -> str:
    return f"{result['shape']['name']:<{name_width}}" + "".join(
        f" {get(result):>{width}}" for _, width, get in _COLUMNS
    )


@dataclass(frozen=True)
class Target:
    """A project target on one summary number: ``number <op> value``, printed with its note."""

    op: str  # "<=" or ">="
    value: float
    note: str = ""

    def met(self, number: float) -> bool:
        return number <= self.value if self.op == "<=" else number >= self.value

    @property
    def text(self) -> str:
        return f"target {self.op} {self.value:g}{self.note}"


# The project's targets, printed beside the numbers they are read from: issue #3 on the CPU, issue #4
# on a GPU. The ratios' targets apply to their median over the preset, with an odd preset the value
# of its median shape; "seed_shape" to the seed's own layer alone.
TARGETS: dict[str, dict[str, Target]] = {
    "cpu": {
        "ours_over_torch": Target("<=", 1.5, " in float32"),
        "fwd_over_floor": Target("<=", 1.3),
        "det_over_default": Target("<=", 1.3),
        "seed_shape": Target(">=", 3, " in float64"),
    },
    "gpu": {
        "ours_over_torch": Target("<=", 1.5, " in float32, median shape of the gpu preset"),
        "fwd_over_floor": Target("<=", 1.3, ", median shape of the gpu preset"),
        "det_over_default": Target("<=", 1.3),
    },
}

# Summary key -> the label of its line; ratios where the worst shape is the largest, but for seed/ours.
_SUMMARISED = {
    "ours_over_torch": "fwd+bwd ours/torch",
    "fwd_over_floor": "fwd/floor",
    "fwdbwd_over_floor": "fwd+bwd/floor",
    "det_over_default": "fwd+bwd deterministic/default",
    "seed_over_ours": "fwd+bwd seed/ours",
}


def _ratio_summary(results: list[dict[str, Any]], key: str, target: Target | None) -> dict[str, Any] | None:
    """Median and worst of one ratio over the shapes that have it, and the target's verdict."""
    values = sorted((r["ratios"].get(key), r["shape"]["name"]) for r in results if r["ratios"].get(key) is not None)
    if not values:
        return None
    # For seed/ours the worst shape is the one we beat the seed by least.
    worst = values[0] if key == "seed_over_ours" else values[-1]
    median = statistics.median(v for v, _ in values)
    out: dict[str, Any] = {"median": median, "worst": worst[0], "worst_shape": worst[1], "shapes": len(values)}
    if len(values) % 2:
        out["median_shape"] = values[len(values) // 2][1]
    if target is not None:
        out.update(target=target.text, met=target.met(median))
    return out


def summary(results: list[dict[str, Any]], dtype: str, on_gpu: bool = False) -> dict[str, Any]:
    """The numbers the targets are read from: medians over shapes, the worst shape, the memory check.

    With an odd number of shapes the median is the value of one shape, "the median shape". The
    targets are those of :data:`TARGETS` for the GPU when `on_gpu`, else for the CPU; each number
    with a target carries its text and ``met``.
    """
    device = "gpu" if on_gpu else "cpu"
    targets = TARGETS[device]
    out: dict[str, Any] = {"targets_for": device}
    for key in _SUMMARISED:
        entry = _ratio_summary(results, key, targets.get(key))
        if entry is not None:
            out[key] = entry
    seed_rows = [r for r in results if r["shape"]["spec"] == SEED_SHAPE.spec and r["ratios"]["seed_over_ours"] is not None]
    if seed_rows:
        value = seed_rows[0]["ratios"]["seed_over_ours"]
        out["seed_shape"] = {"seed_over_ours": value, "ours_dtype": dtype}
        if "seed_shape" in targets:
            target = targets["seed_shape"]
            # Only float64 against the seed's float64 counts for the target.
            out["seed_shape"].update(target=target.text, met=target.met(value) if dtype == "float64" else None)
    limited = [r for r in results if r["peak_bytes"].get("64MB") is not None]
    if limited:
        # Target: one forward+backward at a 64 MB limit peaks below 64 MB plus its output and gradients.
        extra = {r["shape"]["name"]: r["peak_bytes"]["64MB"] - r["outputs_bytes"] for r in limited}
        out["limit_64MB"] = {
            "shapes": len(limited),
            "max_extra_bytes": max(extra.values()),
            "over_limit": [name for name, value in extra.items() if value > SMALL_LIMIT],
        }
    return out


def _verdict(entry: dict[str, Any], note: str = "") -> str:
    """" (target <= 1.3: met)", or "NOT met", or no verdict where there is none; empty without a target."""
    if "target" not in entry:
        return ""
    verdict = {True: ": met", False: ": NOT met", None: ""}[entry["met"]]
    return f" ({entry['target']}{verdict}{note})"


def summary_lines(summ: dict[str, Any]) -> list[str]:
    """The summary under the table, each number with the target it is read against."""
    lines = []
    for key, label in _SUMMARISED.items():
        if key in summ:
            t = summ[key]
            worst = "least" if key == "seed_over_ours" else "worst"
            median_shape = f" ({t['median_shape']})" if "median_shape" in t else ""
            lines.append(
                f"{label}: median {t['median']:.2f}{median_shape}{_verdict(t)}, "
                f"{worst} {t['worst']:.2f} ({t['worst_shape']})"
            )
    if "seed_shape" in summ:
        t = summ["seed_shape"]
        note = "" if t["ours_dtype"] == "float64" else (
            f"; ours ran in {t['ours_dtype']}, rerun with --shapes seed --dtype float64 for the target"
        )
        lines.append(f"seed geometry fwd+bwd seed/ours: {t['seed_over_ours']:.2f}{_verdict(t, note)}")
    if "limit_64MB" in summ:
        m = summ["limit_64MB"]
        over = f"over 64 MB on {len(m['over_limit'])} of" if m["over_limit"] else "within 64 MB on all"
        names = f" ({', '.join(m['over_limit'])})" if m["over_limit"] else ""
        lines.append(
            f"peak at the 64 MB limit minus output and gradients: at most {m['max_extra_bytes'] / 2**20:.1f} MB, "
            f"{over} {m['shapes']} shape{'s' if m['shapes'] != 1 else ''}{names}"
        )
    return lines

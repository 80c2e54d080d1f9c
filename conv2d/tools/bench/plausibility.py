"""Figures that cannot be right: the rule (:func:`implausible`); :func:`~conv2d.tools.bench.isolation.recheck` re-times them.

A first ``bench --shapes seed --rounds 1`` once printed a forward pass of 506.9 ms beside a forward
and backward pass of 90.0 ms of the same layer ("fwd/bare 25.78"), without a word; reruns gave
26.6 and 37.5 ms. Such a figure says more about the machine at that moment (another process, the
first page faults of a fresh process) than about the code, so the bench times that implementation
again once, on the shapes concerned, and marks in the table and the JSON what is still implausible.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

# (part, whole): the part's calls are the first half of the whole's, which cannot take less time.
# The whole (forward then backward) is flagged too: which of the two is wrong cannot be told.
PARTS = (("ours_fwd", "ours_fwdbwd"), ("ours_bwd", "ours_fwdbwd"), ("torch_fwd", "torch_fwdbwd"),
         ("seed_fwd", "seed_fwdbwd"))

# The middle half of a measurement's samples (the interquartile range) may span at most this fraction
# of their median: repeated calls of the same work on the same data differ by a few percent on a
# quiet machine, by tens of percent on a busy one; beyond half the median the summary is unreliable.
SPREAD_LIMIT = 0.5

# Quartiles of fewer samples say little (``--repeat 1``, the seed's three calls in one round).
MIN_SPREAD_SAMPLES = 4

# An interquartile range below this (ms) is the jitter of any Python call on a busy machine, not a
# disturbed measurement: calls of a few microseconds (the tests' tiny shapes) vary by half their time.
MIN_SPREAD_MS = 0.05


def spread(samples: Sequence[float]) -> float | None:
    """Interquartile range over median of `samples`, or None for too few samples or a median of 0."""
    if len(samples) < MIN_SPREAD_SAMPLES:
        return None
    median = statistics.median(samples)
    if median <= 0:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / median


def implausible(samples_ms: Mapping[str, Sequence[float]],
                summarise: Callable[[list[float]], float] = statistics.median) -> dict[str, str]:
    """The measurements among `samples_ms` (name -> ms per call) whose figure cannot be right, and why.

    Two rules: a part of a call slower than the whole call (:data:`PARTS`: a forward pass slower
    than the same forward pass followed by its backward pass), compared by `summarise` (the
    bench's ``--stat``); and samples that spread too widely to summarise (:func:`spread` above
    :data:`SPREAD_LIMIT`, by at least :data:`MIN_SPREAD_MS`).
    """
    found: dict[str, str] = {}
    for part, whole in PARTS:
        if samples_ms.get(part) and samples_ms.get(whole):
            part_ms, whole_ms = summarise(list(samples_ms[part])), summarise(list(samples_ms[whole]))
            if part_ms > whole_ms:
                why = f"{part} {part_ms:.3g} ms is slower than {whole} {whole_ms:.3g} ms, which makes the same calls and more"
                for name in (part, whole):
                    found[name] = "; ".join(filter(None, (found.get(name), why)))
    for name, values in samples_ms.items():
        ratio = spread(values)
        if ratio is not None and ratio > SPREAD_LIMIT and ratio * statistics.median(values) >= MIN_SPREAD_MS:
            why = (f"{name}'s samples spread too widely: their interquartile range is {ratio:.2f}x their median "
                   f"{statistics.median(values):.3g} ms (at most {SPREAD_LIMIT} expected)")
            found[name] = "; ".join(filter(None, (found.get(name), why)))
    return found


def group_of(name: str) -> str:
    """The implementation (a key of report.GROUPS) that times the measurement `name`: its prefix."""
    return name.split("_")[0]

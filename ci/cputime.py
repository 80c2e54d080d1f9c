"""Time one conv2d call kind on NumPy in this process: the A/B harness behind docs/benchmarks.md's
"Chunk size" and "Copies between stages" tables.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=TREE python ci/cputime.py N,C,H,W,O,K,stride,pad DTYPE MODE [SAMPLES] [REPEAT] [--wall]

MODE: ``fb`` (conv2d then conv2d_backward), ``f``, ``b``, or ``layer`` (ConvolutionLayer forwardpass then
backward, sigmoid). SAMPLES: force that many samples per chunk (``-``: the default rule). Prints the median
of REPEAT (7) calls after 2 warm-ups, in ms of this process's CPU time (``time.process_time``, less
disturbed by other processes on a shared machine than the wall clock), or of the wall clock with
``--wall``. For an A/B comparison, run the two source trees in separate processes, alternated.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import conv2d
from conv2d._geometry import make_geometry
from conv2d._workspace import scratch_bytes


def main(argv: list[str]) -> None:
    wall = "--wall" in argv
    args = [a for a in argv if a != "--wall"]
    shape, dtype, mode = args[0], args[1], args[2]
    samples = args[3] if len(args) > 3 else "-"
    repeat = int(args[4]) if len(args) > 4 else 7
    n, c, h, w, o, k, stride, pad = map(int, shape.split(","))
    limit = None
    if samples != "-":
        geom = make_geometry((n, c, h, w), (o, c, k, k), None, stride=stride, padding=pad)
        limit = scratch_bytes(geom, int(samples), geom.out_h, np.dtype(dtype).itemsize)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((o, c, k, k)).astype(dtype)
    bias = rng.standard_normal(o).astype(dtype)
    kwargs = dict(stride=stride, padding=pad, max_workspace_bytes=limit)
    grad = rng.standard_normal(conv2d.conv2d(x, weight, bias, **kwargs).shape).astype(dtype)
    layer = conv2d.ConvolutionLayer((c, h, w), (k, k), o, stride, padding=pad, dtype=dtype, seed=0,
                                    max_workspace_bytes=limit)

    def forward() -> None:
        conv2d.conv2d(x, weight, bias, **kwargs)

    def backward() -> None:
        conv2d.conv2d_backward(grad, x, weight, **kwargs)

    def both() -> None:
        forward()
        backward()

    def layer_pass() -> None:
        layer.backward(x, layer.forwardpass(x))

    call = {"f": forward, "b": backward, "fb": both, "layer": layer_pass}[mode]
    clock = time.perf_counter if wall else time.process_time
    for _ in range(2):
        call()
    times = []
    for _ in range(repeat):
        start = clock()
        call()
        times.append(clock() - start)
    print(f"{statistics.median(times) * 1e3:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])

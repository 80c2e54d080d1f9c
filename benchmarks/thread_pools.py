"""Forward+backward of NumPy's compiled kernels under three thread arrangements, in this process.

    python benchmarks/thread_pools.py MODE SHAPE [SHAPE ...]     (SHAPE: N,C,H,W,O,K,stride,pad)

MODE ``ours``: the library as shipped (its workers, the BLAS limited to one thread meanwhile); ``both``:
its workers and the BLAS's own threads at once (two pools); ``blas``: the tasks on the calling thread
only, the BLAS with its threads (one pool, the BLAS's). Prints the median of 11 calls (ms) per shape. Run
each mode in a process of its own, several times, in turns (docs/benchmarks.md, "Compiled CPU kernels").
"""

from __future__ import annotations

import sys
import time

import numpy as np

import conv2d
from conv2d.backends._numba import _algorithm, _threads


def arrange(mode: str) -> None:
    if mode == "both":  # nothing for the pool to limit, and two workers: the BLAS keeps its threads
        _threads._blas = lambda: []
        _algorithm.worker_count = lambda: 2
    elif mode == "blas":  # one worker (the caller); the BLAS untouched
        _threads._enter = lambda: 1
        _threads._exit = lambda: None
    elif mode != "ours":
        raise SystemExit(f"MODE must be ours, both or blas, got {mode!r}")


def step(x: np.ndarray, weight: np.ndarray, options: dict) -> None:
    y = conv2d.conv2d(x, weight, **options)
    conv2d.conv2d_backward(y, x, weight, **options)


def main() -> None:
    arrange(sys.argv[1])
    rng = np.random.default_rng(0)
    for shape in sys.argv[2:]:
        n, c, h, w, o, k, stride, pad = (int(v) for v in shape.split(","))
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        weight = rng.standard_normal((o, c, k, k)).astype(np.float32)
        options = dict(stride=stride, padding=pad, algorithm="kernels")

        for _ in range(3):
            step(x, weight, options)
        times = []
        for _ in range(11):
            start = time.perf_counter()
            step(x, weight, options)
            times.append(time.perf_counter() - start)
        print(sys.argv[1], shape, round(float(np.median(times)) * 1e3, 1))


if __name__ == "__main__":
    main()

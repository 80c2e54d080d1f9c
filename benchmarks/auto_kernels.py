"""Forward+backward of NumPy's compiled kernels against what ``auto`` runs without them, in this process.

    python benchmarks/auto_kernels.py WHICH DTYPE SHAPE [SHAPE ...]   (SHAPE: N,C,H,W,O,KH,KW,stride,pad[,dilation,groups])

WHICH ``kernels``: ``algorithm="kernels"``; ``without``: the algorithm ``auto`` picks where Numba is not
installed (``auto``'s rule on a NumPy backend without kernels). Prints one JSON object: per shape, the
algorithm and the median of 7 calls (ms). Run each in a process of its own, in turns, several rounds
(docs/benchmarks.md, "Compiled CPU kernels": where ``auto`` runs them).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np

import conv2d
from conv2d._conv import auto_algorithm
from conv2d._geometry import make_geometry


def main() -> None:
    which, dtype = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    without = dataclasses.replace(conv2d.get_backend("numpy"), kernels=None)
    out = {}
    for spec in sys.argv[3:]:
        n, c, h, w, o, kh, kw, stride, pad, dilation, groups = ([int(v) for v in spec.split(",")] + [1, 1])[:11]
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        weight = rng.standard_normal((o, c // groups, kh, kw)).astype(dtype)
        bias = rng.standard_normal(o).astype(dtype)
        options = dict(stride=stride, padding=pad, dilation=dilation, groups=groups)
        geom = make_geometry(x.shape, weight.shape, None, **options)
        algorithm = which if which == "kernels" else auto_algorithm(without, False, geom)
        times = []
        for call in range(10):
            start = time.perf_counter()
            y = conv2d.conv2d(x, weight, bias, algorithm=algorithm, **options)
            conv2d.conv2d_backward(y, x, weight, algorithm=algorithm, **options)
            if call >= 3:  # after 3 warm-ups
                times.append(time.perf_counter() - start)
        out[spec] = [algorithm, round(float(np.median(times)) * 1e3, 2)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

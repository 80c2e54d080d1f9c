"""
Compare the algorithms
======================

Two views of speed. First, the measurements of ``python -m conv2d bench`` on a 2-core CPU (NumPy,
float32), read from the JSON file the bench wrote (``docs/bench-cpu-float32.json`` in the source;
:doc:`/benchmarks` has the method and the machine): how ``algorithm="auto"`` compares with PyTorch's CPU
convolution, with the bare matrix products of im2col, and with a plain NumPy layer that scatters its
gradients with ``np.add.at``. Second, a quick timing of every algorithm that applies to three small
layers, on the machine that runs this script.
"""

import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FormatStrFormatter, NullFormatter

import conv2d

# %%
# The bench's measurements
# ------------------------
# Each entry of ``results`` holds a layer's shape and the median milliseconds of every implementation;
# ``ratios`` divides them. Values above 1 mean: the first named takes longer.

# The script runs from examples/ or from the source's root (and while the documentation builds).
json_path = next(folder / "docs" / "bench-cpu-float32.json" for folder in (Path.cwd(), *Path.cwd().parents)
                 if (folder / "docs" / "bench-cpu-float32.json").is_file())
bench = json.loads(json_path.read_text(encoding="utf-8"))


def label(shape):
    """A layer's name from its shape: channels, kernel, input size, and what is special."""
    text = f"{shape['c']}->{shape['o']} {shape['kh']}x{shape['kw']} on {shape['h']}x{shape['w']}"
    if shape["stride"] > 1:
        text += f", stride {shape['stride']}"
    if shape["dilation"] > 1:
        text += f", dilation {shape['dilation']}"
    if shape["groups"] > 1:
        text += ", depthwise" if shape["groups"] == shape["c"] else f", {shape['groups']} groups"
    return text


names = [label(result["shape"]) for result in bench["results"]]
ratios = {
    "ours / PyTorch CPU (forward+backward)": [r["ratios"]["ours_over_torch"] for r in bench["results"]],
    "ours / bare matrix product (forward)": [r["ratios"]["fwd_over_floor"] for r in bench["results"]],
    "np.add.at layer / ours (forward+backward)": [r["ratios"]["seed_over_ours"] or np.nan for r in bench["results"]],
}
fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
rows = np.arange(len(names))
height = 0.8 / len(ratios)
for number, (what, values) in enumerate(ratios.items()):
    ax.barh(rows + (number - 1) * height, values, height, label=what)
ax.axvline(1, color="black", lw=1)
ax.set(yticks=rows, yticklabels=names, xscale="log", xlabel="ratio of median times (log scale)",
       title=f"NumPy float32 on {bench['machine']['cpu_count']} CPU cores: algorithm='auto'")
ax.set_xticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
ax.minorticks_off()
ax.invert_yaxis()
ax.grid(axis="x", alpha=0.3)
fig.legend(loc="outside lower center", ncols=2, fontsize=8)
print("median ours / PyTorch CPU:", round(float(np.median(ratios["ours / PyTorch CPU (forward+backward)"])), 2))

# %%
# Every algorithm on this machine
# -------------------------------
# ``conv2d.ALGORITHMS`` lists them; ``kernels`` needs CuPy and ``native`` torch or JAX, ``winograd``
# takes 3x3 kernels with stride 1 and ``pointwise`` 1x1 kernels: an algorithm that does not apply to a
# layer raises ``ValueError``. Forward plus backward, the best of seven calls taken in rounds over the
# algorithms, relative to ``slices``.
# These are a few milliseconds each, timed while the documentation builds: a rough picture, not a
# benchmark.

rng = np.random.default_rng(0)
layers = {  # name: (x shape, weight shape, keyword arguments)
    "64->64 3x3 on 16x16": ((8, 64, 16, 16), (64, 64, 3, 3), {"padding": 1}),
    "64->64 1x1 on 16x16": ((8, 64, 16, 16), (64, 64, 1, 1), {}),
    "32 3x3 depthwise on 32x32": ((8, 32, 32, 32), (32, 1, 3, 3), {"padding": 1, "groups": 32}),
}


def call(x, w, options, algorithm):
    """Forward and backward once; the seconds it took."""
    start = time.perf_counter()
    y = conv2d.conv2d(x, w, **options, algorithm=algorithm)
    conv2d.conv2d_backward(y, x, w, **options, algorithm=algorithm)
    return time.perf_counter() - start


timings = {}
for name, (x_shape, w_shape, options) in layers.items():
    x = rng.standard_normal(x_shape, dtype=np.float32)
    w = rng.standard_normal(w_shape, dtype=np.float32)
    applicable = []
    for algorithm in ("auto", *conv2d.ALGORITHMS):
        try:
            call(x, w, options, algorithm)  # also the warm-up
            applicable.append(algorithm)
        except ValueError as error:  # does not apply to this layer or backend
            print(f"{name}: {algorithm} skipped ({str(error).split(';')[0]})")
    # Rounds over all algorithms in turn, so that a busy moment of the machine falls on each alike.
    best = dict.fromkeys(applicable, float("inf"))
    for _ in range(7):
        for algorithm in applicable:
            best[algorithm] = min(best[algorithm], call(x, w, options, algorithm))
    timings[name] = {algorithm: 1000 * seconds for algorithm, seconds in best.items()}

fig, axes = plt.subplots(1, len(layers), figsize=(10, 3.2), layout="constrained")
for ax, (name, times) in zip(axes, timings.items()):
    algorithms = list(times)
    relative = [times[a] / times["slices"] for a in algorithms]
    ax.barh(algorithms, relative, color=["tab:orange" if a == "auto" else "tab:blue" for a in algorithms])
    ax.axvline(1, color="black", lw=1)
    ax.set(title=name, xlabel="time / slices' time (log scale)", xscale="log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_yaxis()
fig.suptitle("forward+backward on NumPy, this machine")
plt.show()

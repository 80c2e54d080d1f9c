"""
Fit a convolution layer to a hidden one
=======================================

A :class:`conv2d.ConvolutionLayer` learns the filters of a hidden "teacher" convolution from its
outputs, by plain SGD on the mean squared error. The same script runs on the CPU or a GPU::

    python examples/quickstart.py                          # NumPy
    CONV2D_BACKEND=cupy python examples/quickstart.py      # CuPy on the first GPU
    CONV2D_BACKEND=torch:cuda python examples/quickstart.py
"""

import time

import numpy as np

import conv2d

rng = np.random.default_rng(0)
teacher_w = rng.standard_normal((8, 3, 3, 3)) * 0.3  # the filters to discover
images = rng.standard_normal((64, 3, 16, 16))
targets = conv2d.conv2d(images, teacher_w, padding=1)  # plain NumPy in, NumPy out

backend = conv2d.get_backend()  # CONV2D_BACKEND, or NumPy
xp = backend.xp  # the array API namespace of that library
layer = conv2d.ConvolutionLayer((3, 16, 16), (3, 3), 8, 1, padding=1, activation=None, dtype="float32", seed=1)
X, Y = backend.asarray(images, dtype="float32"), backend.asarray(targets, dtype="float32")
print(f"backend: {backend.spec}")

start = time.perf_counter()
for step in range(201):
    out = layer.forwardpass(X)
    error = out - Y
    loss = float(xp.mean(error * error))
    layer.backwardpass(0.2, X, 2 * error / (64 * 8 * 16 * 16))  # dE/d(out) of the mean squared error
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss:.6f}")
seconds = time.perf_counter() - start

learned = backend.to_numpy(layer.weights)
print(f"largest filter error: {np.abs(learned - teacher_w).max():.2e}   ({seconds:.2f} s for 201 steps)")

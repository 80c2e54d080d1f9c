"""``python -m conv2d demo --model autoencoder``: a small convolutional autoencoder on the digits.

A strided :class:`conv2d.ConvolutionLayer` halves the 8x8 digit to 8 channels of 4x4, and a
:class:`conv2d.TransposedConvolutionLayer` with stride 2 brings it back to 8x8; trained to reproduce
its input (mean squared error), then ``reconstructions.png`` shows test digits above their
reconstructions. The data and the options are the classifier demo's (:mod:`conv2d.tools.demo`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import nn, optim
from ..backends import Backend
from ..nn._convolution import ConvolutionLayer
from ..nn._transposed import TransposedConvolutionLayer

DTYPE = "float32"
#: The learning rate of each optimizer when --lr is not given, measured (seed 0, NumPy, batches of 32):
#: the test MSE falls from 0.173 to below 0.01 in 3 epochs (Adam; 0.0025 after 10) and in 3 (SGD; 0.0026).
OPTIMIZER_LR = {"adam": 0.01, "sgd": 5.0}


@dataclass
class AutoencoderRun:
    """A trained autoencoder and its mean squared errors: train per epoch, test from epoch 0 (untrained)."""

    network: nn.Sequential
    backend: Backend
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


def build_autoencoder(backend: Backend, seed: int = 0, dtype: str = DTYPE) -> nn.Sequential:
    """conv 3x3 stride 2 (8) -> relu -> transposed conv 3x3 stride 2 (1) -> sigmoid: 1x8x8 -> 8x4x4 -> 1x8x8."""
    return nn.Sequential([
        ConvolutionLayer((1, 8, 8), (3, 3), 8, 2, padding=1, activation="relu", dtype=dtype, seed=seed,
                         backend=backend),
        TransposedConvolutionLayer((8, 4, 4), 3, 1, stride=2, padding=1, output_padding=1, activation="sigmoid",
                                   dtype=dtype, seed=seed + 1, backend=backend),
    ])


def mse(xp: Any, out: Any, target: Any) -> tuple[float, Any]:
    """The mean squared error and its gradient with respect to `out`."""
    diff = out - target
    size = float(np.prod(tuple(diff.shape)))
    return float(xp.sum(diff * diff)) / size, diff * (2.0 / size)


def train_autoencoder(
    backend: Backend,
    train_x: np.ndarray,
    test_x: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float | None = None,
    optimizer: str = "adam",
    seed: int = 0,
    progress: Callable[..., Any] | None = None,
) -> AutoencoderRun:
    """Train :func:`build_autoencoder` on `train_x` (n, 1, 8, 8) by mini-batches; `lr` defaults to :data:`OPTIMIZER_LR`."""
    xp = backend.xp
    lr = OPTIMIZER_LR[optimizer] if lr is None else lr
    train, test = backend.asarray(train_x, dtype=DTYPE), backend.asarray(test_x, dtype=DTYPE)
    run = AutoencoderRun(build_autoencoder(backend, seed), backend)
    updater = optim.Adam(lr) if optimizer == "adam" else optim.SGD(lr)
    run.test_loss.append(mse(xp, run.network.forwardpass(test), test)[0])
    rng = np.random.default_rng(seed)
    n = train.shape[0]
    batches = -(-n // batch_size)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = backend.asarray(rng.permutation(n).astype(np.int32))
        bar = None if progress is None else progress(total=batches, desc=f"epoch {epoch}/{epochs}")
        loss_sum = 0.0
        for b in range(batches):
            x = xp.take(train, order[b * batch_size : min((b + 1) * batch_size, n)], axis=0)
            loss, grad = mse(xp, run.network.forwardpass(x), x)
            updater.step(run.network, run.network.backward(x, grad)[1])
            loss_sum += loss * x.shape[0]
            if bar is not None:
                bar.update(1)
        run.train_loss.append(loss_sum / n)
        run.test_loss.append(mse(xp, run.network.forwardpass(test), test)[0])
        run.epoch_seconds.append(time.perf_counter() - start)
        if bar is not None:
            bar.set_postfix(loss=f"{run.train_loss[-1]:.4f}", test=f"{run.test_loss[-1]:.4f}")
            bar.close()
    return run


def plot_reconstructions(run: AutoencoderRun, images: np.ndarray, out: Path, count: int = 10) -> Path:
    """Write reconstructions.png to `out`: `count` of `images` above their reconstructions."""
    from matplotlib.figure import Figure  # a bare Figure: no pyplot, no GUI backend, no global state

    out.mkdir(parents=True, exist_ok=True)
    shown = images[:count]
    rebuilt = run.backend.to_numpy(run.network.forwardpass(run.backend.asarray(shown, dtype=DTYPE)))
    fig = Figure(figsize=(1.0 * len(shown) + 0.4, 2.4), layout="constrained")
    axes = fig.subplots(2, len(shown), squeeze=False)
    for column in range(len(shown)):
        for row, picture in enumerate((shown, rebuilt)):
            ax = axes[row, column]
            ax.imshow(picture[column, 0], cmap="gray_r", vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("output")
    fig.suptitle(f"autoencoder reconstructions (test MSE {run.test_loss[-1]:.4f}), backend {run.backend.spec}")
    path = out / "reconstructions.png"
    fig.savefig(path, dpi=100)
    return path


def run_demo(args: Any, backend: Backend, data: Any) -> int:
    """The autoencoder half of ``python -m conv2d demo`` (`args` checked there): train, report, plot."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    optimizer = args.optimizer or "adam"
    with threadpool_limits(limits=args.threads or None):
        run = train_autoencoder(
            backend, data.train_x, data.test_x, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            optimizer=optimizer, seed=args.seed,
            progress=lambda **kw: tqdm(unit="batch", leave=True, dynamic_ncols=True, **kw),
        )
    print(f"reconstruction error (test MSE): {run.test_loss[0]:.4f} untrained, {run.test_loss[-1]:.4f} after "
          f"{args.epochs} epochs ({optimizer}, {sum(run.epoch_seconds):.1f} s, backend {backend.spec})")
    if args.save is not None:
        print(f"wrote {nn.save(run.network, args.save)} (load it with conv2d.nn.load)")
    if not args.no_plots:
        print(f"wrote {plot_reconstructions(run, data.test_x, args.out)}")
    return 0

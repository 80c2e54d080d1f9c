"""``python -m conv2d demo``: train a small CNN on scikit-learn's handwritten digits, on any backend.

The network is made of conv2d's own layers (:class:`conv2d.ConvolutionLayer` and :mod:`conv2d.nn`)
and trained by plain SGD or Adam (:mod:`conv2d.optim`); the same code runs on NumPy, PyTorch, JAX,
array-api-strict or a GPU (``CONV2D_BACKEND=cupy python -m conv2d demo``). On JAX the training
step (forward, loss and backward) is one ``jax.jit`` function. scikit-learn (the data), tqdm (progress
bars), threadpoolctl (thread limits) and matplotlib (plots) are imported only when the demo runs, so
``python -m conv2d info`` stays light.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import nn, optim
from ..backends import ENV_VAR, Backend, BackendUnavailableError, get_backend
from ..backends import _resolve as resolve_backend
from ..nn._convolution import ConvolutionLayer

#: Measured on a 2-core machine with NumPy: 97-99% test accuracy for seeds 0-9, a few seconds a run.
#: threads: the demo's matrices are tiny (at most 32 x 144 by 144 x 2048), so BLAS and OpenMP threads
#: cost more in hand-offs than they save, and on a busy machine they wait for each other: measured on
#: this project's 2-core machine under load, one thread per epoch 0.27 s against 4.2 s with two (NumPy),
#: 0.46 s against 9.9 s (torch).
DEFAULTS: dict[str, Any] = {"epochs": 25, "batch_size": 32, "lr": 0.2, "seed": 0, "threads": 1}
#: The learning rate of each optimizer when --lr is not given.
OPTIMIZER_LR = {"sgd": DEFAULTS["lr"], "adam": 0.01}
DTYPE = "float32"


@dataclass
class Digits:
    """The digits split in two, on the host: images (n, 1, 8, 8) float32 in [0, 1], labels int32."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@dataclass
class TrainingRun:
    """A trained network and its history: one entry per epoch; the test lists start with epoch 0."""

    network: nn.Sequential
    backend: Backend
    train_loss: list[float] = field(default_factory=list)  # mean over the epoch's batches
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)  # [0]: before any training
    test_accuracy: list[float] = field(default_factory=list)  # [0]: before any training
    epoch_seconds: list[float] = field(default_factory=list)  # training plus the test pass


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """scikit-learn's 1,797 8x8 digits (shipped with it, no download), split stratified by `seed`."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    images, labels = sklearn_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # pixel values are 0..16
    # int32 labels: JAX without 64-bit types refuses int64 rather than narrowing it silently.
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels.astype(np.int32), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return Digits(train_x, train_y, test_x, test_y)


def build_network(backend: Backend, seed: int = 0, dtype: str = DTYPE) -> nn.Sequential:
    """conv 3x3 (16) -> relu -> max-pool 2 -> conv 3x3 (32) -> relu -> max-pool 2 -> dense 10 (logits)."""
    return nn.Sequential(
        [
            ConvolutionLayer((1, 8, 8), (3, 3), 16, padding=1, activation="relu", seed=seed, dtype=dtype,
                             backend=backend),
            nn.MaxPoolLayer((16, 8, 8), 2, backend=backend),  # -> 16 x 4 x 4
            ConvolutionLayer((16, 4, 4), (3, 3), 32, padding=1, activation="relu", seed=seed + 1, dtype=dtype,
                             backend=backend),
            nn.MaxPoolLayer((32, 4, 4), 2, backend=backend),  # -> 32 x 2 x 2
            nn.FlattenLayer(),
            nn.DenseLayer(128, 10, seed=seed + 2, dtype=dtype, backend=backend),
        ]
    )


def _count_correct(xp: Any, logits: Any, labels: Any) -> int:
    return int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == labels, xp.int32)))


def evaluate(network: nn.Sequential, images: Any, labels: Any, batch_size: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) of `network` on `images` and `labels`, arrays on the network's backend."""
    n = images.shape[0]
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)  # the standard leaves out-of-bounds slice ends unspecified
        x, y = images[start:stop, ...], labels[start:stop]
        logits = network.forwardpass(x)
        loss, _ = nn.softmax_cross_entropy(logits, y)
        loss_sum += float(loss) * (stop - start)
        correct += _count_correct(network.layers[0].backend.xp, logits, y)
    return loss_sum / n, correct / n


def jax_gradient_step(network: nn.Sequential) -> Callable[[dict[str, Any], Any, Any], tuple[Any, Any, dict[str, Any]]]:
    """Forward, loss and backward of `network` as one ``jax.jit`` function: (parameters, x, y) -> (loss, logits, grads).

    The function runs on a copy of the network, whose layers hold tracers once it has been
    traced; `network` itself is only read (its parameters are the argument).
    """
    import jax

    traced = copy.deepcopy(network)

    def step(parameters: dict[str, Any], x: Any, y: Any) -> tuple[Any, Any, dict[str, Any]]:
        traced.set_parameters(parameters)
        logits = traced.forwardpass(x)
        loss, delta = nn.softmax_cross_entropy(logits, y)
        return loss, logits, traced.backward(x, delta)[1]

    return jax.jit(step)


def train(
    backend: Backend,
    *,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float | None = None,
    optimizer: str = "sgd",
    jit: bool = True,
    seed: int = DEFAULTS["seed"],
    data: Digits | None = None,
    max_batches: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> TrainingRun:
    """Train :func:`build_network` on `data` (default: :func:`load_digits`) on mini-batches.

    `optimizer` is ``"sgd"`` (the layers' own ``backwardpass`` step) or ``"adam"``
    (:class:`conv2d.optim.Adam`); `lr` defaults to :data:`OPTIMIZER_LR` of it. On JAX with `jit`
    the forward, loss and backward pass of a batch are one jitted function
    (:func:`jax_gradient_step`) and the update is applied by :mod:`conv2d.optim`.

    The data goes to the backend's device once; each epoch visits it in an order drawn from
    `seed` on the host, so a seed gives the same run on every backend up to float32 rounding.
    `max_batches` cuts every epoch short (for tests). `progress`, if given, is called as
    ``progress(total=..., desc=...)`` at the start of each epoch and must return a tqdm-like bar
    (``update``, ``set_postfix``, ``close``).
    """
    if optimizer not in OPTIMIZER_LR:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZER_LR)}, got {optimizer!r}")
    lr = OPTIMIZER_LR[optimizer] if lr is None else lr
    data = load_digits(seed) if data is None else data
    xp = backend.xp
    train_x, train_y = backend.asarray(data.train_x, dtype=DTYPE), backend.asarray(data.train_y)
    test_x, test_y = backend.asarray(data.test_x, dtype=DTYPE), backend.asarray(data.test_y)
    run = TrainingRun(build_network(backend, seed), backend)
    jitted = jax_gradient_step(run.network) if jit and backend.name == "jax" else None
    # Plain SGD without jit keeps the layers' own update (backwardpass); optim.SGD(lr) is the same step.
    updater = optim.Adam(lr) if optimizer == "adam" else optim.SGD(lr) if jitted is not None else None
    loss, accuracy = evaluate(run.network, test_x, test_y)
    run.test_loss.append(loss)
    run.test_accuracy.append(accuracy)
    rng = np.random.default_rng(seed)
    n = train_x.shape[0]
    batches = -(-n // batch_size) if max_batches is None else min(max_batches, -(-n // batch_size))
    for epoch in range(1, epochs + 1):
        start_time = time.perf_counter()
        order = backend.asarray(rng.permutation(n).astype(np.int32))
        bar = None if progress is None else progress(total=batches, desc=f"epoch {epoch}/{epochs}")
        seen = correct = 0
        loss_sum = 0.0
        for b in range(batches):
            index = order[b * batch_size : min((b + 1) * batch_size, n)]
            x, y = xp.take(train_x, index, axis=0), xp.take(train_y, index, axis=0)
            if jitted is not None and updater is not None:  # both set together, for the jitted step
                loss, logits, grads = jitted(run.network.parameters(), x, y)
                updater.step(run.network, grads)
            else:
                logits = run.network.forwardpass(x)
                loss, grad = nn.softmax_cross_entropy(logits, y)
                if updater is None:
                    run.network.backwardpass(lr, x, grad)
                else:
                    updater.step(run.network, run.network.backward(x, grad)[1])
            seen += x.shape[0]
            loss_sum += float(loss) * x.shape[0]
            correct += _count_correct(xp, logits, y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
        run.train_loss.append(loss_sum / seen)
        run.train_accuracy.append(correct / seen)
        loss, accuracy = evaluate(run.network, test_x, test_y)
        run.test_loss.append(loss)
        run.test_accuracy.append(accuracy)
        run.epoch_seconds.append(time.perf_counter() - start_time)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", test_acc=f"{accuracy:.3f}")
            bar.close()
    return run


def train_on_dask(
    client: Any, backend: Backend, *, epochs: int, batch_size: int, lr: float | None, optimizer: str = "sgd",
    seed: int, data: Digits,
) -> TrainingRun:
    """:func:`train`'s run on the workers of `client` (:class:`conv2d.distributed.DataParallel`).

    The same network, batches and optimizer steps as :func:`train` (each global batch split over
    the workers, their gradients summed), so the same result to float rounding; prints the workers
    and the time per step with its overhead.
    """
    from .. import distributed

    lr = OPTIMIZER_LR[optimizer] if lr is None else lr
    updater = optim.Adam(lr) if optimizer == "adam" else optim.SGD(lr)
    trainer = distributed.DataParallel(build_network(backend, seed), client)
    run = TrainingRun(build_network(backend, seed), backend)
    test_x, test_y = backend.asarray(data.test_x, dtype=DTYPE), backend.asarray(data.test_y)
    loss, accuracy = evaluate(run.network, test_x, test_y)
    history = trainer.fit(data.train_x, data.train_y, epochs, batch_size, updater, seed,
                          validation_data=(data.test_x, data.test_y))
    run.network = trainer.network()
    run.train_loss, run.train_accuracy = history.loss, history.accuracy
    run.test_loss, run.test_accuracy = [loss, *history.validation_loss], [accuracy, *history.validation_accuracy]
    run.epoch_seconds = history.seconds
    workers = len(client.scheduler_info()["workers"])
    print(
        f"dask: {workers} workers at {client.scheduler.address}; per step {sum(history.step_ms) / epochs:.1f} ms, "
        f"of which overhead {sum(history.overhead_ms) / epochs:.1f} ms (the rest: the slowest worker's compute)"
    )
    return run


def plot(run: TrainingRun, out: Path) -> list[Path]:
    """Write loss.png (loss and accuracy per epoch) and filters.png (the first layer's filters) to `out`."""
    from matplotlib.figure import Figure  # a bare Figure: no pyplot, no GUI backend, no global state

    out.mkdir(parents=True, exist_ok=True)
    epochs = range(1, len(run.train_loss) + 1)
    test_epochs = range(len(run.test_loss))
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, run.train_loss, "o-", label="train")
    loss_ax.plot(test_epochs, run.test_loss, "s-", label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    acc_ax.plot(epochs, run.train_accuracy, "o-", label="train")
    acc_ax.plot(test_epochs, run.test_accuracy, "s-", label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title=f"accuracy (test: {run.test_accuracy[-1]:.1%})")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"conv2d demo: digits, backend {run.backend.spec}")
    loss_path = out / "loss.png"
    fig.savefig(loss_path, dpi=100)

    filters = run.backend.to_numpy(run.network.layers[0].weights)[:, 0]  # (filters, kH, kW): one input channel
    limit = float(np.abs(filters).max())
    cols = min(8, len(filters))
    rows = -(-len(filters) // cols)
    fig = Figure(figsize=(1.1 * cols + 1.2, 1.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for number, ax in enumerate(axes.flat):
        ax.set(xticks=[], yticks=[])
        if number < len(filters):
            image = ax.imshow(filters[number], cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"{number}", fontsize=9)
        else:
            ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.9, label="weight")
    fig.suptitle(f"first layer's learned {filters.shape[1]}x{filters.shape[2]} filters")
    filters_path = out / "filters.png"
    fig.savefig(filters_path, dpi=100)
    return [loss_path, filters_path]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``python -m conv2d demo --help``)."""
    d = DEFAULTS
    add = parser.add_argument
    add("--epochs", type=int, default=d["epochs"], help=f"passes over the training set (default {d['epochs']})")
    add("--batch-size", type=int, default=d["batch_size"], help=f"SGD mini-batch size (default {d['batch_size']})")
    add("--lr", type=float, help=f"learning rate (default {OPTIMIZER_LR['sgd']} for sgd, {OPTIMIZER_LR['adam']} for adam)")
    add("--model", choices=["classifier", "autoencoder"], default="classifier",
        help="classifier (a CNN that labels the digits) or autoencoder (a strided convolution and a transposed "
             "one that reproduce them; writes reconstructions.png) (default classifier)")
    add("--optimizer", choices=list(OPTIMIZER_LR),
        help="sgd (plain, as backwardpass) or adam (default sgd; adam for the autoencoder)")
    add("--no-jit", action="store_true", help="with the JAX backend, run the training step op by op instead of jitted")
    add("--save", type=Path, metavar="PATH",
        help="write the trained network to the folder PATH (architecture.json + state.npz; conv2d.nn.load reads it)")
    add("--backend", help=f"numpy, torch, torch:cuda, cupy, jax, ... (default: ${ENV_VAR}, else numpy)")
    add("--seed", type=int, default=d["seed"], help=f"seed of the split, weights and batch order (default {d['seed']})")
    add("--out", type=Path, default=Path("conv2d-demo"), help="folder for the plots (default ./conv2d-demo/)")
    add("--no-plots", action="store_true", help="do not write loss.png and filters.png")
    add("--threads", type=int, default=d["threads"],
        help=f"BLAS/OpenMP threads of this process while it trains (default {d['threads']}: fastest for the "
             "demo's tiny matrices, above all on a busy machine; 0 leaves the libraries' own defaults)")
    add("--dask", nargs="?", const="", default=None, metavar="ADDRESS",
        help="train data-parallel on Dask workers: the scheduler at ADDRESS, else DASK_SCHEDULER_ADDRESS, "
             "else a local cluster of one worker per core (needs conv2d[dask])")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _unwritable(folder: Path, option: str = "--out", remedy: str = "or --no-plots") -> str | None:
    """Why files could not be written to `folder` (of `option`), or None: checked before training, not after it.

    The folder is created (as :func:`plot` and :func:`conv2d.nn.save` would) and a file made and
    removed in it, the one test that holds whatever the cause (a file on the path, permissions, a
    read-only or virtual file system, root's rights).
    """
    if folder.exists() and not folder.is_dir():
        return f"{option} {folder} is a file, not a folder; choose a folder (it is created if needed), {remedy}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{option} {folder} cannot be written ({exc.strerror or exc}); choose another folder, {remedy}"
    return None


def run(args: argparse.Namespace) -> int:
    """Train with the options in `args`, print the results, write the plots; return the exit status."""
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            return _error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        return _error(f"--lr must be positive, got {args.lr}")
    if args.threads < 0:
        return _error(f"--threads must be 0 (the libraries' defaults) or a number of threads, got {args.threads}")
    try:  # a bad --backend is named as such in the message, not as a get_backend() argument
        backend = resolve_backend(args.backend, "--backend") if args.backend else get_backend()
    except (ValueError, BackendUnavailableError) as exc:
        return _error(str(exc))
    source = "--backend" if args.backend else (ENV_VAR if os.environ.get(ENV_VAR, "").strip() else "default")
    try:  # fail now, with the fix, rather than after training
        import sklearn  # noqa: F401
        from threadpoolctl import threadpool_limits
        from tqdm import tqdm

        if not args.no_plots:
            import matplotlib  # noqa: F401
    except ImportError as exc:
        return _error(f"the demo needs {exc.name}: python -m pip install 'conv2d[demo]'")
    problem = None if args.no_plots else _unwritable(args.out)
    if problem is None and args.save is not None:  # the trained network must not be lost at the end
        problem = _unwritable(args.save, "--save", "or leave --save out")
    if problem:
        return _error(problem)
    if args.model == "autoencoder":
        if args.dask is not None:
            return _error("--dask trains the classifier only; leave it out with --model autoencoder")
        from . import autoencoder

        return autoencoder.run_demo(args, backend, load_digits(args.seed))
    args.optimizer = args.optimizer or "sgd"

    client = started = None
    if args.dask is not None:
        try:
            from .. import distributed

            existing = distributed.current_client()
            client = distributed.client(args.dask or None, backend=backend)
        except (ImportError, ConnectionError, ValueError) as exc:
            return _error(str(exc))
        started = client if client is not existing else None  # ours to close: a connection or a local cluster

    data = load_digits(args.seed)
    print(
        f"digits: {len(data.train_y)} training and {len(data.test_y)} test images (8x8), {DTYPE}, "
        f"backend {backend.spec} (from {source})"
    )
    start = time.perf_counter()
    # Only this process's thread pools, only while it trains (threadpoolctl: OpenBLAS, MKL, OpenMP, torch's).
    with threadpool_limits(limits=args.threads or None):
        if client is None:
            result = train(
                backend, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                jit=not args.no_jit, seed=args.seed, data=data,
                progress=lambda **kw: tqdm(unit="batch", leave=True, dynamic_ncols=True, **kw),
            )
        else:
            try:
                result = train_on_dask(client, backend, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                       optimizer=args.optimizer, seed=args.seed, data=data)
            finally:
                if started is not None:
                    started.close()
    total = time.perf_counter() - start
    seconds = result.epoch_seconds
    accuracy, n_test = result.test_accuracy[-1], len(data.test_y)
    print(f"test accuracy: {accuracy:.2%} ({round(accuracy * n_test)}/{n_test})")
    jitted = " (training step jitted)" if backend.name == "jax" and not args.no_jit else ""
    print(f"backend: {backend.spec}, device: {backend.device}{jitted}, optimizer: {args.optimizer}")
    # The first epoch pays for one-time work (JAX compiles each new shape): the later ones show the pace.
    later = f", then {sum(seconds[1:]) / (len(seconds) - 1):.3f} s" if len(seconds) > 1 else ""
    print(
        f"time per epoch: {sum(seconds) / len(seconds):.3f} s (first {seconds[0]:.3f} s{later}), "
        f"{args.epochs} epochs in {total:.1f} s, {args.threads or 'default'} BLAS thread{'s' if args.threads != 1 else ''}"
    )
    if args.save is not None:
        print(f"wrote {nn.save(result.network, args.save)} (load it with conv2d.nn.load)")
    if not args.no_plots:
        for path in plot(result, args.out):
            print(f"wrote {path}")
    return 0

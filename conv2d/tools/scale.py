"""``python -m conv2d scale``: what Dask workers buy on this machine, for inference and for training.

Inference: a dataset of random images is written to disk as a stack of ``.npy`` files (one per
chunk; workers open them memory-mapped, by name), larger than a chosen memory limit; a CNN's
forward pass runs over it in one process (chunk by chunk, one BLAS thread) and then on 1..k
single-threaded Dask worker processes, each limited to that memory. Printed: images/s, the speed-up
over the one process, every process's peak memory, whether the results are identical.

Training: :class:`conv2d.distributed.DataParallel` on the demo network (synthetic 8x8 images),
ms per step for 1..k workers against the in-process loop on the same global batch, and the
overhead per step (the step's wall time less its slowest worker's compute).

The 1-minute load average is printed beside every figure: on a busy machine the workers compete
with everything else for the cores. dask is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import nn
from ..backends import BackendUnavailableError, get_backend
from ..nn._convolution import ConvolutionLayer

_MIB = 2**20
_WAIT = 900  # seconds: a bound on one measurement (a worker paused at its memory limit would hang)
IMAGE = (3, 32, 32)


def _load() -> str:
    try:
        return f"load {os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "load unknown"


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    Linux's VmHWM belongs to the process image: getrusage's ru_maxrss would also count the parent's
    memory at the fork that started a worker process (it survives the exec).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (_MIB if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere


def inference_network(backend: Any, dtype: str = "float32") -> nn.Sequential:
    """conv 3x3 (16) -> relu -> pool -> conv 3x3 (32) -> relu -> pool -> dense 10, for 3x32x32 images."""
    return nn.Sequential([
        ConvolutionLayer(IMAGE, (3, 3), 16, padding=1, activation="relu", dtype=dtype, seed=0, backend=backend),
        nn.MaxPoolLayer((16, 32, 32), 2, backend=backend),
        ConvolutionLayer((16, 16, 16), (3, 3), 32, padding=1, activation="relu", dtype=dtype, seed=1, backend=backend),
        nn.MaxPoolLayer((32, 16, 16), 2, backend=backend),
        nn.FlattenLayer(),
        nn.DenseLayer(32 * 8 * 8, 10, dtype=dtype, seed=2, backend=backend),
    ])


def _write_dataset(folder: Path, images: int, chunk: int) -> None:
    """Random images as an npy stack, written chunk by chunk (never all in memory)."""
    import dask
    import dask.array as da

    x = da.random.default_rng(0).random((images, *IMAGE), dtype=np.float32, chunks=(chunk, *IMAGE))
    with dask.config.set(scheduler="synchronous"):
        da.to_npy_stack(folder, x, axis=0)


def _one_thread():
    """BLAS limited to one thread here, as in each worker (Dask's nanny sets that): one process = one core."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the comparison is then with however many threads BLAS uses
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _single_process(net: nn.Sequential, folder: Path, chunks: int) -> tuple[np.ndarray, float]:
    """The forward pass over the stack here, chunk by chunk with one BLAS thread: (outputs, seconds)."""
    backend = net.layers[0].backend
    outputs = []
    with _one_thread():
        start = time.perf_counter()
        for index in range(chunks):
            block = np.load(folder / f"{index}.npy", mmap_mode="r")
            outputs.append(backend.to_numpy(net.forwardpass(np.asarray(block))))
        seconds = time.perf_counter() - start
    return np.concatenate(outputs), seconds


def inference(args: argparse.Namespace, backend: Any) -> None:
    import dask.array as da

    from .. import distributed

    images = args.images or int(1.25 * args.memory_limit * _MIB) // (4 * int(np.prod(IMAGE)))
    folder = Path(tempfile.mkdtemp(prefix="conv2d-scale-", dir=args.dir))
    try:
        start = time.perf_counter()
        _write_dataset(folder / "images", images, args.chunk)
        size = sum(f.stat().st_size for f in (folder / "images").iterdir()) / _MIB
        print(
            f"inference: {images} images {'x'.join(map(str, IMAGE))} float32 on disk ({size:.0f} MiB, npy stack in "
            f"chunks of {args.chunk}, written in {time.perf_counter() - start:.1f} s), memory limit "
            f"{args.memory_limit} MiB per worker process ({_load()})"
        )
        net = inference_network(backend)
        chunks = -(-images // args.chunk)
        single, seconds = _single_process(net, folder / "images", chunks)
        base = images / seconds
        print(f"  1 process, no Dask : {base:8.0f} images/s                 ({_load()})")
        for workers in range(1, args.workers + 1):
            with distributed.local_client(workers, memory_limit=f"{args.memory_limit}MiB", backend=backend) as client:
                client.wait_for_workers(workers, timeout=120)
                x = da.from_npy_stack(folder / "images", mmap_mode="r")
                y = distributed.predict(net, x)
                client.compute(y[:1]).result(timeout=_WAIT)  # workers import conv2d, fetch the network
                start = time.perf_counter()
                result = client.compute(y).result(timeout=_WAIT)
                seconds = time.perf_counter() - start
                peaks = sorted(client.run(_peak_rss_mib).values())
            same = "identical" if np.array_equal(result, single) else (
                f"max difference {float(np.abs(result - single).max()):.2e}")
            print(
                f"  {workers} worker(s)        : {images / seconds:8.0f} images/s, {images / seconds / base:.2f}x; "
                f"peak memory per worker {', '.join(f'{p:.0f}' for p in peaks)} MiB; results {same} ({_load()})"
            )
        print(f"  this process's peak memory: {_peak_rss_mib():.0f} MiB (the single-process run included)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def training(args: argparse.Namespace, backend: Any) -> None:
    from .. import distributed
    from ..optim import SGD
    from .demo import build_network

    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        n = batch * args.steps
        X = rng.random((n, 1, 8, 8), dtype=np.float32)
        y = rng.integers(0, 10, n).astype(np.int32)
        net = build_network(backend)
        optimizer = SGD(0.05)
        xs, ys = backend.asarray(X), backend.asarray(y)
        times = []
        with _one_thread():
            for step in range(args.steps):
                start = time.perf_counter()
                rows = slice(step * batch, (step + 1) * batch)
                logits = net.forwardpass(xs[rows, ...])
                _, delta = nn.softmax_cross_entropy(logits, ys[rows])
                optimizer.step(net, net.backward(xs[rows, ...], delta)[1])
                times.append(time.perf_counter() - start)
        local = 1000 * float(np.median(times))
        print(f"training: demo network, global batch {batch}, {args.steps} steps an epoch ({_load()})")
        print(f"  1 process, no Dask : {local:7.2f} ms/step (median)              ({_load()})")
        for workers in range(1, args.workers + 1):
            with distributed.local_client(workers, backend=backend) as client:
                client.wait_for_workers(workers, timeout=120)
                trainer = distributed.DataParallel(build_network(backend), client)
                history = trainer.fit(X, y, epochs=2, batch_size=batch, optimizer=SGD(0.05), seed=0)
            print(  # the second epoch: the first pays for imports and warm-up on the workers
                f"  {workers} worker(s)        : {history.step_ms[-1]:7.2f} ms/step, overhead "
                f"{history.overhead_ms[-1]:5.2f} ms/step; {local / history.step_ms[-1]:.2f}x ({_load()})"
            )


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m conv2d scale``."""
    add = parser.add_argument
    add("--workers", type=_positive, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1), help="measure 1..WORKERS worker processes (default: the usable cores)")
    add("--memory-limit", type=_positive, default=256, metavar="MIB",
        help="memory limit of each worker process in MiB; the dataset is 1.25x that unless --images (default 256)")
    add("--images", type=_positive, help="images in the generated dataset (default: 1.25x the memory limit)")
    add("--chunk", type=_positive, default=64, help="images per chunk (default 64)")
    add("--dir", help="where to write the dataset (default: the system's temporary folder); removed after")
    add("--batch-sizes", type=_batch_sizes, default=[32, 256, 1024], metavar="B,B,...",
        help="global batch sizes for the training measurement (default 32,256,1024)")
    add("--steps", type=_positive, default=20, help="training steps per epoch (default 20)")
    add("--only", choices=("inference", "training"), help="run one of the two measurements")
    add("--backend", help="backend of the networks (default: $CONV2D_BACKEND, else numpy)")


def run(args: argparse.Namespace) -> int:
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as exc:
        print(f"error: scale needs dask and distributed ({exc}): python -m pip install 'conv2d[dask]'", file=sys.stderr)
        return 2
    try:
        backend = get_backend(args.backend) if args.backend else get_backend()
    except (ValueError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"conv2d scale: backend {backend.spec}, {cores} usable cores, {_load()}")
    if args.only in (None, "inference"):
        inference(args, backend)
    if args.only in (None, "training"):
        training(args, backend)
    return 0

"""conv2d on Dask: chunked arrays in and out, a client for a local or remote cluster, inference over
data larger than memory, and data-parallel training (extra ``conv2d[dask]``; ``conv2d[dask-cuda]``
for GPU workers).

This is the only module that imports dask. Dask arrays are not a backend: the library's core runs
unchanged on each chunk (a NumPy or CuPy array), once per batch chunk. Running the core *on* dask
arrays was measured and rejected: im2col puts the whole batch inside one matrix product, so the
result would collapse into one chunk, and dask has no scatter-add.

Networks and layers travel to the workers pickled, with each backend replaced by its spec without
a device number (``cupy:1`` -> ``cupy``, ``torch:cuda:1`` -> ``torch:cuda``): a worker sees the GPU
it was given as device 0 (``dask cuda worker`` sets ``CUDA_VISIBLE_DEVICES``), so it resolves the
spec on its own device.
"""

from __future__ import annotations

import hashlib
import io
import operator
import os
import pickle
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import dask
    import dask.array as da
    import distributed
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"conv2d.distributed needs dask and distributed ({exc}); install them with "
        "python -m pip install 'conv2d[dask]'"
    ) from exc

from . import _functional
from ._geometry import check_output_shape, make_geometry, positive_int
from .backends import Backend, backend_of, get_backend
from .nn import softmax_cross_entropy

__all__ = ["DataParallel", "History", "client", "current_client", "local_client", "predict"]

#: Seconds to wait for a scheduler before saying it cannot be reached.
CONNECT_TIMEOUT = 10.0
# Seconds to wait for a replica's answer (starting one, a step): a bound, not a deadline to meet.
_WAIT = 300.0


# --------------------------------------------------------------------------- dask arrays in, dask arrays out


def _is_dask(array: Any) -> bool:
    return isinstance(array, da.Array)


def _as_dask(array: Any, batch_chunks: tuple[int, ...] | None = None) -> da.Array:
    """`array` as a dask array whose trailing axes are whole; the batch axis chunked as given
    (default: as it is, or one chunk for an in-memory array)."""
    if not _is_dask(array):
        array = da.from_array(array, chunks=array.shape)
    chunks: dict[int, int | tuple[int, ...]] = {axis: -1 for axis in range(1, array.ndim)}
    if batch_chunks is not None:
        chunks[0] = batch_chunks
    return array.rechunk(chunks)


def _meta(array: Any) -> Any:
    """An empty array of `array`'s library, device and dtype: what the argument checks look at."""
    return array._meta if _is_dask(array) else array[(slice(0, 0),) * array.ndim]


def _shape(array: Any) -> tuple[int, ...]:
    # An unknown chunk size makes the batch size NaN; the checks only use the other axes then.
    return tuple(-1 if s != s else int(s) for s in array.shape)


def _forward_block(x: Any, weight: Any, bias: Any, options: dict[str, Any]) -> Any:
    return _functional.conv2d(x, weight, bias, **options)


def _backward_block(grad_out: Any, x: Any, weight: Any, options: dict[str, Any]) -> tuple[Any, Any, Any]:
    return _functional.conv2d_backward(grad_out, x, weight, **options)


def _stacked_part(parts: tuple[Any, ...], index: int) -> Any:
    """One block's partial weight or bias gradient with a leading axis of one, to be summed over blocks."""
    return parts[index][None, ...]


def forward(x: Any, weight: Any, bias: Any | None, options: dict[str, Any]) -> da.Array:
    """:func:`conv2d.conv2d` with a dask array among the arguments: one call per batch chunk.

    Chunks along C, H or W are merged first (a convolution needs whole samples); the result has
    `x`'s batch chunks and whole (O, OH, OW) blocks, in the chunks' library (NumPy or CuPy: the
    same code path, as each chunk is handed to the ordinary call).
    """
    named = {"x": x, "weight": weight} if bias is None else {"x": x, "weight": weight, "bias": bias}
    backend = _functional.check_arrays({name: _meta(a) for name, a in named.items()})
    geom = make_geometry(
        _shape(x), _shape(weight), None if bias is None else _shape(bias),
        stride=options["stride"], padding=options["padding"], dilation=options["dilation"], groups=options["groups"],
    )
    _functional.check_algorithm(options["algorithm"])
    x = _as_dask(x)
    bias_args = (None, None) if bias is None else (_as_dask(bias), "o")
    meta = backend.xp.empty((0, 0, 0, 0), dtype=_meta(x).dtype)
    # Output (n, o, p, q); (c, h, w) and the kernel (k, i, j) are whole blocks, handed over as they are.
    return da.blockwise(
        _forward_block, "nopq", x, "nchw", _as_dask(weight), "okij", *bias_args, options, None,
        new_axes={"p": geom.out_h, "q": geom.out_w}, concatenate=True, meta=meta,
    )


def backward(grad_out: Any, x: Any, weight: Any, options: dict[str, Any]) -> tuple[da.Array, da.Array, da.Array]:
    """:func:`conv2d.conv2d_backward` with a dask array among the arguments.

    One call per batch chunk of `x` (`grad_out` is rechunked to match); `grad_x` has `x`'s batch
    chunks; `grad_weight` and `grad_bias` are tree sums of the chunks' gradients (lazy).
    """
    backend = _functional.check_arrays({"grad_out": _meta(grad_out), "x": _meta(x), "weight": _meta(weight)})
    geom = make_geometry(
        _shape(x), _shape(weight), None,
        stride=options["stride"], padding=options["padding"], dilation=options["dilation"], groups=options["groups"],
    )
    if x.shape[0] == x.shape[0] and grad_out.shape[0] == grad_out.shape[0]:  # known batch sizes (not NaN)
        check_output_shape("grad_out", _shape(grad_out), int(x.shape[0]), geom)
    _functional.check_algorithm(options["algorithm"])
    x = _as_dask(x)
    grad_out = _as_dask(grad_out, x.chunks[0])
    weight = _as_dask(weight)
    dtype = _meta(x).dtype
    # Each batch block's task returns the tuple (grad_x, grad_weight, grad_bias): a 1-D collection
    # of tuples along the batch, from which three arrays pick their part without recomputing it.
    parts = da.blockwise(
        _backward_block, "n", grad_out, "nopq", x, "nchw", weight, "okij", options, None,
        concatenate=True, meta=np.empty((0,), dtype=object),
    )
    _, c, h, w = x.shape
    o, k, i, j = weight.shape
    grad_x = da.blockwise(
        operator.getitem, "nchw", parts, "n", 0, None, new_axes={"c": c, "h": h, "w": w},
        meta=backend.xp.empty((0,) * 4, dtype=dtype),
    )
    # One partial gradient per batch block (a leading axis of one each), then a tree sum over blocks.
    weight_parts = da.blockwise(
        _stacked_part, "nokij", parts, "n", 1, None, new_axes={"o": o, "k": k, "i": i, "j": j},
        adjust_chunks={"n": 1}, meta=backend.xp.empty((0,) * 5, dtype=dtype),
    )
    bias_parts = da.blockwise(
        _stacked_part, "no", parts, "n", 2, None, new_axes={"o": o},
        adjust_chunks={"n": 1}, meta=backend.xp.empty((0, 0), dtype=dtype),
    )
    return grad_x, weight_parts.sum(axis=0), bias_parts.sum(axis=0)


# --------------------------------------------------------------------------- the client


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def client(address: str | None = None, *, timeout: float = CONNECT_TIMEOUT, backend: str | Backend | None = None):
    """A ``distributed.Client``: to `address`, a running one, or a new local cluster.

    Parameters
    ----------
    address : str, optional
        The scheduler, e.g. ``"tcp://10.0.0.5:8786"`` (what ``dask scheduler`` prints). Default:
        Dask's own setting ``scheduler-address`` (the ``DASK_SCHEDULER_ADDRESS`` environment
        variable), else the current default client, else a new ``LocalCluster`` on 127.0.0.1 with
        one single-threaded worker process per core (the nanny of each gives it one BLAS thread,
        so workers do not oversubscribe the cores). When `backend` (default: the active one) is
        CuPy and ``dask_cuda`` is installed, a ``LocalCUDACluster`` instead: one worker per GPU.
    timeout : float, default 10
        Seconds to wait for the scheduler at `address`.
    backend : str or Backend, optional
        Decides between the CPU and the CUDA local cluster (default: :func:`conv2d.get_backend`).

    Returns
    -------
    distributed.Client
        The default client of this process from now on. A local cluster started here stops
        with ``client.close()`` (a CUDA one with ``client.shutdown()``).

    Raises
    ------
    ConnectionError
        No scheduler answered at `address` within `timeout` seconds.
    ValueError
        `address` is not an address Dask can read.

    Examples
    --------
    >>> from conv2d import distributed  # doctest: +SKIP
    >>> with distributed.client() as c:  # doctest: +SKIP
    ...     print(len(c.scheduler_info()["workers"]))
    2
    """
    address = address or dask.config.get("scheduler-address", None)
    if address:
        return _connect(str(address), timeout)
    current = current_client()
    return current if current is not None else local_client(backend=backend)


def current_client():
    """This process's default ``distributed.Client``, or None when there is none."""
    try:
        return distributed.default_client()
    except ValueError:
        return None


# Everything on 127.0.0.1, no dashboard, and the scheduler's HTTP endpoints (health, metrics) on a
# free port: on its default, 8787, a second cluster on the machine would warn and move.
_LOCAL_ONLY = dict(host="127.0.0.1", dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, to hand freed memory back to the
# system at once. Setting it also turns off glibc's adaptive mmap threshold, so every large
# temporary (patch matrices, activations) is a fresh mmap that the kernel zeroes page by page:
# measured 2x slower per training step here (91 -> 199 ms at batch 1024, same process otherwise).
# Local clusters leave glibc's default; README says how to do the same for `dask worker`.
_TRIM_SETTING = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def local_client(workers: int | None = None, *, memory_limit: str | None = None, backend: str | Backend | None = None):
    """A new cluster on this machine (127.0.0.1 only) and its client; ``client.close()`` stops a CPU one.

    Parameters
    ----------
    workers : int, optional
        Worker processes of one thread each; default: one per usable core. (A CUDA cluster has one
        worker per GPU instead.)
    memory_limit : str, optional
        Per worker, e.g. ``"256MiB"``: Dask pauses a worker that passes 80% of it and restarts one
        that passes 95%. Default: Dask's (the machine's memory shared out).
    backend : str or Backend, optional
        When it is CuPy (default: the active backend) and ``dask_cuda`` is installed, a
        ``LocalCUDACluster`` (stop it with ``client.shutdown()``).
    """
    cuda = get_backend(backend).name == "cupy"
    with dask.config.set({_TRIM_SETTING: None}):  # the nannies read it when they start
        if cuda:
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                pass
            else:
                cluster = LocalCUDACluster(threads_per_worker=1, memory_limit=memory_limit or "auto", **_LOCAL_ONLY)
                return distributed.Client(cluster)
        return distributed.Client(
            n_workers=workers or _cores(), threads_per_worker=1, processes=True, memory_limit=memory_limit or "auto",
            **_LOCAL_ONLY,
        )


# DataParallel's argument `client` hides the function's name there.
_default_client = client


def _connect(address: str, timeout: float):
    try:
        # A client that fails to connect would stay registered as the default one if it was
        # made so: try with a private one first.
        distributed.Client(address, timeout=timeout, set_as_default=False).close()
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"no Dask scheduler answered at {address!r} within {timeout:g} s ({exc}). Start one with "
            "`dask scheduler` and pass the address it prints (tcp://HOST:8786), or unset "
            "DASK_SCHEDULER_ADDRESS and pass no address for a local cluster"
        ) from exc
    except ValueError as exc:
        raise ValueError(
            f"{address!r} is not a Dask scheduler address ({exc}); expected e.g. 'tcp://10.0.0.5:8786'"
        ) from exc
    return distributed.Client(address, timeout=timeout)


# --------------------------------------------------------------------------- networks on the workers


def portable_spec(spec: str) -> str:
    """A backend spec without its device number (``"cupy:1"`` -> ``"cupy"``): what a worker
    resolves, on the device it was given."""
    return re.sub(r":\d+$", "", spec)


class _PortablePickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Backend):
            return get_backend, (portable_spec(obj.spec),)
        return NotImplemented


def dumps(obj: Any) -> bytes:
    """Pickle `obj` (a layer, a network) with every backend replaced by its :func:`portable_spec`."""
    buffer = io.BytesIO()
    _PortablePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


# A worker keeps the networks it has unpickled, one copy per thread (forwardpass keeps state on
# the layers), keyed by the payload's digest: a network is unpickled once per worker thread.
_networks = threading.local()
_KEEP_NETWORKS = 4


def _network(payload: bytes, digest: str) -> Any:
    cache = getattr(_networks, "cache", None)
    if cache is None:
        cache = _networks.cache = OrderedDict()
    if digest not in cache:
        cache[digest] = pickle.loads(payload)
        while len(cache) > _KEEP_NETWORKS:
            cache.popitem(last=False)
    cache.move_to_end(digest)
    return cache[digest]


def _predict_block(x: Any, payload: bytes, digest: str) -> Any:
    out = _network(payload, digest).forwardpass(x)
    return backend_of(x, "x").asarray(out)  # back in the chunk's library (NumPy chunks: host memory)


def predict(net: Any, x: Any) -> da.Array:
    """`net`'s forward pass over a dask array, one chunk at a time, on whatever scheduler computes it.

    Parameters
    ----------
    net : layer or nn.Sequential
        Anything with ``forwardpass(X)`` that pickles (conv2d's layers and networks do). It is
        pickled once, into one task of the graph: each worker fetches it once and unpickles it
        once (per thread), whatever the number of chunks.
    x : dask array, shape (N, ...)
        The input, chunked along the batch (other axes are merged into whole samples), with NumPy
        or CuPy chunks, e.g. ``dask.array.from_zarr(...)`` or a ``numpy.load(..., mmap_mode="r")``
        wrapped by ``dask.array.from_array``.

    Returns
    -------
    dask array, shape (N, ...)
        Lazy; `x`'s batch chunks, in the library of `x`'s chunks. Computing it holds a few chunks
        and their activations per worker at a time, so the input may be larger than memory.
        If a worker dies, Dask recomputes its chunks elsewhere.

    Notes
    -----
    The output's shape and dtype are found by running `net` on one sample here, at once.

    Examples
    --------
    >>> import dask.array as da, numpy as np, conv2d  # doctest: +SKIP
    >>> from conv2d import distributed, nn  # doctest: +SKIP
    >>> layer = conv2d.ConvolutionLayer((1, 8, 8), (3, 3), 4, seed=0)  # doctest: +SKIP
    >>> x = da.random.random((1000, 1, 8, 8), chunks=(100, 1, 8, 8))  # doctest: +SKIP
    >>> distributed.predict(layer, x).compute().shape  # doctest: +SKIP
    (1000, 4, 6, 6)
    """
    if not hasattr(net, "forwardpass"):
        raise TypeError(f"net must be a layer or network with forwardpass(X), got {type(net).__name__}")
    if not _is_dask(x):
        raise TypeError(
            f"x must be a dask array chunked along the batch, got {type(x).__module__}.{type(x).__qualname__}; "
            "wrap it, e.g. dask.array.from_array(x, chunks=(1000, -1, -1, -1))"
        )
    if x.ndim < 2:
        raise ValueError(f"x must have a batch axis and sample axes, got shape {x.shape}")
    x = _as_dask(x)
    payload = dumps(net)
    digest = hashlib.sha256(payload).hexdigest()
    chunk_backend = backend_of(_meta(x), "x")
    probe = pickle.loads(payload).forwardpass(chunk_backend.xp.zeros((1, *x.shape[1:]), dtype=x.dtype))
    probe = chunk_backend.asarray(probe)
    # One key holds the pickled network; every chunk's task depends on it.
    network = dask.delayed(payload, name=f"conv2d-network-{digest[:16]}", pure=True)
    in_index = "n" + "abcdefghijklm"[: x.ndim - 1]
    out_index = "n" + "opqrstuvwxyz"[: probe.ndim - 1]
    return da.blockwise(
        _predict_block, out_index, x, in_index, network, None, digest, None,
        new_axes=dict(zip(out_index[1:], probe.shape[1:], strict=True)),
        concatenate=True, meta=chunk_backend.xp.empty((0,) * probe.ndim, dtype=probe.dtype),
    )


# --------------------------------------------------------------------------- data-parallel training


def _network_backend(net: Any) -> Backend:
    """The backend of `net`'s parameters (all of one backend, as the layers check)."""
    params = net.parameters()
    if not params:
        raise ValueError("the network has no parameters to train")
    return backend_of(next(iter(params.values())), "parameter")


class _Replica:
    """One worker's copy of the network, its optimizer and the training data (a Dask actor).

    Each step applies the previous step's summed gradient (so all replicas stay identical: the
    same update on the same numbers) and returns the gradient of its part of the new batch as one
    flat host buffer: one message out and one back per worker and step.
    """

    def __init__(self, payload: bytes) -> None:
        self.net = pickle.loads(payload)
        self.backend = _network_backend(self.net)
        params = self.net.parameters()
        self.names = list(params)
        self.shapes = [tuple(params[name].shape) for name in self.names]
        self.dtypes = [params[name].dtype for name in self.names]
        self.optimizer: Any = None
        self.X = self.y = None

    def start(self, optimizer_payload: bytes, X: np.ndarray, y: np.ndarray) -> None:
        """Take the optimizer (with its state) and the training data for a fit."""
        self.optimizer = pickle.loads(optimizer_payload)
        self.X = self.backend.asarray(X, dtype=self.dtypes[0])
        self.y = self.backend.asarray(y)

    def step(self, summed: np.ndarray | None, indices: np.ndarray | None, weight: float) -> tuple | None:
        """Apply `summed` (the last step's total gradient), then return (flat gradient of the mean loss
        over `indices` times `weight`, loss sum, correct count, compute seconds) for these rows."""
        start = time.perf_counter()
        if summed is not None:
            self.optimizer.step(self.net, self._unflatten(summed))
        if indices is None:
            return None
        xp = self.backend.xp
        rows = self.backend.asarray(indices)
        x, y = xp.take(self.X, rows, axis=0), xp.take(self.y, rows, axis=0)
        logits = self.net.forwardpass(x)
        loss, delta = softmax_cross_entropy(logits, y)
        # weight = part / global batch: the parts' gradients then add up to the global mean's.
        _, grads = self.net.backward(x, delta * weight)
        flat = np.concatenate([self.backend.to_numpy(grads[name]).reshape(-1) for name in self.names])
        correct = int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == y, xp.int32)))
        return flat, float(loss) * int(indices.shape[0]), correct, time.perf_counter() - start

    def _unflatten(self, flat: np.ndarray) -> dict[str, Any]:
        grads, offset = {}, 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            size = int(np.prod(shape))
            grads[name] = self.backend.asarray(flat[offset : offset + size].reshape(shape), dtype=dtype)
            offset += size
        return grads

    def state(self) -> bytes:
        """The network's parameters (host copies) and the optimizer, pickled portably."""
        return dumps((self.net.state_dict(), self.optimizer))


@dataclass
class History:
    """What :meth:`DataParallel.fit` measured, one entry per epoch."""

    loss: list[float] = field(default_factory=list)  # mean training loss over the epoch's samples
    accuracy: list[float] = field(default_factory=list)  # training accuracy over the epoch's samples
    seconds: list[float] = field(default_factory=list)  # wall time of the epoch (training only)
    step_ms: list[float] = field(default_factory=list)  # mean wall time of one step
    overhead_ms: list[float] = field(default_factory=list)  # step_ms less the slowest worker's compute
    validation_loss: list[float] = field(default_factory=list)  # when fit was given validation data
    validation_accuracy: list[float] = field(default_factory=list)


class DataParallel:
    """Train a network on several Dask workers at once: one replica per worker, one batch split over them.

    Parameters
    ----------
    net : nn.Sequential or layer
        The network to train (it has ``parameters()``, ``backward()``, ``state_dict()``); it is
        copied to every worker and left unchanged here: :meth:`network` returns the trained copy.
    client : distributed.Client, optional
        Default: :func:`client` (a local cluster unless one is configured).

    Notes
    -----
    Each step of :meth:`fit` draws the global batch, splits it into one contiguous part per
    worker, and each replica returns the gradient of its part (weighted by its share of the batch)
    as one flat buffer; they are summed here and the sum goes back with the next step's indices,
    where every replica applies the same optimizer step. So the result is single-process training
    on the global batch, to float rounding. The training data is copied once to every worker
    (it must fit in each worker's memory); a worker lost during :meth:`fit` fails the fit.

    Examples
    --------
    >>> from conv2d import distributed, optim
    >>> from conv2d.tools import demo  # doctest: +SKIP
    >>> import conv2d  # doctest: +SKIP
    >>> data = demo.load_digits()  # doctest: +SKIP
    >>> trainer = distributed.DataParallel(demo.build_network(conv2d.get_backend()))  # doctest: +SKIP
    >>> history = trainer.fit(data.train_x, data.train_y, epochs=2, batch_size=32,
    ...                       optimizer=optim.SGD(0.2), seed=0)  # doctest: +SKIP
    >>> net = trainer.network()  # doctest: +SKIP
    """

    def __init__(self, net: Any, client: Any = None) -> None:
        for method in ("parameters", "backward", "state_dict", "load_state_dict", "forwardpass"):
            if not callable(getattr(net, method, None)):
                raise TypeError(
                    f"net must be a conv2d layer or nn.Sequential with {method}(), got {type(net).__name__}"
                )
        _network_backend(net)
        self.client = _default_client() if client is None else client
        self._net = net
        self._payload = dumps(net)
        self._replicas: list[Any] = []

    def _start_replicas(self) -> list[Any]:
        if not self._replicas:
            workers = sorted(self.client.scheduler_info()["workers"])
            if not workers:
                raise RuntimeError("the Dask cluster has no workers; start some (dask worker ADDRESS --nthreads 1)")
            futures = [
                self.client.submit(_Replica, self._payload, actor=True, workers=[w], pure=False) for w in workers
            ]
            self._replicas = [future.result(timeout=_WAIT) for future in futures]
        return self._replicas

    def fit(
        self,
        X: Any,
        y: Any,
        epochs: int,
        batch_size: int,
        optimizer: Any,
        seed: int = 0,
        validation_data: tuple[Any, Any] | None = None,
    ) -> History:
        """Minimise the mean softmax cross-entropy of the network on (X, y) by mini-batches.

        Parameters
        ----------
        X : array, shape (n, ...)
            Training inputs (any supported library; copied to the host, then to each worker once).
        y : array of int, shape (n,)
            Class labels, as :func:`conv2d.nn.softmax_cross_entropy` takes them.
        epochs, batch_size : int
            Passes over the data, and the global batch (split over the workers at each step).
        optimizer : conv2d.optim.SGD or conv2d.optim.Adam
            Copied to every worker with its state; after the fit it holds the replicas' state, so
            a second fit continues the first.
        seed : int, default 0
            Each epoch visits the rows in the order of ``numpy.random.default_rng(seed).permutation``
            (one generator for the whole fit), in batches of `batch_size`, the last one smaller if
            needed: the order of ``conv2d.tools.demo.train``.
        validation_data : (X, y), optional
            Evaluated here after each epoch (the network is fetched from a worker).

        Returns
        -------
        History
            Per epoch: training loss and accuracy, seconds, ms per step and overhead per step
            (the step's wall time less its slowest worker's compute time), validation scores.
        """
        epochs = positive_int("epochs", epochs)
        batch_size = positive_int("batch_size", batch_size)
        if not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"optimizer must be a conv2d.optim optimizer with step(), got {type(optimizer).__name__}")
        X, y = _host(X), _host(y)
        if X.ndim < 2:
            raise ValueError(f"X must have a batch axis and sample axes, got shape {X.shape}")
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},), one label per row of X, got {y.shape}")
        # The epoch's loss and accuracy are means over the rows, and its ms per step over the steps.
        if X.shape[0] == 0:
            raise ValueError(f"X has no rows (shape {X.shape}): fit needs at least one sample")
        if validation_data is not None:
            validation_data = _validation_data(validation_data)
        replicas = self._start_replicas()
        optimizer_payload = dumps(optimizer)
        _results([replica.start(optimizer_payload, X, y) for replica in replicas])
        history = History()
        rng = np.random.default_rng(seed)
        n = X.shape[0]
        pending: np.ndarray | None = None  # the summed gradient not yet applied
        for _ in range(epochs):
            start = time.perf_counter()
            order = rng.permutation(n)
            loss_sum, correct, overhead = 0.0, 0, 0.0
            steps = 0
            for batch_start in range(0, n, batch_size):
                step_start = time.perf_counter()
                batch = order[batch_start : batch_start + batch_size]
                parts = np.array_split(batch, len(replicas))
                futures = [
                    replica.step(pending, part if len(part) else None, len(part) / len(batch))
                    for replica, part in zip(replicas, parts, strict=True)
                ]
                results = [result for result in _results(futures) if result is not None]
                pending = results[0][0]
                for result in results[1:]:
                    pending = pending + result[0]
                loss_sum += sum(result[1] for result in results)
                correct += sum(result[2] for result in results)
                overhead += time.perf_counter() - step_start - max(result[3] for result in results)
                steps += 1
            seconds = time.perf_counter() - start
            history.loss.append(loss_sum / n)
            history.accuracy.append(correct / n)
            history.seconds.append(seconds)
            history.step_ms.append(1000 * seconds / steps)
            history.overhead_ms.append(1000 * overhead / steps)
            if validation_data is not None:
                _results([replica.step(pending, None, 0.0) for replica in replicas])
                pending = None
                loss, accuracy = _evaluate(self.network(), *validation_data)
                history.validation_loss.append(loss)
                history.validation_accuracy.append(accuracy)
        if pending is not None:
            _results([replica.step(pending, None, 0.0) for replica in replicas])
        _, trained_optimizer = pickle.loads(replicas[0].state().result(timeout=_WAIT))
        # The optimizer continues from where the replicas left it (its state on this process's backend).
        optimizer.__dict__.update(_to_backend(trained_optimizer.__dict__, _network_backend(self._net)))
        return history

    def network(self) -> Any:
        """A copy of the network on this process's backend, with the replicas' current parameters."""
        net = pickle.loads(pickle.dumps(self._net))
        if self._replicas:
            state, _ = pickle.loads(self._replicas[0].state().result(timeout=_WAIT))
            net.load_state_dict(state)
        return net


def _validation_data(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of fit's `validation_data` on the host, checked before any training: its scores are means over its rows."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"validation_data must be a pair (X, y), got {type(data).__name__}")
    X, y = _host(data[0]), _host(data[1])
    if X.ndim < 2 or X.shape[0] == 0:
        raise ValueError(f"validation_data's X must have at least one row and sample axes, got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"validation_data's y must have shape ({X.shape[0]},), one label per row of its X, got {y.shape}")
    return X, y


def _host(array: Any) -> np.ndarray:
    """`array` in host memory as NumPy (from any supported library, or a sequence)."""
    if isinstance(array, np.ndarray):
        return array
    try:
        return backend_of(array, "array").to_numpy(array)
    except TypeError:
        return np.asarray(array)


def _results(futures: list[Any]) -> list[Any]:
    return [future.result(timeout=_WAIT) for future in futures]


def _to_backend(value: Any, backend: Backend) -> Any:
    """`value` with every array in it (through dicts, lists and tuples) moved to `backend`."""
    if isinstance(value, dict):
        return {key: _to_backend(item, backend) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_backend(item, backend) for item in value)
    try:
        backend_of(value, "value")
    except TypeError:
        return value
    return backend.asarray(value)


def _evaluate(net: Any, X: Any, y: Any, batch_size: int = 512) -> tuple[float, float]:
    """(mean softmax cross-entropy, accuracy) of `net` on (X, y), here, by batches."""
    backend = _network_backend(net)
    xp = backend.xp
    X, y = _host(X), _host(y)
    dtype = next(iter(net.parameters().values())).dtype
    loss_sum, correct = 0.0, 0
    for start in range(0, X.shape[0], batch_size):
        x = backend.asarray(X[start : start + batch_size], dtype=dtype)
        labels = backend.asarray(y[start : start + batch_size])
        logits = net.forwardpass(x)
        loss, _ = softmax_cross_entropy(logits, labels)
        loss_sum += float(loss) * x.shape[0]
        correct += int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == labels, xp.int32)))
    return loss_sum / X.shape[0], correct / X.shape[0]

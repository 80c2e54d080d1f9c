"""conv2d on Dask (conv2d.distributed): dask arrays through conv2d/conv2d_backward, client(), predict()
and DataParallel, on a real LocalCluster of two single-threaded worker processes on 127.0.0.1.

One cluster serves the whole module (starting one costs seconds); every wait on it is bounded.
The arithmetic is compared with the single-process call and with PyTorch (tests/oracle.py).
NumPy chunks only: CuPy chunks take the same code path (each chunk goes to the ordinary call).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import require_or_skip

require_or_skip("dask.array")
require_or_skip("distributed")

import dask  # noqa: E402
import dask.array as da  # noqa: E402

import conv2d  # noqa: E402
from conv2d import distributed, nn, optim  # noqa: E402

from .oracle import TOLERANCE, assert_close, torch_conv  # noqa: E402

WAIT = 60  # seconds: the bound on every wait for the cluster

# One pytest-xdist worker runs this whole module, so that its module-scoped cluster starts once (pyproject.toml).
pytestmark = pytest.mark.xdist_group("dask")


@pytest.fixture(scope="module")
def cluster_client():
    """Two worker processes, one thread each, on 127.0.0.1 (distributed.local_client); closed when
    the module is done."""
    client = distributed.local_client(2)
    try:
        client.wait_for_workers(2, timeout=WAIT)
        assert all(w["nthreads"] == 1 for w in client.scheduler_info()["workers"].values())
        yield client
    finally:
        client.close(timeout=WAIT)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- conv2d / conv2d_backward


CASES = [
    dict(shape=(10, 4, 9, 9), weight=(6, 4, 3, 3), kwargs=dict(padding=1), chunks=(3, 4, 9, 9)),
    dict(shape=(7, 4, 8, 10), weight=(6, 2, 3, 2), kwargs=dict(stride=(2, 1), groups=2, dilation=(1, 2)),
         chunks=(2, 2, 5, 4)),  # chunked along C, H and W too: merged into whole samples
    dict(shape=(5, 3, 6, 6), weight=(3, 1, 3, 3), kwargs=dict(padding="same", groups=3), chunks=(5, 3, 6, 6)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["shape"])))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_and_backward_match_single_process_and_torch(case, dtype):
    rng = _rng(sum(case["shape"]))
    x = rng.standard_normal(case["shape"]).astype(dtype)
    w = rng.standard_normal(case["weight"]).astype(dtype)
    b = rng.standard_normal(case["weight"][0]).astype(dtype)
    kwargs = case["kwargs"]
    xd = da.from_array(x, chunks=case["chunks"])

    y = conv2d.conv2d(xd, w, b, **kwargs)
    assert isinstance(y, da.Array)
    assert y.chunks[0] == xd.chunks[0] and all(len(c) == 1 for c in y.chunks[1:])
    single = conv2d.conv2d(x, w, b, **kwargs)
    y_value = y.compute(scheduler="sync")
    assert y_value.dtype == np.dtype(dtype)
    grad_out = rng.standard_normal(single.shape).astype(dtype)
    expected = torch_conv(x, w, b, grad_out, **kwargs)
    backend = conv2d.get_backend("numpy")
    assert_close(backend, y_value, expected[0], dtype, "forward vs torch")
    np.testing.assert_allclose(y_value, single, **TOLERANCE[dtype])

    # grad_out chunked differently from x on purpose: it is rechunked to x's batch chunks.
    gd = da.from_array(grad_out, chunks=(4, 1, -1, -1))
    grads = conv2d.conv2d_backward(gd, xd, w, **kwargs)
    assert all(isinstance(g, da.Array) for g in grads)
    assert grads[0].chunks[0] == xd.chunks[0] and all(len(c) == 1 for c in grads[0].chunks[1:])
    values = dask.compute(*grads, scheduler="sync")
    for value, want, what in zip(values, expected[1:], ("grad_x", "grad_weight", "grad_bias"), strict=True):
        assert value.dtype == np.dtype(dtype)
        assert_close(backend, value, want, dtype, f"{what} vs torch")


def test_dask_weight_and_bias_are_accepted():
    """weight and bias may be dask arrays too (merged into one block each)."""
    rng = _rng(1)
    x, w, b = rng.standard_normal((6, 2, 5, 5)), rng.standard_normal((3, 2, 2, 2)), rng.standard_normal(3)
    y = conv2d.conv2d(da.from_array(x, chunks=2), da.from_array(w, chunks=1), da.from_array(b, chunks=1))
    np.testing.assert_allclose(y.compute(scheduler="sync"), conv2d.conv2d(x, w, b), rtol=1e-12, atol=1e-12)
    gx, gw, gb = conv2d.conv2d_backward(np.ones((6, 3, 4, 4)), da.from_array(x, chunks=4), da.from_array(w, chunks=1))
    expected = conv2d.conv2d_backward(np.ones((6, 3, 4, 4)), x, w)
    for got, want in zip(dask.compute(gx, gw, gb, scheduler="sync"), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_weight_gradient_is_a_tree_sum_over_batch_chunks():
    """Many batch chunks: the weight gradient's graph sums partial gradients, it does not collect x."""
    rng = _rng(2)
    x = rng.standard_normal((64, 2, 6, 6))
    w = rng.standard_normal((3, 2, 3, 3))
    xd = da.from_array(x, chunks=(4, 2, 6, 6))  # 16 chunks
    grad_out = da.from_array(rng.standard_normal((64, 3, 4, 4)), chunks=(4, 3, 4, 4))
    _, gw, gb = conv2d.conv2d_backward(grad_out, xd, w)
    assert gw.numblocks == (1, 1, 1, 1) and gb.numblocks == (1,)
    names = {key[0] if isinstance(key, tuple) else key for key in dict(gw.__dask_graph__())}
    assert any("sum" in str(name) for name in names), names  # dask's tree reduction
    _, want_w, want_b = conv2d.conv2d_backward(grad_out.compute(), x, w)
    got_w, got_b = dask.compute(gw, gb, scheduler="sync")
    np.testing.assert_allclose(got_w, want_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, w: conv2d.conv2d(x, w[:, :1]), ValueError, "expects 1 input channels"),
        (lambda x, w: conv2d.conv2d(x, w.astype(np.float32)), TypeError, "does not promote silently"),
        (lambda x, w: conv2d.conv2d(x, w, padding=-1), ValueError, "padding must be non-negative"),
        (lambda x, w: conv2d.conv2d(x, w, algorithm="fast"), ValueError, "algorithm must be"),
        (lambda x, w: conv2d.conv2d_backward(da.ones((6, 3, 3, 3), chunks=2), x, w), ValueError,
         "grad_out must have the forward output's shape"),
    ],
)
def test_bad_arguments_fail_at_the_call_not_at_compute(call, error, message):
    x = da.from_array(_rng(3).standard_normal((6, 2, 5, 5)), chunks=3)
    w = _rng(4).standard_normal((3, 2, 2, 2))
    with pytest.raises(error, match=message):
        call(x, w)


def test_importing_conv2d_does_not_import_dask():
    """Nor does the command line until `scale` or `demo --dask` runs (dask is optional)."""
    code = (
        "import sys, conv2d, conv2d.__main__\n"
        "assert conv2d.__main__.main(['info']) == 0\n"
        "assert 'dask' not in sys.modules, 'dask imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT, capture_output=True)


def test_on_the_cluster(cluster_client):
    """The same forward and backward, computed by the worker processes."""
    rng = _rng(5)
    x = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    xd = da.from_array(x, chunks=(3, 3, 8, 8))
    y = conv2d.conv2d(xd, w, b, padding=1)
    grad_out = rng.standard_normal((12, 4, 8, 8)).astype(np.float32)
    grads = conv2d.conv2d_backward(da.from_array(grad_out, chunks=(3, 4, 8, 8)), xd, w, padding=1)
    values = [future.result(timeout=WAIT) for future in cluster_client.compute([y, *grads])]
    expected = torch_conv(x, w, b, grad_out, padding=1)
    backend = conv2d.get_backend("numpy")
    for value, want, what in zip(values, expected, ("y", "grad_x", "grad_weight", "grad_bias"), strict=True):
        assert_close(backend, value, want, "float32", what)


# --------------------------------------------------------------------------- client()


def test_client_bad_address_fails_within_seconds():
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"no Dask scheduler answered at 'tcp://127.0.0.1:9' within 2 s"):
        distributed.client("tcp://127.0.0.1:9", timeout=2)
    assert time.perf_counter() - start < 10


def test_client_malformed_address():
    with pytest.raises(ValueError, match="not a Dask scheduler address"):
        distributed.client("nonsense://nowhere", timeout=2)


def test_client_reads_the_scheduler_address_from_the_environment(cluster_client, monkeypatch):
    """DASK_SCHEDULER_ADDRESS, through Dask's own configuration, when no address is given."""
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster_client.scheduler.address)
    dask.config.refresh()
    try:
        with distributed.client() as other:
            assert other is not cluster_client
            assert other.scheduler.address == cluster_client.scheduler.address
            assert other.submit(sum, [1, 2, 3]).result(timeout=WAIT) == 6
    finally:
        monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
        dask.config.refresh()
    assert dask.config.get("scheduler-address", None) is None


def test_local_workers_have_one_blas_thread_and_glibcs_own_malloc_settings(cluster_client):
    """Dask's nanny gives each worker one BLAS thread; local_client keeps MALLOC_TRIM_THRESHOLD_
    unset (setting it made a training step 2x slower here, see distributed._TRIM_SETTING)."""
    names = ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    environments = cluster_client.run(lambda: {name: os.environ.get(name) for name in names})
    assert len(environments) == 2
    expected = {"OMP_NUM_THREADS": "1", "MALLOC_TRIM_THRESHOLD_": None}
    assert all(env == expected for env in environments.values()), environments


def test_client_returns_the_current_default_client(cluster_client):
    with dask.config.set({"scheduler-address": None}):
        cluster_client.as_current()
        assert distributed.client() is cluster_client


@pytest.mark.parametrize(
    "spec, portable",
    [("numpy", "numpy"), ("cupy:1", "cupy"), ("cupy:0", "cupy"), ("torch:cuda:1", "torch:cuda"),
     ("torch:cpu", "torch:cpu"), ("jax:gpu:0", "jax:gpu"), ("jax:cpu:0", "jax:cpu")],
)
def test_portable_spec_drops_the_device_number(spec, portable):
    assert distributed.portable_spec(spec) == portable


def test_a_network_travels_with_its_backend_spec():
    """A pickled layer comes back on the backend its spec names (here torch: the CPU)."""
    require_or_skip("torch")
    layer = conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 3, dtype="float32", seed=0, backend="torch")
    import pickle

    copy = pickle.loads(distributed.dumps(layer))
    assert copy.backend is conv2d.get_backend("torch")
    x = _rng(6).standard_normal((2, 2, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(
        copy.backend.to_numpy(copy.forwardpass(x)), layer.backend.to_numpy(layer.forwardpass(x))
    )


# --------------------------------------------------------------------------- predict()


def _small_network(seed: int = 0, dtype: str = "float32") -> nn.Sequential:
    return nn.Sequential([
        conv2d.ConvolutionLayer((1, 8, 8), (3, 3), 4, padding=1, activation="relu", dtype=dtype, seed=seed),
        nn.MaxPoolLayer((4, 8, 8), 2),
        nn.FlattenLayer(),
        nn.DenseLayer(64, 10, dtype=dtype, seed=seed + 1),
    ])


def _chunkwise(net, x: np.ndarray, rows: int) -> np.ndarray:
    """The single-process result, chunk by chunk (the same matrix sizes, hence the same rounding)."""
    return np.concatenate([net.forwardpass(x[start : start + rows]) for start in range(0, len(x), rows)])


def test_predict_matches_single_process_from_an_npy_stack_on_disk(cluster_client, tmp_path):
    net = _small_network()
    x = _rng(7).random((300, 1, 8, 8), dtype=np.float32)
    da.to_npy_stack(tmp_path / "images", da.from_array(x, chunks=(50, 1, 8, 8)), axis=0)
    on_disk = da.from_npy_stack(tmp_path / "images", mmap_mode="r")  # tasks read the files, by name
    y = distributed.predict(net, on_disk)
    assert y.shape == (300, 10) and y.dtype == np.float32 and y.chunks == ((50,) * 6, (10,))
    # The network is one key of the graph, whatever the number of chunks.
    network_keys = [key for key in dict(y.__dask_graph__()) if "conv2d-network" in str(key)]
    assert len(network_keys) == 1, network_keys
    got = cluster_client.compute(y).result(timeout=WAIT)
    np.testing.assert_array_equal(got, _chunkwise(net, x, 50))


def test_predict_rejects_what_it_cannot_use():
    with pytest.raises(TypeError, match="x must be a dask array"):
        distributed.predict(_small_network(), np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(TypeError, match="forwardpass"):
        distributed.predict(object(), da.zeros((2, 1, 8, 8), chunks=1))


class _Slow:
    """An identity layer that takes its time, so that a worker can be killed mid-computation."""

    def forwardpass(self, X):
        time.sleep(0.02)
        return X


def test_predict_survives_a_killed_worker(cluster_client):
    net = nn.Sequential([*_small_network(3).layers, _Slow()])
    x = _rng(8).random((400, 1, 8, 8), dtype=np.float32)
    y = distributed.predict(net, da.from_array(x, chunks=(5, 1, 8, 8)))  # 80 chunks, >= 1.6 s of sleep
    before = set(cluster_client.scheduler_info()["workers"])
    future = cluster_client.compute(y)
    deadline = time.monotonic() + WAIT
    while cluster_client.run_on_scheduler(_chunks_in_memory, y.name) < 6:
        assert time.monotonic() < deadline, "no chunk finished in time"
        time.sleep(0.05)
    assert not future.done(), "the computation ended before a worker could be killed: make it longer"
    victim, pid = next(iter(cluster_client.run(os.getpid).items()))
    os.kill(pid, signal.SIGKILL)  # results held there are lost; Dask recomputes them elsewhere
    got = future.result(timeout=WAIT)
    np.testing.assert_array_equal(got, _chunkwise(net, x, 5))
    cluster_client.wait_for_workers(2, timeout=WAIT)  # the nanny starts a fresh worker
    assert victim not in set(cluster_client.scheduler_info()["workers"]) and victim in before


def _chunks_in_memory(name: str, dask_scheduler=None) -> int:
    return sum(1 for key, task in dask_scheduler.tasks.items() if name in str(key) and task.state == "memory")


# --------------------------------------------------------------------------- DataParallel


def _reference_fit(net, X, y, epochs, batch_size, optimizer, seed):
    """Single-process training, written here: the same batches, one backward() and one step each."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for start in range(0, len(X), batch_size):
            rows = order[start : start + batch_size]
            logits = net.forwardpass(X[rows])
            _, delta = nn.softmax_cross_entropy(logits, y[rows])
            _, grads = net.backward(X[rows], delta)
            optimizer.step(net, grads)
    return net


def _training_data(seed: int, n: int = 150):
    rng = _rng(seed)
    return rng.random((n, 1, 8, 8)), rng.integers(0, 10, n).astype(np.int32)


def _assert_same_parameters(net, reference, rtol: float):
    want = reference.state_dict()
    got = net.state_dict()
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=rtol, err_msg=key)


@pytest.mark.parametrize(
    "make_optimizer", [lambda: optim.SGD(0.1, momentum=0.9, weight_decay=1e-3), lambda: optim.Adam(1e-2)],
    ids=["sgd-momentum", "adam"],
)
def test_fit_is_single_process_training_to_rounding(cluster_client, make_optimizer):
    """Same seed and global batch: the same parameters as the in-process loop (float64, to 1e-10),
    also after a second fit, which continues with the optimizer's state from the first."""
    X, y = _training_data(9)
    net = _small_network(4, "float64")
    net_before = net.state_dict()
    trainer = distributed.DataParallel(net, cluster_client)
    optimizer, reference_optimizer = make_optimizer(), make_optimizer()
    history = trainer.fit(X, y, epochs=2, batch_size=40, optimizer=optimizer, seed=5)  # last batch smaller: 30
    reference = _reference_fit(_small_network(4, "float64"), X, y, 2, 40, reference_optimizer, 5)
    _assert_same_parameters(trainer.network(), reference, 1e-10)
    trainer.fit(X, y, epochs=1, batch_size=40, optimizer=optimizer, seed=6)
    _reference_fit(reference, X, y, 1, 40, reference_optimizer, 6)
    _assert_same_parameters(trainer.network(), reference, 1e-10)
    assert len(history.loss) == len(history.accuracy) == len(history.step_ms) == len(history.overhead_ms) == 2
    assert all(np.isfinite(history.loss)) and all(0 <= a <= 1 for a in history.accuracy)
    for key, value in net.state_dict().items():  # the network given is left as it was
        np.testing.assert_array_equal(value, net_before[key])



def test_fit_with_batches_smaller_than_the_cluster(cluster_client):
    """Batches of one sample: one worker idles each step; still the single-process result."""
    X, y = _training_data(10, n=5)
    trainer = distributed.DataParallel(_small_network(7, "float64"), cluster_client)
    history = trainer.fit(X, y, epochs=1, batch_size=1, optimizer=optim.SGD(0.05), seed=1,
                          validation_data=(X, y))
    reference = _reference_fit(_small_network(7, "float64"), X, y, 1, 1, optim.SGD(0.05), 1)
    _assert_same_parameters(trainer.network(), reference, 1e-10)
    logits = reference.forwardpass(X)
    loss, _ = nn.softmax_cross_entropy(logits, y)
    assert history.validation_loss == pytest.approx([float(loss)], rel=1e-10)
    assert history.validation_accuracy == [float(np.mean(np.argmax(logits, axis=1) == y))]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(epochs=0), ValueError, "epochs must be a positive int"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(optimizer=0.1), TypeError, "optimizer must be a conv2d.optim optimizer"),
        (dict(y=np.zeros(3, np.int32)), ValueError, "y must have shape"),
        (dict(X=np.zeros((0, 1, 8, 8)), y=np.zeros(0, np.int64)), ValueError, r"X has no rows \(shape \(0, 1, 8, 8\)\)"),
        (dict(validation_data=(np.zeros((0, 1, 8, 8)), np.zeros(0, np.int64))), ValueError,
         "validation_data's X must have at least one row"),
        (dict(validation_data=(np.zeros((2, 1, 8, 8)), np.zeros(3, np.int64))), ValueError,
         r"validation_data's y must have shape \(2,\)"),
        (dict(validation_data=np.zeros((2, 1, 8, 8))), TypeError, "validation_data must be a pair"),
    ],
)
def test_fit_rejects_bad_arguments(cluster_client, kwargs, error, message):
    X, y = _training_data(11, n=6)
    arguments = dict(X=X, y=y, epochs=1, batch_size=2, optimizer=optim.SGD(0.1), seed=0) | kwargs
    with pytest.raises(error, match=message):
        distributed.DataParallel(_small_network(), cluster_client).fit(**arguments)


def test_data_parallel_needs_a_trainable_network(cluster_client):
    with pytest.raises(TypeError, match="parameters"):
        distributed.DataParallel(object(), cluster_client)
    with pytest.raises(ValueError, match="no parameters"):
        distributed.DataParallel(nn.Sequential([nn.FlattenLayer()]), cluster_client)


# --------------------------------------------------------------------------- commands


def test_demo_dask_trains_as_the_demo_does(cluster_client, capsys):
    """`demo --dask ADDRESS`: the same batches and SGD steps as the plain demo, so the same test
    accuracy and (to float32 rounding) the same training loss; the cluster is left running."""
    require_or_skip("sklearn")
    from conv2d.__main__ import main
    from conv2d.tools import demo

    address = cluster_client.scheduler.address
    assert main(["demo", "--dask", address, "--epochs", "2", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert f"dask: 2 workers at {address}" in printed, printed
    local = demo.train(conv2d.get_backend("numpy"), epochs=2, seed=0)
    assert f"test accuracy: {local.test_accuracy[-1]:.2%}" in printed, printed
    assert cluster_client.submit(sum, [1, 2]).result(timeout=WAIT) == 3  # still up


def test_demo_dask_bad_address(capsys):
    from conv2d.__main__ import main

    assert main(["demo", "--dask", "tcp://127.0.0.1:9", "--epochs", "1", "--no-plots"]) == 2
    assert "no Dask scheduler answered at 'tcp://127.0.0.1:9'" in capsys.readouterr().err


def test_scale_command_prints_every_figure_with_the_load(capsys):
    from conv2d.__main__ import main

    args = ["scale", "--workers", "1", "--images", "300", "--chunk", "100", "--memory-limit", "512",
            "--batch-sizes", "16", "--steps", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "images/s" in line or "ms/step" in line]
    assert len(lines) == 4, printed  # inference and training: in one process, then 1 worker
    assert all("load " in line for line in lines), printed
    assert "results identical" in printed, printed  # same chunks, one BLAS thread: the same bits
    assert "overhead" in printed, printed
    peaks = re.findall(r"peak memory per worker (\d+) MiB", printed)
    assert len(peaks) == 1 and int(peaks[0]) < 512, printed  # under the --memory-limit given


def test_the_backend_travels_with_the_network(cluster_client):
    """A torch network trains on torch on the workers (they resolve its spec, 'torch:cpu'), and
    equals in-process torch training; network() gives torch arrays back."""
    require_or_skip("torch")
    torch_backend = conv2d.get_backend("torch")

    def network():
        return nn.Sequential([
            conv2d.ConvolutionLayer((1, 8, 8), (3, 3), 4, padding=1, activation="relu", dtype="float64", seed=2,
                                    backend=torch_backend),
            nn.MaxPoolLayer((4, 8, 8), 2, backend=torch_backend),
            nn.FlattenLayer(),
            nn.DenseLayer(64, 10, dtype="float64", seed=3, backend=torch_backend),
        ])

    X, y = _training_data(12, n=40)
    trainer = distributed.DataParallel(network(), cluster_client)
    trainer.fit(X, y, epochs=1, batch_size=20, optimizer=optim.SGD(0.1), seed=2)
    trained = trainer.network()
    assert all(torch_backend.owns(value) for value in trained.parameters().values())
    reference = _reference_fit(network(), torch_backend.asarray(X), torch_backend.asarray(y), 1, 20, optim.SGD(0.1), 2)
    _assert_same_parameters(trained, reference, 1e-10)

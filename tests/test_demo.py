"""``python -m conv2d demo``: its training loop learns on every CPU backend, backends agree, the CLI works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import conv2d
from conv2d.__main__ import main
from conv2d.tools import demo

from .conftest import require_or_skip

require_or_skip("sklearn")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits() -> demo.Digits:
    return demo.load_digits(seed=0)


def _subset(data: demo.Digits, train: int, test: int) -> demo.Digits:
    return demo.Digits(data.train_x[:train], data.train_y[:train], data.test_x[:test], data.test_y[:test])


def test_digits_split(digits):
    """Stratified 80/20 split of the 1,797 digits, images in [0, 1], int32 labels, every class in both parts."""
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_x.dtype == np.float32 and digits.train_y.dtype == np.int32
    assert 0.0 == digits.train_x.min() and digits.train_x.max() == 1.0
    per_class = np.bincount(digits.train_y) + np.bincount(digits.test_y)
    assert (np.abs(np.bincount(digits.test_y) - 0.2 * per_class) <= 1).all(), "not stratified"
    again = demo.load_digits(seed=0)
    np.testing.assert_array_equal(again.test_y, digits.test_y)


def test_a_few_batches_lower_the_loss(cpu_backend, digits):
    """Eight SGD steps of the demo's loop lower the held-out loss, on every CPU backend."""
    # 32 test images, one batch: the same shapes as training, so JAX compiles each operation once.
    run = demo.train(cpu_backend, epochs=1, batch_size=32, lr=0.2, seed=0, data=_subset(digits, 256, 32), max_batches=8)
    assert run.network.layers[0].backend is cpu_backend
    assert len(run.train_loss) == 1 and len(run.test_loss) == 2
    before, after = run.test_loss
    assert np.isfinite(run.train_loss).all()
    assert after < before - 0.01, f"test loss went from {before:.4f} to {after:.4f} on {cpu_backend.spec}"


def test_numpy_and_torch_reach_the_same_accuracy(digits):
    """With the same seed, two epochs on NumPy and on torch give the same test accuracy to within 1%."""
    require_or_skip("torch")
    runs = {name: demo.train(conv2d.get_backend(name), epochs=2, seed=0, data=digits) for name in ("numpy", "torch")}
    accuracy = {name: run.test_accuracy[-1] for name, run in runs.items()}
    assert accuracy["numpy"] > 0.5, f"two epochs should learn something: {accuracy}"
    assert abs(accuracy["numpy"] - accuracy["torch"]) <= 0.01, accuracy
    np.testing.assert_allclose(runs["numpy"].train_loss, runs["torch"].train_loss, rtol=1e-3)


def test_default_settings_reach_95_percent(digits):
    """The README's promise: the default run reaches at least 95% test accuracy (NumPy)."""
    run = demo.train(conv2d.get_backend("numpy"), data=digits)
    assert len(run.epoch_seconds) == demo.DEFAULTS["epochs"]
    assert run.test_accuracy[-1] >= 0.95, run.test_accuracy


def test_cli_writes_the_plots(tmp_path, capsys):
    """`python -m conv2d demo` prints accuracy, backend and time per epoch, and writes the two PNGs."""
    out = tmp_path / "nested" / "out"
    assert main(["demo", "--epochs", "1", "--batch-size", "64", "--lr", "0.3", "--seed", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("test accuracy:", "backend: numpy, device: cpu", "time per epoch:", "(from default)"):
        assert text in printed, printed
    for name in ("loss.png", "filters.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name


def test_cli_backend_option_overrides_the_environment(tmp_path, capsys, monkeypatch):
    """--backend wins over CONV2D_BACKEND; --no-plots writes nothing."""
    monkeypatch.setenv("CONV2D_BACKEND", "numpy")
    require_or_skip("array_api_strict")
    args = ["demo", "--epochs", "1", "--backend", "array_api_strict", "--no-plots", "--out", str(tmp_path / "x")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "backend: array_api_strict" in printed and "(from --backend)" in printed, printed
    assert not (tmp_path / "x").exists()


def test_cli_environment_variable_picks_the_backend(capsys, monkeypatch):
    monkeypatch.setenv("CONV2D_BACKEND", "array_api_strict")
    require_or_skip("array_api_strict")
    assert main(["demo", "--epochs", "1", "--no-plots"]) == 0
    assert "(from CONV2D_BACKEND)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "nope"], "unknown conv2d backend 'nope'"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--threads", "-1"], "--threads must be 0 (the libraries' defaults) or a number of threads, got -1"),
    ],
)
def test_cli_bad_arguments(args, message, capsys):
    assert main(["demo", *args, "--no-plots"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a-file", "/proc/forbidden"])
def test_cli_unwritable_out_fails_before_training(where, tmp_path, capsys, monkeypatch):
    """An --out that cannot take the plots is one line and exit status 2 at once, not a traceback after training."""
    if where == "a-file":
        where = tmp_path / "plots"
        where.write_text("not a folder")
    elif not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(demo, "load_digits", lambda *a, **k: pytest.fail("the demo loaded the data before checking --out"))
    assert main(["demo", "--out", str(where)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith(f"error: --out {where} ") and "--no-plots" in captured.err


@pytest.mark.parametrize("threads", [None, "2", "0"])
def test_cli_limits_the_thread_pools_while_training_only(threads, capsys, monkeypatch):
    """The demo trains with one BLAS/OpenMP thread by default (--threads N, 0 for the libraries' own), and
    gives the process its thread pools back afterwards."""
    from threadpoolctl import threadpool_info

    def pools():
        return {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}

    before, seen = pools(), []
    real_train = demo.train

    def spy(*args, **kwargs):
        seen.append(pools())
        return real_train(*args, **{**kwargs, "max_batches": 2})

    monkeypatch.setattr(demo, "train", spy)
    assert main(["demo", "--epochs", "1", "--no-plots", *(["--threads", threads] if threads else [])]) == 0
    expected = {path: int(threads or 1) for path in before} if threads != "0" else before
    assert before and seen == [expected]
    assert pools() == before
    assert f"{threads or 1 if threads != '0' else 'default'} BLAS thread" in capsys.readouterr().out


def test_cli_bad_backend_is_named_as_the_option(capsys):
    """The error names --backend, where the value came from, not the get_backend() call behind it."""
    assert main(["demo", "--backend", "tensorflow", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "unknown conv2d backend 'tensorflow' (from --backend)" in err and "get_backend" not in err, err


def test_demo_module_imports_no_demo_dependency():
    """scikit-learn, matplotlib and tqdm are imported by the demo's run, not by importing conv2d or its CLI."""
    code = (
        "import sys, conv2d, conv2d.nn, conv2d.tools.demo, conv2d.__main__\n"
        "heavy = {'sklearn', 'matplotlib', 'tqdm'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_jitted_jax_training_follows_numpy(digits, without_compiled_kernels):
    """--backend jax trains with a jitted step; four steps of it give NumPy's losses and weights (float32).

    NumPy without its compiled kernels: their Winograd tiles round float32 differently from XLA's direct
    convolution, and Adam's normalised steps turn such differences on near-zero gradients into whole steps
    (the kernels are compared with PyTorch layer by layer elsewhere)."""
    jax_backend = require_or_skip("jax") and conv2d.get_backend("jax")
    data = _subset(digits, 128, 32)
    runs = {b.name: demo.train(b, epochs=1, seed=0, data=data, max_batches=4, optimizer="adam")
            for b in (conv2d.get_backend("numpy"), jax_backend)}
    np.testing.assert_allclose(runs["jax"].train_loss, runs["numpy"].train_loss, rtol=1e-4)
    jax_state, numpy_state = runs["jax"].network.state_dict(), runs["numpy"].network.state_dict()
    for key, value in numpy_state.items():
        np.testing.assert_allclose(jax_state[key], value, rtol=1e-3, atol=1e-5, err_msg=key)


def test_adam_lowers_the_loss(digits):
    run = demo.train(conv2d.get_backend("numpy"), epochs=1, seed=0, data=_subset(digits, 256, 32), max_batches=8,
                     optimizer="adam")
    before, after = run.test_loss
    assert after < before - 0.01, (before, after)


def test_cli_save_writes_a_network_that_loads(tmp_path, capsys):
    """--save PATH writes a network that conv2d.nn.load rebuilds with the accuracy the demo printed."""
    path = tmp_path / "model"
    assert main(["demo", "--epochs", "1", "--batch-size", "64", "--optimizer", "adam", "--no-plots",
                 "--save", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "optimizer: adam" in printed and f"wrote {path}" in printed, printed
    correct = int(printed.split("test accuracy: ")[1].split("(")[1].split("/")[0])
    network = conv2d.nn.load(path)
    data = demo.load_digits(0)
    _, accuracy = demo.evaluate(network, data.test_x, data.test_y)
    assert round(accuracy * len(data.test_y)) == correct


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "/proc/forbidden"])
def test_cli_unwritable_save_fails_before_training(where, tmp_path, capsys, monkeypatch):
    """A --save folder that cannot be written (`--save /etc/passwd/m`) is one line and exit status 2 before
    training, not a NotADirectoryError traceback after it, with the trained network lost."""
    if where == "/proc/forbidden" and not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    (tmp_path / "file").write_text("")
    path = {"a-file": tmp_path / "file", "under-a-file": tmp_path / "file" / "m"}.get(where, Path(where))
    monkeypatch.setattr(demo, "load_digits", lambda *a, **k: pytest.fail("the demo loaded the data before checking --save"))
    assert main(["demo", "--no-plots", "--save", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith(f"error: --save {path} ") and "leave --save out" in captured.err
    assert ("is a file, not a folder" if where == "a-file" else "cannot be written") in captured.err

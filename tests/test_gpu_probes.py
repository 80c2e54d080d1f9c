"""A GPU backend that cannot run says why and how to fix it, here on a machine without one.

The CuPy cases use a stand-in `cupy` module whose driver calls fail or find no device, which is
what an installed CuPy does on a machine without a usable GPU.
"""

from __future__ import annotations

import sys
import types

import pytest

import conv2d

from .conftest import require_or_skip


def _fake_cupy(monkeypatch, get_device_count):
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)


def test_cupy_without_driver(monkeypatch):
    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    _fake_cupy(monkeypatch, no_driver)
    with pytest.raises(conv2d.BackendUnavailableError) as info:
        conv2d.get_backend("cupy")
    message = str(info.value)
    assert "'cupy'" in message and "no usable CUDA driver" in message and "InsufficientDriver" in message
    assert "pip install 'conv2d[cuda12]'" in message
    assert "numpy" in message  # what is usable instead


def test_cupy_device_number_out_of_range(monkeypatch):
    _fake_cupy(monkeypatch, lambda: 1)
    with pytest.raises(conv2d.BackendUnavailableError, match=r"no CUDA device 3: CuPy sees 1"):
        conv2d.get_backend("cupy:3")
    with pytest.raises(conv2d.BackendUnavailableError, match=r"'gpu' is not a CUDA device number"):
        conv2d.get_backend("cupy:gpu")


def test_cupy_env_var_without_gpu(monkeypatch):
    """CONV2D_BACKEND=cupy on a machine without CUDA fails at first use, naming the variable."""
    _fake_cupy(monkeypatch, lambda: 0)
    monkeypatch.setenv("CONV2D_BACKEND", "cupy")
    conv2d.set_backend(None)
    with pytest.raises(conv2d.BackendUnavailableError, match=r"CONV2D_BACKEND.*CuPy sees 0"):
        conv2d.get_backend()


def test_auto_falls_back_to_numpy_without_gpu(monkeypatch):
    _fake_cupy(monkeypatch, lambda: 0)
    assert conv2d.get_backend("auto").name == "numpy"


def test_torch_cuda_without_cuda():
    torch = require_or_skip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the failure path cannot be shown")
    with pytest.raises(conv2d.BackendUnavailableError, match=r"'torch:cuda'.*sees no CUDA device.*CUDA build"):
        conv2d.get_backend("torch:cuda")

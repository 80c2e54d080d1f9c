"""PyTorch tensors, on the CPU or a CUDA device (``torch``, ``torch:cuda``, ``torch:cuda:1``)."""

from __future__ import annotations

from typing import Any

from array_api_compat import is_torch_array

from ._base import Backend, BackendUnavailableError

LIBRARY = "torch"
INSTALL_HINT = "pip install 'conv2d[torch]'"


def is_array(obj: Any) -> bool:
    return is_torch_array(obj)


def device_spec(array: Any) -> str | None:
    return str(array.device)


def build(device: str | None) -> Backend:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(f"PyTorch is not installed ({exc})") from exc
    import array_api_compat.torch as xp

    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as exc:
        raise BackendUnavailableError(
            f"{device!r} is not a torch device ({exc}); use e.g. 'torch:cpu', 'torch:cuda', 'torch:cuda:1'"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "this PyTorch build sees no CUDA device; 'torch:cuda' needs an NVIDIA GPU and a CUDA build of PyTorch"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"no CUDA device {dev.index}: PyTorch sees {torch.cuda.device_count()}"
            )
    elif dev.type != "cpu":
        raise BackendUnavailableError(f"device type {dev.type!r} is not supported; use cpu or cuda")
    try:
        torch.empty(1, device=dev)  # a build can list a device it cannot allocate on
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable", with its reason
        raise BackendUnavailableError(f"cannot allocate on {dev}: {exc}") from exc

    def native_asarray(obj, dtype):
        # torch.asarray shares a NumPy array's memory, and torch tensors are always writable:
        # a read-only array (a cached plan, a caller's frozen input) is copied instead.
        copy = True if getattr(getattr(obj, "flags", None), "writeable", True) is False else None
        return torch.asarray(obj, dtype=dtype, device=dev, copy=copy)

    def to_numpy(array):
        return array.detach().cpu().numpy()

    def scatter_add(target, indices, values):
        # index_add_ accumulates duplicates (atomics on CUDA, so float sums may vary in the last bits).
        return target.index_add_(0, indices, values)

    return Backend(
        name="torch",
        spec=f"torch:{dev}",
        device=dev,
        xp=xp,
        _native_asarray=native_asarray,
        _to_numpy=to_numpy,
        _scatter_add=scatter_add,
        _owns=is_array,
        deterministic_scatter=dev.type == "cpu",  # CUDA's index_add_ uses atomics
    )

"""Peak memory: the extra bytes of one forward+backward, per workspace limit, where they can be seen."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

from ..._functional import conv2d, conv2d_backward
from ...backends import Backend
from .calls import Case
from .timing import _sync

SMALL_LIMIT = 64 * 2**20
LIMITS = {"default": None, "64MB": SMALL_LIMIT}  # label -> max_workspace_bytes (None: the default)


class _PeakTracker:
    """Peak bytes allocated on the backend's device while it is active, above what was there before.

    Only where the allocations can be seen: NumPy reports its data allocations to tracemalloc (and
    array-api-strict wraps NumPy arrays), torch on CUDA keeps a peak counter, CuPy takes hooks.
    torch's and JAX's CPU allocators are invisible from Python.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.peak = 0
        if backend.name in ("numpy", "array_api_strict"):
            self.kind: str | None = "tracemalloc"
        elif backend.name == "torch" and backend.device.type == "cuda":
            self.kind = "torch_cuda"
        elif backend.name == "cupy":
            self.kind = "cupy"
        else:
            self.kind = None

    def __enter__(self) -> _PeakTracker:
        if self.kind == "tracemalloc":
            self._was_tracing = tracemalloc.is_tracing()
            if not self._was_tracing:
                tracemalloc.start()
            self._start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        elif self.kind == "torch_cuda":
            import torch

            torch.cuda.synchronize(self.backend.device)
            self._start = torch.cuda.memory_allocated(self.backend.device)
            torch.cuda.reset_peak_memory_stats(self.backend.device)
        elif self.kind == "cupy":
            self._hook = _cupy_peak_hook()
            self._hook.__enter__()
        else:
            raise NotImplementedError(f"peak memory is not measured on {self.backend.spec}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "tracemalloc":
            self.peak = tracemalloc.get_traced_memory()[1] - self._start
            if not self._was_tracing:
                tracemalloc.stop()
        elif self.kind == "torch_cuda":
            import torch

            torch.cuda.synchronize(self.backend.device)
            self.peak = torch.cuda.max_memory_allocated(self.backend.device) - self._start
        else:
            import cupy

            cupy.cuda.get_current_stream().synchronize()
            self._hook.__exit__(*exc)
            self.peak = self._hook.peak


def _cupy_peak_hook() -> Any:
    """A CuPy memory hook that follows the bytes taken from the memory pool and keeps their peak."""
    import cupy

    class PeakHook(cupy.cuda.MemoryHook):
        name = "conv2d_bench_peak"

        def __init__(self) -> None:
            self.current = self.peak = 0

        def malloc_postprocess(self, **kwargs: Any) -> None:
            self.current += kwargs["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kwargs: Any) -> None:
            self.current -= kwargs["mem_size"]

    return PeakHook()


def peak_memory(case: Case) -> dict[str, int | None] | str:
    """Peak extra bytes of one forward+backward (output and gradients included), per workspace limit.

    Returns the reason instead where the backend's allocations cannot be seen.
    """
    if _PeakTracker(case.backend).kind is None:
        return f"not measured on {case.backend.spec} (its allocations are invisible from Python)"
    a = case.arrays
    peaks: dict[str, int | None] = {}
    for label, limit in LIMITS.items():
        kw = dict(case.kwargs)
        if limit is not None:
            kw["max_workspace_bytes"] = limit
        gc.collect()
        with _PeakTracker(case.backend) as tracker:
            result = conv2d(a["x"], a["weight"], a["bias"], **kw)
            result = result, conv2d_backward(a["grad_out"], a["x"], a["weight"], **kw)
            _sync(case.backend, result)
            del result
        peaks[label] = tracker.peak
    return peaks

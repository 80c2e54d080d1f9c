"""How calls are timed: wall-clock and CUDA-event timers, :func:`time_calls`, device sync, warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ...backends import Backend

# A timer runs one call and returns the seconds until its work is done.
Timer = Callable[[Callable[[], Any]], float]


def wall_timer(sync: Callable[[Any], Any] | None = None) -> Timer:
    """A timer reading ``time.perf_counter`` around the call and `sync` of its result.

    `sync` waits for the device (see :func:`_sync`); without it the call must return only when
    its work is done, as NumPy's and torch's CPU functions do.
    """

    def timed(call: Callable[[], Any]) -> float:
        start = time.perf_counter()
        result = call()
        if sync is not None:
            sync(result)
        return time.perf_counter() - start

    return timed


class EventTimer:
    """A timer reading the GPU's clock: CUDA events recorded on the stream before and after the call.

    The time is the device's, from the start event to the end event (kernels queued by the call,
    and any gap while Python queues them), without the host's synchronisation latency that a
    ``perf_counter`` around a synchronize adds to every sample. The library is given by two
    functions, so that the same code serves CuPy, torch and a stand-in in the tests:

    Parameters
    ----------
    new_event : callable
        ``new_event()`` makes an event that can be timed; it has ``record(stream)`` and
        ``synchronize()``.
    elapsed_ms : callable
        ``elapsed_ms(start, end)``: milliseconds between two recorded, completed events.
    stream : object, optional
        Passed to ``record``; None is the current stream of the current device.
    """

    def __init__(self, new_event: Callable[[], Any], elapsed_ms: Callable[[Any, Any], float],
                 stream: Any = None) -> None:
        self.new_event = new_event
        self.elapsed_ms = elapsed_ms
        self.stream = stream

    def __call__(self, call: Callable[[], Any]) -> float:
        start, end = self.new_event(), self.new_event()
        start.record(self.stream)
        call()
        end.record(self.stream)
        end.synchronize()  # the end event completes after every kernel queued before it
        return self.elapsed_ms(start, end) / 1e3


def _event_timer(library: str, device: Any) -> EventTimer:
    """CUDA-event timer of CuPy (`device` a ``cupy.cuda.Device``) or torch (a CUDA ``torch.device``)."""
    if library == "cupy":
        import cupy

        with device:  # the current stream of the backend's device, whatever device is current later
            stream = cupy.cuda.get_current_stream()
        return EventTimer(cupy.cuda.Event, cupy.cuda.get_elapsed_time, stream)
    import torch

    return EventTimer(lambda: torch.cuda.Event(enable_timing=True), lambda start, end: start.elapsed_time(end),
                      torch.cuda.current_stream(device))


def backend_timer(backend: Backend) -> Timer:
    """How to time calls on `backend`: CUDA events for CuPy and torch on CUDA, else the wall clock."""
    if backend.name == "cupy":
        return _event_timer("cupy", backend.device)
    if backend.name == "torch" and backend.device.type == "cuda":
        return _event_timer("torch", backend.device)
    return wall_timer(lambda result: _sync(backend, result))  # JAX (any device) returns before it is done


def _torch_timer(device: Any) -> Timer:
    """How to time the PyTorch reference on `device` (a ``torch.device``)."""
    return _event_timer("torch", device) if device.type == "cuda" else wall_timer()


def time_calls(calls: dict[str, Callable[[], Any]], repeat: int, warmup: int = 1,
               timer: Timer | Mapping[str, Timer] | None = None) -> dict[str, list[float]]:
    """Seconds taken by each call, `repeat` times each, each call in a block of its own.

    One call at a time: its `warmup` untimed calls, then its `repeat` timed ones, before the next
    call starts. Taking turns (a, b, a, b, ...) would let one library's thread pool (OpenBLAS's
    threads keep spinning after a call) slow the next call of another: on a 2-core machine that
    made PyTorch look 2x slower than it is. `timer` times one call (one for all, or one per call
    name); the default is the wall clock around a call that returns only when its work is done.
    Warm-up calls go through the timer too, so that they also wait for the device.
    """
    default = wall_timer()
    timers = {name: (timer.get(name, default) if isinstance(timer, Mapping) else timer or default)
              for name in calls}
    samples: dict[str, list[float]] = {}
    for name, call in calls.items():
        for _ in range(warmup):
            timers[name](call)
        samples[name] = [timers[name](call) for _ in range(repeat)]
    return samples


def _sync(backend: Backend, result: Any = None) -> Any:
    """Wait for the device to finish: GPU libraries return before the work is done."""
    if backend.name == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif backend.name == "torch" and backend.device.type == "cuda":
        import torch

        torch.cuda.synchronize(backend.device)
    elif backend.name == "jax":
        import jax

        jax.block_until_ready(result)
    return result


def _on_gpu(backend: Backend) -> bool:
    if backend.name == "cupy":
        return True
    if backend.name == "torch":
        return backend.device.type == "cuda"
    return backend.name == "jax" and getattr(backend.device, "platform", "cpu") in ("gpu", "cuda", "rocm")


# Untimed calls before the timed ones, per kind of device; every implementation (ours, the floor,
# PyTorch) gets the same number, the seed one. On the CPU the first calls of a shape run slower
# than a training loop's later ones: glibc's malloc hands out large blocks with mmap until frees of
# such blocks raise its threshold, so the first calls page-fault fresh memory (measured on numpy,
# float32, the preset's 5x5 layer, forward ms per call in one process: 86, 22, 24, 21, then 9 from
# the fifth call on, and 14, 16, then 9 from the third in the bench's own timing process; one
# warm-up put the median at 18 ms). On a GPU the first calls compile CuPy's
# kernels, and PyTorch's first calls of a shape try every cuDNN algorithm (cudnn.benchmark).
WARMUP = {"cpu": 4, "gpu": 3}

# Why that many, for the method note.
WARMUP_REASON = {"cpu": "the steady state of a training loop; the first calls page-fault fresh memory",
                 "gpu": "kernel compilation and cuDNN autotuning"}


def default_warmup(backend: Backend) -> int:
    """Untimed calls before the timed ones on `backend`: :data:`WARMUP` of its kind of device."""
    return WARMUP[device_kind(backend)]


def device_kind(backend: Backend) -> str:
    """"gpu" or "cpu": the key of :data:`WARMUP` and :data:`WARMUP_REASON` for `backend`."""
    return "gpu" if _on_gpu(backend) else "cpu"

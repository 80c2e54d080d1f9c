"""One thread pool at a time: the compiled kernels' workers, with the BLAS single-threaded meanwhile.

A call of the compiled kernels splits its work into tasks (ranges of samples, or of channels) and
runs them on this module's worker threads. Each task calls its Numba kernels (compiled with
``nogil=True``) and NumPy's matrix products, both of which release the GIL, so the tasks run on all
cores at once. Meanwhile the BLAS (OpenBLAS, MKL) is limited to one thread (through threadpoolctl,
restored when the call ends): its own threads would otherwise wake for every product, and spin after
it, against the workers. Numba's own parallel layer (OpenMP, TBB) is not used at all: its threads
spin after each kernel as OpenBLAS's do after each product, and neither can be told to stop from
inside a process whose libraries are already loaded. Here there is one pool, ours, and its idle
threads block on a queue (no spinning), so nothing is left for the user to set.

The worker count is the BLAS's thread count when the call starts: the cores NumPy's products would
have used, so ``threadpoolctl.threadpool_limits(1)`` or ``OMP_NUM_THREADS=1`` around a call keeps it on
one core, as it does NumPy's products.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_state: dict[str, Any] = {"executor": None, "size": 0, "blas": None, "modules": 0, "depth": 0, "saved": ()}


def _forget_after_fork() -> None:
    # A forked child has none of the parent's threads: its first call starts a pool of its own.
    global _lock
    _lock = threading.Lock()
    _state.update(executor=None, size=0, depth=0, saved=())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _blas() -> list[Any]:
    """threadpoolctl's controllers of the BLAS libraries loaded now.

    A scan takes about 1.5 ms, so its result is kept; a BLAS library loads with an extension module
    (NumPy's, SciPy's, PyTorch's), so the scan is made again only after a new import, which a
    training loop's steady state does not do.
    """
    if _state["blas"] is None or _state["modules"] != len(sys.modules):
        from threadpoolctl import ThreadpoolController

        _state["modules"] = len(sys.modules)
        _state["blas"] = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _state["blas"]


def worker_count() -> int:
    """How many tasks run at once: the BLAS's thread count now (the cores NumPy's products use)."""
    counts = [lib.num_threads for lib in _blas() if lib.num_threads]
    if counts:
        return max(1, min(counts))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _enter() -> int:
    """Limit the BLAS to one thread (the first of nested or concurrent calls); the worker count."""
    with _lock:
        if _state["depth"] == 0:
            workers = worker_count()
            # Each library with its count: what _exit restores, even if a scan in between finds more.
            _state["saved"] = tuple((lib, lib.num_threads) for lib in _blas())
            _state["workers"] = workers
            for lib, _ in _state["saved"]:
                lib.set_num_threads(1)
        _state["depth"] += 1
        return int(_state["workers"])


def _exit() -> None:
    with _lock:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            for lib, count in _state["saved"]:
                lib.set_num_threads(count)


def _executor(size: int) -> ThreadPoolExecutor:
    with _lock:
        if _state["executor"] is None or _state["size"] < size:
            if _state["executor"] is not None:
                _state["executor"].shutdown(wait=False)
            _state["executor"] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="conv2d-kernels")
            _state["size"] = size
        return _state["executor"]


def run(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """Run `tasks` on the workers and the calling thread, each taking the next task left; the results in order.

    The tasks must write disjoint memory (each output element written by one task) and return what
    they sum (a partial weight gradient) for the caller to add up in task order: the result then
    does not depend on which thread ran what, or when.
    """
    if not tasks:
        return []
    workers = _enter()
    try:
        if workers == 1 or len(tasks) == 1:
            return [task() for task in tasks]
        results: list[Any] = [None] * len(tasks)
        taken = iter(range(len(tasks)))
        take = threading.Lock()

        def drain() -> None:
            while True:
                with take:
                    index = next(taken, None)
                if index is None:
                    return
                results[index] = tasks[index]()

        pool = _executor(workers - 1)
        helpers = [pool.submit(drain) for _ in range(min(workers, len(tasks)) - 1)]
        try:
            drain()
        finally:
            # Every helper has finished before the BLAS gets its threads back (or an error leaves).
            errors = [helper.exception() for helper in helpers]
        for error in errors:
            if error is not None:
                raise error
        return results
    finally:
        _exit()


def in_order(parts: Sequence[Any]) -> Any:
    """The tasks' partial sums (arrays of one shape; at least one) added in task order, into the first:
    the same result on every run, whichever thread finished first."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """[0, count) in at most `parts` contiguous ranges as equal as can be (none empty)."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        bounds.append((start, stop))
        start = stop
    return bounds

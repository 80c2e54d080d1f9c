"""One thread pool at a time: the compiled CPU kernels' workers (conv2d/backends/_numba/_threads.py).

While the workers run, the BLAS runs on one thread (else its threads spin against the workers), and
gets its thread count back afterwards, also when a task fails; the workers are as many as the BLAS's
threads were, so that a user's ``threadpool_limits`` holds for the kernels too. Needs threadpoolctl
only (not Numba): the CI's run without Numba covers it as well.
"""

from __future__ import annotations

import itertools
import sys
import threading

import numpy as np
import pytest

from .conftest import require_or_skip

threadpoolctl = require_or_skip("threadpoolctl")
from conv2d.backends._numba import _threads  # noqa: E402  (after the import that may skip)

# Long enough for a loaded 2-core machine to start a thread; the tests never wait longer.
WAIT_S = 30


def _blas_threads() -> list[int]:
    return [lib.num_threads for lib in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers]


def test_blas_is_single_threaded_inside_and_restored_after():
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        seen = _threads.run([_blas_threads for _ in range(4)])
        assert all(counts and set(counts) == {1} for counts in seen), seen
        assert set(_blas_threads()) == {2}


def test_tasks_run_at_once_on_two_workers():
    """Two tasks that wait for each other finish: they ran on two threads at the same time."""
    barrier = threading.Barrier(2, timeout=WAIT_S)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        names = _threads.run([lambda: (barrier.wait(), threading.current_thread().name)[1] for _ in range(2)])
    assert len(set(names)) == 2


def test_a_users_limit_of_one_thread_holds():
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        idents = _threads.run([threading.get_ident for _ in range(6)])
        assert set(idents) == {threading.get_ident()}  # all on the calling thread
        assert set(_blas_threads()) == {1}


def test_results_come_in_task_order():
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        assert _threads.run([lambda k=k: k * k for k in range(17)]) == [k * k for k in range(17)]
    assert _threads.run([]) == []


def test_a_failing_task_raises_and_restores_the_blas():
    def fail():
        raise RuntimeError("task 3 failed")

    tasks = [lambda: None, lambda: None, lambda: None, fail, lambda: None]
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        with pytest.raises(RuntimeError, match="task 3 failed"):
            _threads.run(tasks)
        assert set(_blas_threads()) == {2}
        assert _threads.run([lambda: 5]) == [5]  # the pool still works


def test_concurrent_callers_share_the_pool_and_restore_once():
    """Two user threads calling at once: both get their results, and the BLAS its count back at the end."""
    out: dict[int, list[int]] = {}

    def call(key: int) -> None:
        out[key] = _threads.run([lambda k=k: key * 100 + k for k in range(8)])

    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        callers = [threading.Thread(target=call, args=(key,)) for key in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(WAIT_S)
        assert not any(caller.is_alive() for caller in callers)
        assert out == {key: [key * 100 + k for k in range(8)] for key in range(2)}
        assert set(_blas_threads()) == {2}


@pytest.mark.parametrize(("count", "parts"), [(0, 2), (1, 2), (5, 2), (7, 3), (2, 8)])
def test_split_covers_the_range_in_equal_contiguous_parts(count, parts):
    bounds = _threads.split(count, parts)
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = np.array([stop - start for start, stop in bounds])
    assert len(bounds) <= max(1, min(parts, count)) and sizes.max() - sizes.min() <= 1


def test_the_blas_libraries_are_found_again_after_an_import(monkeypatch):
    """A BLAS library loaded after the first call (with a new extension module: SciPy's, PyTorch's) is
    limited too: the scan, kept while nothing new is imported, is made again after an import."""
    import types

    first = _threads._blas()
    assert _threads._blas() is first  # nothing imported since: the kept scan
    monkeypatch.setitem(sys.modules, "conv2d_test_newly_imported", types.ModuleType("conv2d_test_newly_imported"))
    again = _threads._blas()
    assert again is not first and [lib.filepath for lib in again] == [lib.filepath for lib in first]

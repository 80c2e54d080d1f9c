"""glibc malloc's thresholds in the timing processes: its steady state, not its start-up.

glibc serves a block above ``M_MMAP_THRESHOLD`` (128 KiB at start) with a fresh ``mmap`` and gives it
back on ``free``; after freeing such a block it raises the threshold to that block's size (at most
32 MiB on 64-bit) and the trim threshold to twice that. So the first calls of a process page-fault
every large array afresh, and how long that lasts depends on what ran before in the process: the
same layer timed first or after a larger one measured 22 ms or 12.6 ms forward+backward, and
PyTorch's depthwise layer 3.6 ms or 14 ms (docs/benchmarks.md, "The allocator"). A long training
process ends at the top thresholds; ``--malloc steady`` (the default) starts every timing process
there, so that no figure depends on the order of the shapes. ``--malloc default`` keeps glibc's
start-up values. Other C libraries ignore these variables.
"""

from __future__ import annotations

import os

MODES = ("steady", "default")

# glibc's highest dynamic mmap threshold on 64-bit (4 * 1024 * 1024 * sizeof(long)) and the trim
# threshold it sets beside it (twice that): where its own adjustment ends in a long run.
STEADY = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}


def child_env(mode: str) -> dict[str, str]:
    """The variables to add to a timing process's environment; the caller's own settings win."""
    if mode == "default":
        return {}
    return {key: value for key, value in STEADY.items() if key not in os.environ}


def allocator_line(mode: str, isolation: str) -> str:
    """One line for the header and the Markdown: which thresholds the timing processes had."""
    own = {key: os.environ[key] for key in STEADY if key in os.environ}
    if isolation != "process":
        return ("allocator: this process's malloc as it is (glibc reads its thresholds at start-up; "
                "--malloc needs --isolation process)")
    if mode == "default":
        where = ", ".join(f"{key}={value} from the environment" for key, value in own.items())
        return f"allocator: glibc's start-up thresholds (--malloc default){'; ' + where if where else ''}"
    settings = ", ".join(f"{key}={os.environ.get(key, value)}" for key, value in STEADY.items())
    return (f"allocator: glibc's steady-state thresholds in every timing process ({settings}; "
            "--malloc default for its start-up ones)")

"""``python -m conv2d bench``: time conv2d against PyTorch, the bare matrix products and the seed.

For each shape, on the same data, it measures (median of ``--repeat`` timed calls after four warm-up
calls, three on a GPU); each implementation is timed over all shapes in a block of its own, by default
in a Python process of its own, so that no library's thread pool disturbs another's
(:mod:`~conv2d.tools.bench.isolation`):

- ours: :func:`conv2d.conv2d`, :func:`conv2d.conv2d_backward` and the two in a row; with
  ``--deterministic``, also the two in a row with ``deterministic=True``;
- the floor: the bare matrix products a convolution of that size cannot avoid, on the same backend
  (forward ``W @ patches`` per group; backward ``grad_y @ patches^T`` and ``W^T @ grad_y``);
- PyTorch: ``torch.nn.functional.conv2d`` forward, and forward plus autograd backward, when torch is
  importable (CPU tensors, or CUDA tensors when the backend is on a GPU);
- the seed: a NumPy reimplementation of the algorithm this project grew from (float64, patches gathered
  with three index arrays, one matrix product, ``np.add.at`` with four index arrays), the baseline
  users come from;
- the peak extra memory of one forward+backward, with the default workspace limit and with 64 MB.

On a GPU (CuPy, torch on CUDA) each call is timed by two CUDA events around it, on the device's own
clock, and TF32 is off on both sides (PyTorch's and CuPy's float32 matrix products, cuDNN's
convolutions) so that float32 is compared with float32; PyTorch picks its fastest cuDNN algorithm
(``torch.backends.cudnn.benchmark``). The JSON records these settings.

Optional libraries (torch, matplotlib, threadpoolctl, cupy, jax) are imported inside the functions
that need them: ``python -m conv2d info`` imports this package to build its parser.

The package, one concern a module: :mod:`~conv2d.tools.bench.shapes` (the shapes and presets),
:mod:`~conv2d.tools.bench.timing` (timers, warm-up, device sync), :mod:`~conv2d.tools.bench.precision` (no TF32),
:mod:`~conv2d.tools.bench.calls` (the data and the calls timed: ours, the floor, torch, the seed),
:mod:`~conv2d.tools.bench.memory` (peak memory), :mod:`~conv2d.tools.bench.isolation` (one implementation at a
time, each in its own process), :mod:`~conv2d.tools.bench.report` (one shape's numbers, the
table, the targets, the summary), :mod:`~conv2d.tools.bench.machine` (machine details, load average),
:mod:`~conv2d.tools.bench.blas_kernels` (OpenBLAS's kernel family, ``--openblas-coretype``),
:mod:`~conv2d.tools.bench.plausibility` (figures that cannot be right: timed again once, then marked ``!``) and
:mod:`~conv2d.tools.bench.cli` (the options, :func:`run`, the plot). Their public names are re-exported here.
"""

from __future__ import annotations

# ``name as name``: re-exported, though not in __all__ (the tests and ci/gpu-check use some of them).
from .calls import SEED_MAX_PATCH_BYTES as SEED_MAX_PATCH_BYTES
from .calls import SEED_REPEAT as SEED_REPEAT
from .calls import Case as Case
from .calls import floor_calls as floor_calls
from .calls import ours_calls as ours_calls
from .calls import seed_backward as seed_backward
from .calls import seed_calls as seed_calls
from .calls import seed_forward as seed_forward
from .calls import seed_indices as seed_indices
from .calls import seed_skip_reason as seed_skip_reason
from .calls import torch_calls as torch_calls
from .cli import add_arguments, run
from .cli import write_plot as write_plot
from .machine import machine_info as machine_info
from .memory import LIMITS as LIMITS
from .memory import SMALL_LIMIT as SMALL_LIMIT
from .memory import peak_memory as peak_memory
from .plausibility import implausible as implausible
from .precision import gpu_precision as gpu_precision
from .report import GROUPS as GROUPS
from .report import STATISTICS as STATISTICS
from .report import TARGETS, Target, measure
from .report import assemble as assemble
from .report import summary as summary
from .report import summary_lines as summary_lines
from .report import table_header as table_header
from .report import table_row as table_row
from .shapes import PRESETS, Shape, parse_shape, parse_shapes
from .shapes import SEED_SHAPE as SEED_SHAPE
from .shapes import SHAPE_FORMAT as SHAPE_FORMAT
from .timing import WARMUP as WARMUP
from .timing import EventTimer, time_calls, wall_timer
from .timing import Timer as Timer
from .timing import backend_timer as backend_timer
from .timing import default_warmup as default_warmup

__all__ = ["PRESETS", "TARGETS", "EventTimer", "Shape", "Target", "add_arguments", "measure", "parse_shape",
           "parse_shapes", "run", "time_calls", "wall_timer"]

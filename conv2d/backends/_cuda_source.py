"""CUDA C++ of the ``"kernels"`` algorithm: im2col and a gather-style col2im, one element per thread.

The sources are plain strings, written as ``cupy.ElementwiseKernel`` bodies: ``i`` is the element
index, ``T`` the array type, array parameters are raw 1-D pointers indexed by hand. Nothing here
imports CuPy: ``cupy.py`` compiles these strings on the GPU, and the tests compile the very same
strings with the host C++ compiler (``tests/kernel_harness.py``) to check the index arithmetic on
machines without a GPU.

Layouts are those of ``_algorithms.py``: the input chunk is (n, C, H, W); the patch matrix is
(C*kH*kW, n*rows*OW) with rows ordered channel, kernel row, kernel column and columns ordered
sample, output row (from ``row0``), output column.

- ``im2col``: one thread per patch element. Consecutive threads write consecutive columns and,
  at stride 1, read consecutive pixels: both sides coalesced. Padding reads as zero.
- ``col2im``: one thread per *input* pixel, which sums the patch elements that read it, in a
  fixed order (kernel row, kernel column) and in ``ACC`` precision (float for float16/float32,
  double for float64). No two threads write one address, so there are no atomics and the result
  is bitwise reproducible. It adds into its output, so chunks of output rows accumulate.
"""

from __future__ import annotations

from .._geometry import Geometry

# The int64 scalars every kernel takes, in order (64-bit: index products can pass 2**31).
PARAMS = ("C", "H", "W", "KH", "KW", "SH", "SW", "DH", "DW", "TOP", "LEFT", "OW", "ROW0", "ROWS", "N")

SCALARS = ", ".join(f"int64 {name}" for name in PARAMS)

IM2COL_PARAMS = (f"raw T x, {SCALARS}", "raw T cols")

IM2COL = """
const long long columns = N * ROWS * OW;
const long long column = i % columns;
const long long tap = i / columns;
const long long kj = tap % KW;
const long long ki = (tap / KW) % KH;
const long long c = tap / (KW * KH);
const long long ow = column % OW;
const long long oh = (column / OW) % ROWS + ROW0;
const long long s = column / (OW * ROWS);
const long long h = oh * SH + ki * DH - TOP;
const long long w = ow * SW + kj * DW - LEFT;
cols[i] = (h >= 0 && h < H && w >= 0 && w < W) ? x[((s * C + c) * H + h) * W + w] : (T)(0.0f);
"""

COL2IM_PARAMS = (f"raw T grad_cols, {SCALARS}", "raw T grad_x")

# `ACC` is replaced by the accumulator type when the kernel is built (see accumulator()).
COL2IM = """
const long long w = i % W;
const long long h = (i / W) % H;
const long long c = (i / (W * H)) % C;
const long long s = i / (W * H * C);
const long long columns = N * ROWS * OW;
ACC sum = 0;
for (long long ki = 0; ki < KH; ++ki) {
    const long long top = h + TOP - ki * DH;  /* = output row * SH, if this tap reads the pixel */
    if (top < 0) break;  /* only decreases with ki */
    if (top % SH != 0) continue;
    const long long oh = top / SH - ROW0;
    if (oh < 0 || oh >= ROWS) continue;
    for (long long kj = 0; kj < KW; ++kj) {
        const long long left = w + LEFT - kj * DW;
        if (left < 0) break;
        if (left % SW != 0) continue;
        const long long ow = left / SW;
        if (ow >= OW) continue;
        sum += (ACC)grad_cols[((c * KH + ki) * KW + kj) * columns + (s * ROWS + oh) * OW + ow];
    }
}
grad_x[i] = (T)((ACC)grad_x[i] + sum);
"""

# name -> ((in_params, out_params), operation), as ``cupy.ElementwiseKernel`` takes them.
KERNELS = {"im2col": (IM2COL_PARAMS, IM2COL), "col2im": (COL2IM_PARAMS, COL2IM)}


def accumulator(dtype_name: str) -> str:
    """The C type col2im sums in: double for float64, float otherwise (float16 sums in float)."""
    return "double" if dtype_name == "float64" else "float"


def kernel_args(geom: Geometry, samples: int, rows: tuple[int, int]) -> tuple[int, ...]:
    """The scalars of :data:`PARAMS` for `samples` samples and output rows ``[rows[0], rows[1])``."""
    top, _, left, _ = geom.padding
    return (
        geom.in_channels, geom.height, geom.width, geom.kernel_h, geom.kernel_w,
        *geom.stride, *geom.dilation, top, left, geom.out_w, rows[0], rows[1] - rows[0], samples,
    )

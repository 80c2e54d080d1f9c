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

Index arithmetic is in ``IDX``: 32-bit ``int`` when every index of the launch fits (the usual
case), else 64-bit. The many divisions that split a flat index are the kernels' main cost
besides memory traffic, and a 64-bit integer division is several times slower on a GPU.
"""

from __future__ import annotations

from .._geometry import Geometry

# The integer scalars every kernel takes, in order, as ElementwiseKernel parameters of type INDEX.
PARAMS = ("C", "H", "W", "KH", "KW", "SH", "SW", "DH", "DW", "TOP", "LEFT", "OW", "ROW0", "ROWS", "N")

# ElementwiseKernel's name of an index width -> its C type.
INDEX_TYPES = {"int32": "int", "int64": "long long"}
_INT32_MAX = 2**31 - 1

_SCALARS = ", ".join(f"INDEX {name}" for name in PARAMS)

IM2COL_PARAMS = (f"raw T x, {_SCALARS}", "raw T cols")

IM2COL = """
const IDX j = (IDX)i;
const IDX columns = N * ROWS * OW;
const IDX column = j % columns;
const IDX tap = j / columns;
const IDX kj = tap % KW;
const IDX ki = (tap / KW) % KH;
const IDX c = tap / (KW * KH);
const IDX ow = column % OW;
const IDX oh = (column / OW) % ROWS + ROW0;
const IDX s = column / (OW * ROWS);
const IDX h = oh * SH + ki * DH - TOP;
const IDX w = ow * SW + kj * DW - LEFT;
cols[j] = (h >= 0 && h < H && w >= 0 && w < W) ? x[((s * C + c) * H + h) * W + w] : (T)(0.0f);
"""

COL2IM_PARAMS = (f"raw T grad_cols, {_SCALARS}", "raw T grad_x")

COL2IM = """
const IDX j = (IDX)i;
const IDX w = j % W;
const IDX h = (j / W) % H;
const IDX c = (j / (W * H)) % C;
const IDX s = j / (W * H * C);
const IDX columns = N * ROWS * OW;
ACC sum = 0;
for (IDX ki = 0; ki < KH; ++ki) {
    const IDX top = h + TOP - ki * DH;  /* = output row * SH, if this tap reads the pixel */
    if (top < 0) break;  /* only decreases with ki */
    if (top % SH != 0) continue;
    const IDX oh = top / SH - ROW0;
    if (oh < 0 || oh >= ROWS) continue;
    for (IDX kj = 0; kj < KW; ++kj) {
        const IDX left = w + LEFT - kj * DW;
        if (left < 0) break;
        if (left % SW != 0) continue;
        const IDX ow = left / SW;
        if (ow >= OW) continue;
        sum += (ACC)grad_cols[((c * KH + ki) * KW + kj) * columns + (s * ROWS + oh) * OW + ow];
    }
}
grad_x[j] = (T)((ACC)grad_x[j] + sum);
"""

_KERNELS = {"im2col": (IM2COL_PARAMS, IM2COL), "col2im": (COL2IM_PARAMS, COL2IM)}


def accumulator(dtype_name: str) -> str:
    """The C type col2im sums in: double for float64, float otherwise (float16 sums in float)."""
    return "double" if dtype_name == "float64" else "float"


def index_width(*sizes: int) -> str:
    """``"int32"`` if every index into arrays of these sizes fits 32 bits, else ``"int64"``."""
    return "int32" if max(sizes, default=0) <= _INT32_MAX else "int64"


def kernel_source(name: str, dtype_name: str, index: str) -> tuple[str, str, str]:
    """(in_params, out_params, operation) of kernel `name` (``"im2col"`` or ``"col2im"``), as
    ``cupy.ElementwiseKernel`` takes them, for arrays of `dtype_name` and indices of width `index`."""
    (in_params, out_params), body = _KERNELS[name]
    body = body.replace("ACC", accumulator(dtype_name)).replace("IDX", INDEX_TYPES[index])
    return in_params.replace("INDEX", index), out_params, body


def kernel_args(geom: Geometry, samples: int, rows: tuple[int, int]) -> tuple[int, ...]:
    """The scalars of :data:`PARAMS` for `samples` samples and output rows ``[rows[0], rows[1])``."""
    top, _, left, _ = geom.padding
    return (
        geom.in_channels, geom.height, geom.width, geom.kernel_h, geom.kernel_w,
        *geom.stride, *geom.dilation, top, left, geom.out_w, rows[0], rows[1] - rows[0], samples,
    )

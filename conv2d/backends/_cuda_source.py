"""CUDA C++ of the ``"kernels"`` algorithm: im2col and a gather-style col2im, one element per thread.

The sources are plain strings, written as ``cupy.ElementwiseKernel`` bodies: ``i`` is the element
index, ``T`` the array type, array parameters are raw 1-D pointers indexed by hand. Nothing here
imports CuPy: ``cupy.py`` compiles these strings on the GPU, and the tests compile the very same
strings with the host C++ compiler (``tests/kernel_harness.py``) to check the index arithmetic on
machines without a GPU. ``ci/nvrtc-check`` compiles the source CuPy generates from them, for every
variant ``CupyKernels`` can launch, with NVIDIA's NVRTC for sm_90 and sm_80 (no GPU needed either).

Layouts are those of ``_algorithms.py``: the input chunk is (n, C, H, W); the patch matrix is
(C*kH*kW, n*rows*OW) with rows ordered channel, kernel row, kernel column and columns ordered
sample, output row (from ``row0``), output column.

- ``im2col``: one thread per (channel, column), writing that column's kH*kW patch elements, so
  the divisions that split the flat index are paid once per kH*kW elements. For each kernel tap,
  consecutive threads write consecutive columns and, at stride 1, read consecutive pixels: both
  sides coalesced. Padding reads as zero.
- ``col2im``: one thread per *input* pixel, which sums the patch elements that read it, in a
  fixed order (kernel row, kernel column) and in ``ACC`` precision (float for float16/float32,
  double for float64, ``complex<float>``/``complex<double>`` for complex64/complex128: im2col copies
  and col2im adds, so complex data needs nothing but the element type). No two threads write one
  address, so there are no atomics and the result is bitwise reproducible. It adds into its
  output, so chunks of output rows accumulate.

Index arithmetic is in ``IDX``: 32-bit ``int`` when every index of the launch fits (the usual
case), else 64-bit. The divisions that split a flat index are the kernels' main cost besides
memory traffic (a division by a value known only at run time is tens of instructions, and a
64-bit one several times more); :func:`launch_size` gives the number of threads of each kernel.
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
const IDX c = j / columns;
const IDX ow = column % OW;
const IDX oh = (column / OW) % ROWS + ROW0;
const IDX s = column / (OW * ROWS);
const IDX plane = (s * C + c) * H;  /* row 0 of channel c of sample s, in rows of W */
const IDX top = oh * SH - TOP;
const IDX left = ow * SW - LEFT;
IDX out = c * KH * KW * columns + column;
for (IDX ki = 0; ki < KH; ++ki) {
    const IDX h = top + ki * DH;
    const bool row_inside = h >= 0 && h < H;
    for (IDX kj = 0; kj < KW; ++kj) {
        const IDX w = left + kj * DW;
        cols[out] = (row_inside && w >= 0 && w < W) ? x[(plane + h) * W + w] : (T)(0.0f);
        out += columns;
    }
}
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
    /* Stride 1 (the common case) needs no division; the branch is the same for every thread. */
    IDX oh = top;
    if (SH != 1) {
        if (top % SH != 0) continue;
        oh = top / SH;
    }
    oh -= ROW0;
    if (oh < 0 || oh >= ROWS) continue;
    for (IDX kj = 0; kj < KW; ++kj) {
        const IDX left = w + LEFT - kj * DW;
        if (left < 0) break;
        IDX ow = left;
        if (SW != 1) {
            if (left % SW != 0) continue;
            ow = left / SW;
        }
        if (ow >= OW) continue;
        sum += (ACC)grad_cols[((c * KH + ki) * KW + kj) * columns + (s * ROWS + oh) * OW + ow];
    }
}
grad_x[j] = (T)((ACC)grad_x[j] + sum);
"""

_KERNELS = {"im2col": (IM2COL_PARAMS, IM2COL), "col2im": (COL2IM_PARAMS, COL2IM)}


# The C type col2im sums in: float16 sums in float; a complex type in itself (CuPy's ``complex<T>``,
# a thrust-style complex with the arithmetic the kernels use, constructible from 0 and from T).
_ACCUMULATORS = {"float64": "double", "complex64": "complex<float>", "complex128": "complex<double>"}


def accumulator(dtype_name: str) -> str:
    """The C type col2im sums in: double for float64, ``complex<float>``/``complex<double>`` for
    complex64/complex128, float otherwise (float16 sums in float)."""
    return _ACCUMULATORS.get(dtype_name, "float")


def accumulator_label(dtype_name: str) -> str:
    """:func:`accumulator` as a C identifier, for kernel names: ``float``, ``double``, ``cfloat``, ``cdouble``."""
    name = accumulator(dtype_name)
    return "c" + name[len("complex<"):-1] if name.startswith("complex<") else name


def index_width(*sizes: int) -> str:
    """``"int32"`` if every index into arrays of these sizes fits 32 bits, else ``"int64"``."""
    return "int32" if max(sizes, default=0) <= _INT32_MAX else "int64"


def launch_size(name: str, target_size: int, args: tuple[int, ...]) -> int:
    """Threads of kernel `name` writing `target_size` elements, with :func:`kernel_args` `args`."""
    if name == "im2col":  # one thread per kH*kW patch elements
        named = dict(zip(PARAMS, args))
        return target_size // (named["KH"] * named["KW"])
    return target_size  # col2im: one thread per input pixel


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

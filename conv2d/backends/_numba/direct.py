"""Compiled direct convolution for grouped layers with few channels per group (depthwise and near it).

No patch matrix: each output plane is the sum, over its group's channels and the kernel taps, of a
shifted (strided, dilated) view of one input plane times one weight. For each tap the range of
outputs whose input lies inside the image is computed once (:func:`_valid`), so the zero padding
is never materialised and the inner loop, along an output row, has no test (contiguous, hence
vectorised, where the stride is 1). 3x3 kernels have a fused path (:func:`_plane_3x3`): the nine
taps in registers, one pass over the output's interior instead of nine.

Work is split into tasks of (sample range, group range) blocks (:func:`_blocks`): a task owns the
output planes, input-gradient planes of its block, and returns the weight gradient of its groups
over its samples; the caller adds those over the sample ranges in task order (none when the groups
alone give every worker enough tasks, the usual case).

- forward: y[s, o] = bias[o] + sum_{c, i, j} w[o, c, i, j] * x[s, c, shifted by (i, j)];
- input gradient, stride 1: the forward convolution of the output gradient with the flipped kernel,
  weights transposed within the group and padding ``dilation*(k-1) - padding`` (negative where
  the layer's padding exceeds the kernel's reach: :func:`_valid` takes any offset);
- input gradient, stride > 1: each tap's outputs scattered back into the task's own planes;
- weight gradient: per tap, products summed along an output row in a row of accumulators
  (elementwise, so vectorised; one sum of the row at the end), over all of the task's samples.

Complex values are multiplied as they are (no conjugation), as in the library's other algorithms.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..._geometry import Geometry
from ._jit import kernel
from ._threads import run, split

# Tasks per worker: a few, so that a worker slowed by another process leaves its share to the others.
TASKS_PER_WORKER = 4


@kernel
def _valid(offset, stride, size, count):
    """[lo, hi): the outputs p < count with 0 <= p*stride + offset < size (the taps inside the image)."""
    lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
    last = size - 1 - offset
    hi = 0 if last < 0 else min(count, last // stride + 1)
    return lo, max(lo, hi)


@kernel
def _axpy(target, source, tap, count):
    """target[:count] += tap * source[:count] (views that start where the loop starts: the indices
    are then known non-negative, with no wrap-around test to keep the loop from being vectorised)."""
    for t in range(count):
        target[t] += tap * source[t]


@kernel
def _plane(out, x_plane, w, o, c, sh, sw, dh, dw, top, left):
    """out += the taps of w[o, c] over x_plane (any kernel size, stride, dilation, padding)."""
    height, width = x_plane.shape
    out_h, out_w = out.shape
    for i in range(w.shape[2]):
        oh0, oh1 = _valid(i * dh - top, sh, height, out_h)
        for j in range(w.shape[3]):
            shift = j * dw - left
            ow0, ow1 = _valid(shift, sw, width, out_w)
            tap = w[o, c, i, j]
            for oh in range(oh0, oh1):
                row = x_plane[oh * sh + i * dh - top]
                if sw == 1:
                    _axpy(out[oh, ow0:], row[ow0 + shift:], tap, ow1 - ow0)
                else:
                    _axpy(out[oh, ow0:], row[ow0 * sw + shift::sw], tap, ow1 - ow0)


@kernel
def _plane_3x3(out, x_plane, w, o, c, sh, sw, dh, dw, top, left):
    """:func:`_plane` for a 3x3 kernel: the nine taps at once on the outputs that read no padding."""
    height, width = x_plane.shape
    out_h, out_w = out.shape
    # Outputs whose three rows (columns) all lie inside the image: the intersection of the taps' ranges.
    oh0, oh1 = _valid(-top, sh, height, out_h)
    a0, a1 = _valid(2 * dh - top, sh, height, out_h)
    oh0, oh1 = max(oh0, a0), min(oh1, a1)
    ow0, ow1 = _valid(-left, sw, width, out_w)
    b0, b1 = _valid(2 * dw - left, sw, width, out_w)
    ow0, ow1 = max(ow0, b0), min(ow1, b1)
    if oh0 >= oh1 or ow0 >= ow1:
        _plane(out, x_plane, w, o, c, sh, sw, dh, dw, top, left)
        return
    w00, w01, w02 = w[o, c, 0, 0], w[o, c, 0, 1], w[o, c, 0, 2]
    w10, w11, w12 = w[o, c, 1, 0], w[o, c, 1, 1], w[o, c, 1, 2]
    w20, w21, w22 = w[o, c, 2, 0], w[o, c, 2, 1], w[o, c, 2, 2]
    for oh in range(out_h):
        if oh < oh0 or oh >= oh1:
            _row(out, x_plane, w, o, c, oh, 0, out_w, sh, sw, dh, dw, top, left)
            continue
        ih = oh * sh - top
        r0, r1, r2 = x_plane[ih], x_plane[ih + dh], x_plane[ih + 2 * dh]
        _row(out, x_plane, w, o, c, oh, 0, ow0, sh, sw, dh, dw, top, left)
        iw, e = ow0 * sw - left, 2 * dw
        if sw == 1:  # contiguous views: the loop is vectorised
            _nine(out[oh, ow0:], ow1 - ow0, r0[iw:], r0[iw + dw:], r0[iw + e:], r1[iw:], r1[iw + dw:],
                  r1[iw + e:], r2[iw:], r2[iw + dw:], r2[iw + e:], w00, w01, w02, w10, w11, w12, w20, w21, w22)
        else:
            _nine(out[oh, ow0:], ow1 - ow0, r0[iw::sw], r0[iw + dw::sw], r0[iw + e::sw], r1[iw::sw],
                  r1[iw + dw::sw], r1[iw + e::sw], r2[iw::sw], r2[iw + dw::sw], r2[iw + e::sw],
                  w00, w01, w02, w10, w11, w12, w20, w21, w22)
        _row(out, x_plane, w, o, c, oh, ow1, out_w, sh, sw, dh, dw, top, left)


@kernel
def _nine(target, count, a, b, c, d, e, f, g, h, k, wa, wb, wc, wd, we, wf, wg, wh, wk):
    """target[:count] += the nine taps' weights times the nine views (one per tap) of the input."""
    for t in range(count):
        target[t] += (wa * a[t] + wb * b[t] + wc * c[t] + wd * d[t] + we * e[t] + wf * f[t]
                      + wg * g[t] + wh * h[t] + wk * k[t])


@kernel
def _row(out, x_plane, w, o, c, oh, ow0, ow1, sh, sw, dh, dw, top, left):
    """out[oh, ow0:ow1] += the taps of w[o, c] inside the image (the padded edges of the 3x3 path)."""
    height, width = x_plane.shape
    for ow in range(ow0, ow1):
        total = out[oh, ow] * 0
        for i in range(w.shape[2]):
            ih = oh * sh + i * dh - top
            if 0 <= ih < height:
                for j in range(w.shape[3]):
                    iw = ow * sw + j * dw - left
                    if 0 <= iw < width:
                        total += w[o, c, i, j] * x_plane[ih, iw]
        out[oh, ow] += total


@kernel
def _forward(x, w, bias, y, s0, s1, g0, g1, sh, sw, dh, dw, top, left):
    """y[s0:s1, groups g0:g1] of the grouped convolution of x by w (w: (O, C/G, kH, kW)), bias added."""
    per_group = w.shape[1]
    filters = y.shape[1] // (x.shape[1] // per_group)
    fused = w.shape[2] == 3 and w.shape[3] == 3
    for s in range(s0, s1):
        for g in range(g0, g1):
            for o in range(g * filters, (g + 1) * filters):
                out = y[s, o]
                out[:, :] = bias[o]
                for c in range(per_group):
                    if fused:
                        _plane_3x3(out, x[s, g * per_group + c], w, o, c, sh, sw, dh, dw, top, left)
                    else:
                        _plane(out, x[s, g * per_group + c], w, o, c, sh, sw, dh, dw, top, left)


@kernel
def _scatter(grad_x, grad_out, w, s0, s1, g0, g1, sh, sw, dh, dw, top, left):
    """grad_x[s0:s1, groups g0:g1] += each tap's output gradient, put back where the tap read (any stride)."""
    per_group = w.shape[1]
    filters = grad_out.shape[1] // (grad_x.shape[1] // per_group)
    height, width = grad_x.shape[2], grad_x.shape[3]
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    for s in range(s0, s1):
        for g in range(g0, g1):
            for c in range(per_group):
                target = grad_x[s, g * per_group + c]
                for o in range(g * filters, (g + 1) * filters):
                    source = grad_out[s, o]
                    for i in range(w.shape[2]):
                        oh0, oh1 = _valid(i * dh - top, sh, height, out_h)
                        for j in range(w.shape[3]):
                            shift = j * dw - left
                            ow0, ow1 = _valid(shift, sw, width, out_w)
                            tap = w[o, c, i, j]
                            for oh in range(oh0, oh1):
                                _axpy(target[oh * sh + i * dh - top, ow0 * sw + shift::sw], source[oh, ow0:], tap,
                                      ow1 - ow0)


@kernel
def _mac(sums, a, b, count):
    """sums[:count] += a[:count] * b[:count], elementwise (vectorised; summed along the row later)."""
    for t in range(count):
        sums[t] += a[t] * b[t]


@kernel
def _weight_grad(grad_w, grad_out, x, acc, s0, s1, g0, g1, sh, sw, dh, dw, top, left):
    """grad_w[g0:g1 filters] = the weight gradient over samples s0:s1 (grad_w: the groups' rows only).

    acc: (kH*kW, OW) accumulators, one row of partial sums per tap, summed once at the end."""
    per_group = grad_w.shape[1]
    kh, kw = grad_w.shape[2], grad_w.shape[3]
    filters = grad_out.shape[1] // (x.shape[1] // per_group)
    height, width = x.shape[2], x.shape[3]
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    for g in range(g0, g1):
        for o in range(g * filters, (g + 1) * filters):
            for c in range(per_group):
                acc[:, :] = 0
                for s in range(s0, s1):
                    source = grad_out[s, o]
                    plane = x[s, g * per_group + c]
                    for i in range(kh):
                        oh0, oh1 = _valid(i * dh - top, sh, height, out_h)
                        for oh in range(oh0, oh1):
                            row = plane[oh * sh + i * dh - top]
                            grad_row = source[oh]
                            for j in range(kw):
                                shift = j * dw - left
                                ow0, ow1 = _valid(shift, sw, width, out_w)
                                count = ow1 - ow0
                                if sw == 1:
                                    _mac(acc[i * kw + j, ow0:], grad_row[ow0:], row[ow0 + shift:], count)
                                else:
                                    _mac(acc[i * kw + j, ow0:], grad_row[ow0:], row[ow0 * sw + shift::sw], count)
                for i in range(kh):
                    for j in range(kw):
                        grad_w[o - g0 * filters, c, i, j] = acc[i * kw + j].sum()


@kernel
def _pad(plane, flat, top, left, pitch, rows):
    """flat[(r, col) at r*pitch + col] = plane[r - top, col - left], zero outside the plane (a negative
    top or left crops it: the stride-1 input gradient's padding can be negative)."""
    height, width = plane.shape
    for t in range(flat.shape[0]):
        flat[t] = 0
    c0, c1 = max(0, left), min(pitch, left + width)
    for r in range(max(0, top), min(rows, top + height)):
        # Views from the first column copied: indices from 0, so no wrap-around test (vectorised).
        source, target = plane[r - top, c0 - left:], flat[r * pitch + c0:]
        for t in range(c1 - c0):
            target[t] = source[t]


@kernel
def _forward_flat(x, w, bias, y, padded, acc, s0, s1, g0, g1, dh, dw, top, left):
    """:func:`_forward` for stride 1: each input plane padded once into `padded` (rows of `pitch`, the
    output width plus the kernel's reach), so that every tap is one shift of the whole plane; the
    outputs are computed `pitch` wide (the extra columns, discarded, read across rows) in `acc`."""
    per_group = w.shape[1]
    kh, kw = w.shape[2], w.shape[3]
    filters = y.shape[1] // (x.shape[1] // per_group)
    out_h, out_w = y.shape[2], y.shape[3]
    pitch, rows = out_w + dw * (kw - 1), out_h + dh * (kh - 1)
    length = out_h * pitch
    step, e = dh * pitch, 2 * dw
    fused = kh == 3 and kw == 3
    for s in range(s0, s1):
        for g in range(g0, g1):
            for c in range(per_group):
                _pad(x[s, g * per_group + c], padded[c], top, left, pitch, rows)
            for o in range(g * filters, (g + 1) * filters):
                acc[:] = 0
                for c in range(per_group):
                    a = padded[c]
                    if fused:
                        _nine(acc, length, a, a[dw:], a[e:], a[step:], a[step + dw:], a[step + e:], a[2 * step:],
                              a[2 * step + dw:], a[2 * step + e:], w[o, c, 0, 0], w[o, c, 0, 1], w[o, c, 0, 2],
                              w[o, c, 1, 0], w[o, c, 1, 1], w[o, c, 1, 2], w[o, c, 2, 0], w[o, c, 2, 1], w[o, c, 2, 2])
                    else:
                        for i in range(kh):
                            for j in range(kw):
                                _axpy(acc, a[i * step + j * dw:], w[o, c, i, j], length)
                out = y[s, o]
                b = bias[o]
                for oh in range(out_h):
                    row = acc[oh * pitch:]
                    target = out[oh]
                    for ow in range(out_w):
                        target[ow] = row[ow] + b


@kernel
def _mac_masked(sums, a, b, keep, count):
    """sums[t] += a[t] * b[t] where keep[t], for t < count (a select, not a product by zero, so that an
    inf or NaN in a discarded column reaches nothing)."""
    for t in range(count):
        v = sums[t] + a[t] * b[t]
        sums[t] = v if keep[t] else sums[t]


@kernel
def _weight_grad_flat(grad_w, grad_out, x, padded, grads, keep, acc, s0, s1, g0, g1, dh, dw, top, left):
    """:func:`_weight_grad` for stride 1, on whole planes as :func:`_forward_flat` lays them out:
    acc[tap, p] sums grad_out * the shifted input over the samples, at the columns `keep` marks."""
    per_group = grad_w.shape[1]
    kh, kw = grad_w.shape[2], grad_w.shape[3]
    filters = grad_out.shape[1] // (x.shape[1] // per_group)
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    pitch, rows = out_w + dw * (kw - 1), out_h + dh * (kh - 1)
    length = out_h * pitch
    for g in range(g0, g1):
        for o in range(g * filters, (g + 1) * filters):
            for c in range(per_group):
                acc[:, :] = 0
                for s in range(s0, s1):
                    _pad(x[s, g * per_group + c], padded, top, left, pitch, rows)
                    source = grad_out[s, o]
                    for oh in range(out_h):
                        row, target = source[oh], grads[oh * pitch:]
                        for ow in range(out_w):
                            target[ow] = row[ow]
                    for i in range(kh):
                        for j in range(kw):
                            _mac_masked(acc[i * kw + j], grads, padded[i * dh * pitch + j * dw:], keep, length)
                for i in range(kh):
                    for j in range(kw):
                        grad_w[o - g0 * filters, c, i, j] = acc[i * kw + j].sum()


def _args(geom: Geometry) -> tuple[int, ...]:
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    top, _, left, _ = geom.padding
    return sh, sw, dh, dw, top, left


def _blocks(n: int, groups: int, workers: int) -> list[tuple[int, int, int, int]]:
    """(s0, s1, g0, g1) tasks: groups split first (a task then owns its groups' weight gradient),
    samples too where the groups alone are fewer than TASKS_PER_WORKER per worker."""
    wanted = TASKS_PER_WORKER * workers if workers > 1 else 1
    group_parts = split(groups, wanted)
    sample_parts = split(n, -(-wanted // len(group_parts)))
    return [(s0, s1, g0, g1) for g0, g1 in group_parts for s0, s1 in sample_parts]


def _flat_sizes(geom: Geometry) -> tuple[int, int, int]:
    """(pitch, length, padded plane size) of the stride-1 layout of :func:`_forward_flat`."""
    (dh, dw), (kh, kw) = geom.dilation, (geom.kernel_h, geom.kernel_w)
    pitch = geom.out_w + dw * (kw - 1)
    return pitch, geom.out_h * pitch, (geom.out_h + dh * (kh - 1)) * pitch + dw * (kw - 1)


def scratch(geom: Geometry, itemsize: int, cache_bytes: int) -> int:
    """Bytes one task holds beside the result: its weight gradient, and its planes (padded inputs,
    output gradient, accumulators: a row per tap, or a whole plane per tap for stride 1)."""
    taps = geom.kernel_h * geom.kernel_w
    weights = itemsize * geom.out_channels * geom.patch_size
    if geom.stride != (1, 1):
        return weights + itemsize * taps * geom.out_w
    _, length, plane = _flat_sizes(geom)
    channels = max(geom.channels_per_group, geom.filters_per_group)
    return weights + itemsize * (channels * plane + (taps + 2) * length) + length


def forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, geom: Geometry, workers: int,
            cache_bytes: int) -> np.ndarray:
    y = np.empty((x.shape[0], geom.out_channels, geom.out_h, geom.out_w), dtype=x.dtype)
    b = np.zeros(geom.out_channels, dtype=x.dtype) if bias is None else bias
    _convolve(x, weight, b, y, geom.stride, geom.dilation, geom.padding[0], geom.padding[2],
              _blocks(x.shape[0], geom.groups, workers))
    return y


def _convolve(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, y: np.ndarray, stride: tuple[int, int],
              dilation: tuple[int, int], top: int, left: int, blocks: list[tuple[int, int, int, int]]) -> None:
    """y = the grouped convolution of x by weight (+ bias), block by block on the workers."""
    (sh, sw), (dh, dw) = stride, dilation
    if stride != (1, 1):
        run([partial(_forward, x, weight, bias, y, *block, sh, sw, dh, dw, top, left) for block in blocks])
        return
    kh, kw = weight.shape[2], weight.shape[3]
    pitch = y.shape[3] + dw * (kw - 1)
    plane = (y.shape[2] + dh * (kh - 1)) * pitch + dw * (kw - 1)

    def task(s0: int, s1: int, g0: int, g1: int) -> None:
        padded = np.empty((weight.shape[1], plane), dtype=x.dtype)
        acc = np.empty(y.shape[2] * pitch, dtype=x.dtype)
        _forward_flat(x, weight, bias, y, padded, acc, s0, s1, g0, g1, dh, dw, top, left)

    run([partial(task, *block) for block in blocks])


def _flipped(weight: np.ndarray, geom: Geometry) -> np.ndarray:
    """The stride-1 input gradient's kernel: (C, O/G, kH, kW), flipped, filters and channels swapped in each group."""
    g, m, c = geom.groups, geom.filters_per_group, geom.channels_per_group
    w = weight.reshape(g, m, c, geom.kernel_h, geom.kernel_w)[:, :, :, ::-1, ::-1]
    return np.ascontiguousarray(np.swapaxes(w, 1, 2)).reshape(geom.in_channels, m, geom.kernel_h, geom.kernel_w)


def _input_grad(grad_out: np.ndarray, weight: np.ndarray, geom: Geometry, grad_x: np.ndarray,
                blocks: list[tuple[int, int, int, int]]) -> None:
    """grad_x = the input gradient, block by block on the workers."""
    if geom.stride == (1, 1):
        # A forward convolution of the output gradient: flipped kernel, padding reach - padding.
        (dh, dw), (kh, kw) = geom.dilation, (geom.kernel_h, geom.kernel_w)
        top, left = dh * (kh - 1) - geom.padding[0], dw * (kw - 1) - geom.padding[2]
        _convolve(grad_out, _flipped(weight, geom), np.zeros(geom.in_channels, dtype=grad_out.dtype), grad_x,
                  (1, 1), geom.dilation, top, left, blocks)
        return
    grad_x[...] = 0
    run([partial(_scatter, grad_x, grad_out, weight, *block, *_args(geom)) for block in blocks])


def _weight_grad_task(grad_out: np.ndarray, x: np.ndarray, geom: Geometry, s0: int, s1: int, g0: int,
                      g1: int) -> np.ndarray:
    """The weight gradient of groups g0:g1 over samples s0:s1 (one task's)."""
    filters, taps = geom.filters_per_group, geom.kernel_h * geom.kernel_w
    grad_w = np.empty(((g1 - g0) * filters, geom.channels_per_group, geom.kernel_h, geom.kernel_w), dtype=x.dtype)
    if geom.stride != (1, 1):
        acc = np.empty((taps, geom.out_w), dtype=x.dtype)
        _weight_grad(grad_w, grad_out, x, acc, s0, s1, g0, g1, *_args(geom))
        return grad_w
    pitch, length, plane = _flat_sizes(geom)
    keep = np.zeros((geom.out_h, pitch), dtype=np.bool_)
    keep[:, :geom.out_w] = True
    padded, grads = np.empty(plane, dtype=x.dtype), np.zeros(length, dtype=x.dtype)
    acc = np.empty((taps, length), dtype=x.dtype)
    _weight_grad_flat(grad_w, grad_out, x, padded, grads, keep.reshape(-1), acc, s0, s1, g0, g1, *geom.dilation,
                      geom.padding[0], geom.padding[2])
    return grad_w


def backward(grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, geom: Geometry, workers: int,
             cache_bytes: int, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any]:
    blocks = _blocks(x.shape[0], geom.groups, workers)
    grad_x = None
    if "x" in needs:
        grad_x = np.empty_like(x)
        _input_grad(grad_out, weight, geom, grad_x, blocks)
    grad_w = None
    if "weight" in needs:
        partials = run([partial(_weight_grad_task, grad_out, x, geom, *block) for block in blocks])
        grad_w = np.zeros_like(weight)
        filters = geom.filters_per_group
        for (_, _, g0, g1), part in zip(blocks, partials):  # in task order: the same sum on every run
            grad_w[g0 * filters:g1 * filters] += part
    return grad_x, grad_w

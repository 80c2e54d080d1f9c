"""Compiled direct convolution for grouped layers with few channels per group (depthwise and near it).

No patch matrix: each output plane is the sum, over its group's channels and the kernel taps, of a
shifted (strided, dilated) view of one input plane times one weight. Each input plane is first
copied, padded, into a small buffer split by the stride's phases (:func:`_pad`; one phase for
stride 1), with rows `pitch` long: the output width plus the kernel's reach within a phase. Every
tap then reads one phase at unit stride from a fixed shift, so a tap is one elementwise pass over
the whole plane (:func:`_axpy`; 3x3 kernels: the nine taps in one pass, :func:`_nine`), long loops
that vectorise, instead of one short loop per output row and tap (measured 3x slower on a 24x24
depthwise layer). The outputs are computed `pitch` wide; the extra columns read across rows and are
dropped. Only one sample's planes are padded at a time (memory: :func:`scratch`).

- forward: y[s, o] = bias[o] + sum_{c, i, j} w[o, c, i, j] * x[s, c, shifted by (i, j)];
- input gradient, stride 1 (finite weights): the forward convolution of the output gradient with
  the flipped kernel, weights transposed within the group and padding ``dilation*(k-1) - padding``
  (negative where the layer's padding exceeds the kernel's reach: :func:`_pad` crops);
- input gradient, otherwise: the transpose of the forward's layout: each tap's output gradient
  added, as one shift of the whole plane, into the phase it read (:func:`_input_grad_flat`), the
  phases then put back in place;
- weight gradient: per tap, output gradient times the tap's input summed elementwise over the
  task's samples in a plane of accumulators (vectorised; each summed once at the end), where the
  column is a real output: a select, not a product by zero, so that an inf read only by a dropped
  column reaches no weight.

Work is split into tasks of (sample range, group range) blocks (:func:`_blocks`): a task writes the
outputs and input-gradient planes of its block and returns the weight gradient of its groups over
its samples; the caller adds those over the sample ranges in task order (nothing to add when the
groups alone give every worker enough tasks, the usual case). Complex values are multiplied as they
are (no conjugation), as in the library's other algorithms.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..._geometry import Geometry
from ._jit import kernel, reduction
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
def _nine(target, count, taps, wa, wb, wc, wd, we, wf, wg, wh, wk):
    """target[:count] += the nine taps' weights times the nine views (`taps`, :func:`_nine_taps`) of the input."""
    a, b, c, d, e, f, g, h, k = taps
    for t in range(count):
        target[t] += (wa * a[t] + wb * b[t] + wc * c[t] + wd * d[t] + we * e[t] + wf * f[t]
                      + wg * g[t] + wh * h[t] + wk * k[t])


@kernel
def _pad(plane, phases, top, left, sh, sw, pitch, rows):
    """phases[a*sw + b, r*pitch + col] = plane[r*sh + a - top, col*sw + b - left], zero outside the plane:
    the padded plane split by the stride's phases (one phase for stride 1), so that each tap reads one
    phase at unit stride. top and left may be negative (the stride-1 input gradient's padding can be)."""
    height, width = plane.shape
    for phase in range(sh * sw):
        flat = phases[phase]
        for t in range(flat.shape[0]):
            flat[t] = 0
    for ih in range(max(0, -top), min(height, rows * sh - top)):
        a, r = (ih + top) % sh, (ih + top) // sh
        for b in range(sw):
            c0, c1 = _valid(b - left, sw, width, pitch)
            if sw == 1:  # views from the first column copied: indices from 0, no wrap-around test (vectorised)
                source = plane[ih, c0 - left:]
            else:
                source = plane[ih, c0 * sw + b - left::sw]
            target = phases[a * sw + b, r * pitch + c0:]
            for t in range(c1 - c0):
                target[t] = source[t]


@kernel
def _pitch_rows(out_h, out_w, kh, kw, sh, sw, dh, dw):
    """The layout of a padded plane's phases: rows `pitch` long (the output width plus the kernel's reach
    within a phase), and how many rows (the output height plus that reach)."""
    return out_w + dw * (kw - 1) // sw, out_h + dh * (kh - 1) // sh


@kernel
def _tap(phases, i, j, sh, sw, dh, dw, pitch):
    """The view of `phases` that tap (i, j) reads at unit stride, from the first output on."""
    return phases[(i * dh % sh) * sw + j * dw % sw, (i * dh // sh) * pitch + j * dw // sw:]


@kernel
def _nine_taps(phases, sh, sw, dh, dw, pitch):
    """The views of a 3x3 kernel's nine taps (:func:`_tap`), row by row."""
    return (_tap(phases, 0, 0, sh, sw, dh, dw, pitch), _tap(phases, 0, 1, sh, sw, dh, dw, pitch),
            _tap(phases, 0, 2, sh, sw, dh, dw, pitch), _tap(phases, 1, 0, sh, sw, dh, dw, pitch),
            _tap(phases, 1, 1, sh, sw, dh, dw, pitch), _tap(phases, 1, 2, sh, sw, dh, dw, pitch),
            _tap(phases, 2, 0, sh, sw, dh, dw, pitch), _tap(phases, 2, 1, sh, sw, dh, dw, pitch),
            _tap(phases, 2, 2, sh, sw, dh, dw, pitch))


@kernel
def _pitched(plane, flat, pitch):
    """flat[oh*pitch + ow] = plane[oh, ow]: an output(-gradient) plane in the rows `pitch` long of the
    padded phases' layout (the columns beyond the plane's width left as they are)."""
    out_h, out_w = plane.shape
    for oh in range(out_h):
        row, target = plane[oh], flat[oh * pitch:]
        for ow in range(out_w):
            target[ow] = row[ow]


@kernel
def _forward_flat(x, w, bias, y, padded, acc, s0, s1, g0, g1, sh, sw, dh, dw, top, left):
    """y[s0:s1, groups g0:g1] (bias added) on whole planes: each input plane padded and split by phase
    once into `padded` (rows of `pitch`: the output width plus the kernel's reach in the phase), so
    that every tap is one shift of one phase; the outputs are computed `pitch` wide (the extra columns,
    discarded, read across rows) in `acc`."""
    per_group = w.shape[1]
    kh, kw = w.shape[2], w.shape[3]
    filters = y.shape[1] // (x.shape[1] // per_group)
    out_h, out_w = y.shape[2], y.shape[3]
    pitch, rows = _pitch_rows(out_h, out_w, kh, kw, sh, sw, dh, dw)
    length = out_h * pitch
    fused = kh == 3 and kw == 3
    for s in range(s0, s1):
        for g in range(g0, g1):
            for c in range(per_group):
                _pad(x[s, g * per_group + c], padded[c], top, left, sh, sw, pitch, rows)
            for o in range(g * filters, (g + 1) * filters):
                acc[:] = 0
                for c in range(per_group):
                    p = padded[c]
                    if fused:
                        _nine(acc, length, _nine_taps(p, sh, sw, dh, dw, pitch), w[o, c, 0, 0], w[o, c, 0, 1],
                              w[o, c, 0, 2], w[o, c, 1, 0], w[o, c, 1, 1], w[o, c, 1, 2], w[o, c, 2, 0], w[o, c, 2, 1],
                              w[o, c, 2, 2])
                    else:
                        for i in range(kh):
                            for j in range(kw):
                                _axpy(acc, _tap(p, i, j, sh, sw, dh, dw, pitch), w[o, c, i, j], length)
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
def _mac2_masked(sums, a, b, c, d, keep, count):
    """sums[t] += a[t] * b[t] + c[t] * d[t] where keep[t], for t < count (see :func:`_mac_masked`)."""
    for t in range(count):
        v = sums[t] + (a[t] * b[t] + c[t] * d[t])
        sums[t] = v if keep[t] else sums[t]


@reduction
def _dot9(g, taps, keep, zero, count):
    """The nine sums over t < count, where keep[t], of g[t] times each of the nine views (`taps`,
    :func:`_nine_taps`): a 3x3 kernel's weight gradient, all nine in one pass (a select keeps an inf or
    NaN of a discarded column out)."""
    a, b, c, d, e, f, h, k, m = taps
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = zero
    for t in range(count):
        v = g[t]
        if keep[t]:
            s0 += v * a[t]
            s1 += v * b[t]
            s2 += v * c[t]
            s3 += v * d[t]
            s4 += v * e[t]
            s5 += v * f[t]
            s6 += v * h[t]
            s7 += v * k[t]
            s8 += v * m[t]
    return s0, s1, s2, s3, s4, s5, s6, s7, s8


@kernel
def _weight_grad_flat(grad_w, grad_out, x, padded, grads, keep, acc, s0, s1, g0, g1, sh, sw, dh, dw, top, left):
    """The weight gradient of groups g0:g1 over samples s0:s1 (grad_w: those groups' filters only), on
    whole planes as :func:`_forward_flat` lays them out: acc[tap, p] sums grad_out times the tap's
    input over the samples at the columns `keep` marks (elementwise, so vectorised), each row summed
    once at the end."""
    per_group = grad_w.shape[1]
    kh, kw = grad_w.shape[2], grad_w.shape[3]
    filters = grad_out.shape[1] // (x.shape[1] // per_group)
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    pitch, rows = _pitch_rows(out_h, out_w, kh, kw, sh, sw, dh, dw)
    length = out_h * pitch
    fused = kh == 3 and kw == 3
    zero = np.zeros(1, grad_w.dtype)[0]
    for g in range(g0, g1):
        for o in range(g * filters, (g + 1) * filters):
            for c in range(per_group):
                if fused:  # the nine sums in one pass per sample, no plane of accumulators
                    p, flat = padded[0], grads[0]
                    grad_w[o - g0 * filters, c] = 0  # also the result of no samples
                    for s in range(s0, s1):
                        _pad(x[s, g * per_group + c], p, top, left, sh, sw, pitch, rows)
                        _pitched(grad_out[s, o], flat, pitch)
                        sums = _dot9(flat, _nine_taps(p, sh, sw, dh, dw, pitch), keep, zero, length)
                        for tap in range(9):
                            grad_w[o - g0 * filters, c, tap // 3, tap % 3] += sums[tap]
                    continue
                acc[:, :] = 0
                for s in range(s0, s1, 2):  # two samples a pass: half the accumulators' loads and stores
                    pair = s + 1 < s1
                    for k in range(2 if pair else 1):
                        _pad(x[s + k, g * per_group + c], padded[k], top, left, sh, sw, pitch, rows)
                        _pitched(grad_out[s + k, o], grads[k], pitch)
                    for i in range(kh):
                        for j in range(kw):
                            first = _tap(padded[0], i, j, sh, sw, dh, dw, pitch)
                            if pair:
                                _mac2_masked(acc[i * kw + j], grads[0], first, grads[1],
                                             _tap(padded[1], i, j, sh, sw, dh, dw, pitch), keep, length)
                            else:
                                _mac_masked(acc[i * kw + j], grads[0], first, keep, length)
                for i in range(kh):
                    for j in range(kw):
                        grad_w[o - g0 * filters, c, i, j] = acc[i * kw + j].sum()


@kernel
def _axpy_masked(target, source, tap, keep, count):
    """target[t] += tap * source[t] where keep[t], for t < count (a select: see :func:`_mac_masked`)."""
    for t in range(count):
        v = target[t] + tap * source[t]
        target[t] = v if keep[t] else target[t]


@kernel
def _unpad(phases, plane, top, left, sh, sw, pitch, rows):
    """The inverse of :func:`_pad`: plane[ih, iw] = the phase element it was copied to (zero where
    none: rows and columns no output reads)."""
    height, width = plane.shape
    for ih in range(height):
        target = plane[ih]
        for t in range(width):
            target[t] = 0
        if ih + top < 0 or ih + top >= rows * sh:
            continue
        a, r = (ih + top) % sh, (ih + top) // sh
        for b in range(sw):
            c0, c1 = _valid(b - left, sw, width, pitch)
            source = phases[a * sw + b, r * pitch + c0:]
            view = plane[ih, c0 * sw + b - left::sw]
            for t in range(c1 - c0):
                view[t] = source[t]


@kernel
def _input_grad_flat(grad_x, grad_out, w, phases, grads, keep, s0, s1, g0, g1, sh, sw, dh, dw, top, left):
    """grad_x[s0:s1, groups g0:g1] for any stride: each tap's output gradient added, as one shift of
    the whole plane, into the phase it read (the transpose of :func:`_forward_flat`), then the phases
    put back in place (:func:`_unpad`)."""
    per_group = w.shape[1]
    kh, kw = w.shape[2], w.shape[3]
    filters = grad_out.shape[1] // (grad_x.shape[1] // per_group)
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    pitch, rows = _pitch_rows(out_h, out_w, kh, kw, sh, sw, dh, dw)
    length = out_h * pitch
    for s in range(s0, s1):
        for g in range(g0, g1):
            for c in range(per_group):
                phases[:, :] = 0
                for o in range(g * filters, (g + 1) * filters):
                    _pitched(grad_out[s, o], grads, pitch)
                    for i in range(kh):
                        for j in range(kw):
                            _axpy_masked(_tap(phases, i, j, sh, sw, dh, dw, pitch), grads, w[o, c, i, j], keep, length)
                _unpad(phases, grad_x[s, g * per_group + c], top, left, sh, sw, pitch, rows)


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
    """(pitch, length, size of one phase) of the layout of :func:`_forward_flat`."""
    (sh, sw), (dh, dw), (kh, kw) = geom.stride, geom.dilation, (geom.kernel_h, geom.kernel_w)
    pitch, rows = _pitch_rows(geom.out_h, geom.out_w, kh, kw, sh, sw, dh, dw)
    return pitch, geom.out_h * pitch, rows * pitch + dw * (kw - 1) // sw


def scratch(geom: Geometry, itemsize: int, cache_bytes: int) -> int:
    """Bytes one task holds beside the result: its weight gradient and its planes (the padded input
    planes split by phase, the output gradient, the accumulators: a plane per tap)."""
    taps, phases = geom.kernel_h * geom.kernel_w, geom.stride[0] * geom.stride[1]
    _, length, plane = _flat_sizes(geom)
    channels = max(geom.channels_per_group, geom.filters_per_group)
    weights = geom.out_channels * geom.patch_size
    return itemsize * (weights + channels * phases * plane + (taps + 2) * length) + length


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
    kh, kw = weight.shape[2], weight.shape[3]
    pitch = y.shape[3] + dw * (kw - 1) // sw
    plane = (y.shape[2] + dh * (kh - 1) // sh) * pitch + dw * (kw - 1) // sw

    def task(s0: int, s1: int, g0: int, g1: int) -> None:
        padded = np.empty((weight.shape[1], sh * sw, plane), dtype=x.dtype)
        acc = np.empty(y.shape[2] * pitch, dtype=x.dtype)
        _forward_flat(x, weight, bias, y, padded, acc, s0, s1, g0, g1, sh, sw, dh, dw, top, left)

    run([partial(task, *block) for block in blocks])


def _flipped(weight: np.ndarray, geom: Geometry) -> np.ndarray:
    """The stride-1 input gradient's kernel: (C, O/G, kH, kW), flipped, filters and channels swapped in each group."""
    g, m, c = geom.groups, geom.filters_per_group, geom.channels_per_group
    w = weight.reshape(g, m, c, geom.kernel_h, geom.kernel_w)[:, :, :, ::-1, ::-1]
    return np.ascontiguousarray(np.swapaxes(w, 1, 2)).reshape(geom.in_channels, m, geom.kernel_h, geom.kernel_w)


def _input_grad(grad_out: np.ndarray, weight: np.ndarray, geom: Geometry, grad_x: np.ndarray,
                blocks: list[tuple[int, int, int, int]]) -> None:
    """grad_x = the input gradient, block by block on the workers."""
    if geom.stride == (1, 1) and np.isfinite(weight).all():
        # A forward convolution of the output gradient: flipped kernel, padding reach - padding (1.5x
        # faster than the transpose below, measured on 3x3 depthwise layers). It multiplies the weights
        # by the output gradient's zero padding, which an inf weight would turn NaN where PyTorch's
        # gradient is finite: such weights (a check of a few numbers) take the transpose.
        (dh, dw), (kh, kw) = geom.dilation, (geom.kernel_h, geom.kernel_w)
        top, left = dh * (kh - 1) - geom.padding[0], dw * (kw - 1) - geom.padding[2]
        _convolve(grad_out, _flipped(weight, geom), np.zeros(geom.in_channels, dtype=grad_out.dtype), grad_x,
                  (1, 1), geom.dilation, top, left, blocks)
        return
    pitch, length, plane = _flat_sizes(geom)
    keep = np.zeros((geom.out_h, pitch), dtype=np.bool_)
    keep[:, :geom.out_w] = True

    def task(s0: int, s1: int, g0: int, g1: int) -> None:
        phases = np.empty((geom.stride[0] * geom.stride[1], plane), dtype=grad_x.dtype)
        grads = np.zeros(length, dtype=grad_x.dtype)
        _input_grad_flat(grad_x, grad_out, weight, phases, grads, keep.reshape(-1), s0, s1, g0, g1, *_args(geom))

    run([partial(task, *block) for block in blocks])


def _weight_grad_task(grad_out: np.ndarray, x: np.ndarray, geom: Geometry, s0: int, s1: int, g0: int,
                      g1: int) -> np.ndarray:
    """The weight gradient of groups g0:g1 over samples s0:s1 (one task's)."""
    filters, taps = geom.filters_per_group, geom.kernel_h * geom.kernel_w
    grad_w = np.empty(((g1 - g0) * filters, geom.channels_per_group, geom.kernel_h, geom.kernel_w), dtype=x.dtype)
    pitch, length, plane = _flat_sizes(geom)
    keep = np.zeros((geom.out_h, pitch), dtype=np.bool_)
    keep[:, :geom.out_w] = True
    padded = np.empty((2, geom.stride[0] * geom.stride[1], plane), dtype=x.dtype)
    grads, acc = np.zeros((2, length), dtype=x.dtype), np.empty((taps, length), dtype=x.dtype)
    _weight_grad_flat(grad_w, grad_out, x, padded, grads, keep.reshape(-1), acc, s0, s1, g0, g1, *geom.stride,
                      *geom.dilation, geom.padding[0], geom.padding[2])
    return grad_w


def backward(grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, geom: Geometry, workers: int,
             cache_bytes: int, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any]:
    blocks = _blocks(x.shape[0], geom.groups, workers)
    grad_x = None
    if "x" in needs:
        grad_x = np.empty(x.shape, dtype=x.dtype)
        _input_grad(grad_out, weight, geom, grad_x, blocks)
    grad_w = None
    if "weight" in needs:
        partials = run([partial(_weight_grad_task, grad_out, x, geom, *block) for block in blocks])
        grad_w = np.zeros_like(weight)
        filters = geom.filters_per_group
        for (_, _, g0, g1), part in zip(blocks, partials):  # in task order: the same sum on every run
            grad_w[g0 * filters:g1 * filters] += part
    return grad_x, grad_w

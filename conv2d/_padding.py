"""Padding modes other than zeros, as ``torch.nn.Conv2d(padding_mode=...)`` reads them.

A convolution with ``padding_mode="reflect" | "replicate" | "circular"`` is the convolution without
padding of the input padded explicitly in that mode (``torch.nn.functional.pad(x, ..., mode=...)``),
which is what PyTorch's layer does. :func:`pad` builds that padded input from slices of `x` with the
array API alone (``concat``, ``flip``, ``broadcast_to``), so it runs on every backend; :func:`fold`
is its transpose, the input gradient: each border pixel of the padded gradient is added back onto
the input pixel it was copied from (reflect and replicate onto pixels near the edge, circular onto
the far side: the gradient wraps around).

The two spatial axes are padded one after the other (rows, then columns) and folded back in the
reverse order; both maps are separable, so the corners come out as PyTorch's do.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device as device_of

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def check_padding_mode(padding_mode: object) -> str:
    """`padding_mode` itself when it is one of :data:`PADDING_MODES`; TypeError/ValueError otherwise."""
    choices = ", ".join(map(repr, PADDING_MODES))
    if not isinstance(padding_mode, str):
        raise TypeError(f"padding_mode must be a string, one of {choices}, got {padding_mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {choices}, got {padding_mode!r}")
    return padding_mode


def check_mode_fits(padding_mode: str, pads: tuple[int, ...], sizes: tuple[int, ...], padding: object) -> None:
    """Refuse what ``torch.nn.functional.pad`` refuses: a reflect pad as large as the input axis, a
    circular pad larger than it, a replicate pad of an empty axis.

    `pads` is (before, after) per axis of `sizes` (the spatial sizes of the input), as normalised;
    `padding` is what the caller passed, quoted in the message.
    """
    axes = ("height", "width") if len(sizes) == 2 else ("length",)
    for axis, size, before, after in zip(axes, sizes, pads[0::2], pads[1::2]):
        widest = max(before, after)
        if widest == 0:
            continue
        if padding_mode == "reflect" and widest >= size:
            raise ValueError(
                f"padding_mode='reflect' needs each padding smaller than the input {axis}, got padding {padding!r} "
                f"({before} before, {after} after) on an input {axis} of {size}; use less padding or "
                "padding_mode='replicate' or 'zeros'"
            )
        if padding_mode == "circular" and widest > size:
            raise ValueError(
                f"padding_mode='circular' needs each padding at most the input {axis} (it wraps around once), got "
                f"padding {padding!r} ({before} before, {after} after) on an input {axis} of {size}; use less padding"
            )
        if padding_mode == "replicate" and size == 0:
            raise ValueError(
                f"padding_mode='replicate' cannot pad an empty input {axis} (size 0) with padding {padding!r}: "
                "there is no edge pixel to repeat"
            )


def _take(xp: Any, a: Any, axis: int, start: int, stop: int) -> Any:
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def _pad_axis(xp: Any, a: Any, axis: int, before: int, after: int, mode: str) -> Any:
    if before == 0 and after == 0:
        return a
    size = a.shape[axis]
    if mode == "reflect":  # the edge pixel itself is not repeated
        head = xp.flip(_take(xp, a, axis, 1, before + 1), axis=axis)
        tail = xp.flip(_take(xp, a, axis, size - after - 1, size - 1), axis=axis)
    elif mode == "replicate":
        head = _repeat(xp, _take(xp, a, axis, 0, 1), axis, before)
        tail = _repeat(xp, _take(xp, a, axis, size - 1, size), axis, after)
    else:  # circular
        head = _take(xp, a, axis, size - before, size)
        tail = _take(xp, a, axis, 0, after)
    return xp.concat([head, a, tail], axis=axis)


def _repeat(xp: Any, edge: Any, axis: int, count: int) -> Any:
    shape = list(edge.shape)
    shape[axis] = count
    return xp.broadcast_to(edge, tuple(shape))


def pad(xp: Any, x: Any, pads: tuple[int, int, int, int], mode: str) -> Any:
    """`x` (N, C, H, W) padded by (top, bottom, left, right) in `mode` (not ``"zeros"``); `x` is not modified."""
    top, bottom, left, right = pads
    return _pad_axis(xp, _pad_axis(xp, x, 2, top, bottom, mode), 3, left, right, mode)


def _placed(xp: Any, part: Any, axis: int, start: int, size: int) -> Any:
    """`part` at offset `start` of a zero array `size` long along `axis` (an immutable-array ``+=``)."""
    shape = list(part.shape)
    pieces = []
    if start > 0:
        shape[axis] = start
        pieces.append(xp.zeros(tuple(shape), dtype=part.dtype, device=device_of(part)))
    pieces.append(part)
    rest = size - start - part.shape[axis]
    if rest > 0:
        shape[axis] = rest
        pieces.append(xp.zeros(tuple(shape), dtype=part.dtype, device=device_of(part)))
    return xp.concat(pieces, axis=axis) if len(pieces) > 1 else part


def _fold_axis(xp: Any, g: Any, axis: int, before: int, after: int, mode: str) -> Any:
    if before == 0 and after == 0:
        return g
    padded = g.shape[axis]
    size = padded - before - after
    inner = _take(xp, g, axis, before, before + size)
    head = _take(xp, g, axis, 0, before)
    tail = _take(xp, g, axis, before + size, padded)
    if mode == "reflect":  # head[i] copied pixel before - i, tail[i] pixel size - 2 - i
        parts = [(xp.flip(head, axis=axis), 1), (xp.flip(tail, axis=axis), size - 1 - after)]
    elif mode == "replicate":  # every head pixel copied pixel 0, every tail pixel the last one
        parts = [(xp.sum(head, axis=axis, keepdims=True), 0), (xp.sum(tail, axis=axis, keepdims=True), size - 1)]
        parts = [(part, start) for (part, start), count in zip(parts, (before, after)) if count]
    else:  # circular: head came from the far end, tail from the start
        parts = [(head, size - before), (tail, 0)]
    for part, start in parts:
        if part.shape[axis]:
            inner = inner + _placed(xp, part, axis, start, size)
    return inner


def fold(xp: Any, grad_padded: Any, pads: tuple[int, int, int, int], mode: str) -> Any:
    """The gradient with respect to `x` of :func:`pad`, given the gradient of the padded array."""
    top, bottom, left, right = pads
    return _fold_axis(xp, _fold_axis(xp, grad_padded, 3, left, right, mode), 2, top, bottom, mode)

"""Channels-last layouts: ``data_format="NHWC"`` (2-D) and ``"NWC"`` (1-D), read as PyTorch's names say.

The arithmetic works on channels-first arrays; a channels-last input is seen channels-first by
one ``permute_dims`` (a view on NumPy, torch and JAX's tracer; a copy only where the algorithm needs
contiguous data, which it makes anyway), and the result is permuted back. Weights keep their shape
(O, C // groups, kH, kW) in both layouts, as PyTorch's ``channels_last`` tensors do.
"""

from __future__ import annotations

from typing import Any

DATA_FORMATS = {2: ("NCHW", "NHWC"), 1: ("NCW", "NWC")}


def check_data_format(data_format: object, spatial: int = 2) -> str:
    """`data_format` itself when it names a layout of `spatial` dimensions; TypeError/ValueError otherwise."""
    choices = " or ".join(map(repr, DATA_FORMATS[spatial]))
    if not isinstance(data_format, str):
        raise TypeError(f"data_format must be a string, {choices}, got {data_format!r}")
    if data_format not in DATA_FORMATS[spatial]:
        raise ValueError(f"data_format must be {choices}, got {data_format!r}")
    return data_format


def channels_last(data_format: str) -> bool:
    return data_format in ("NHWC", "NWC")


def channels_first_shape(name: str, shape: tuple[int, ...], data_format: str) -> tuple[int, ...]:
    """`shape` of an array in `data_format` as the channels-first shape it stands for."""
    if len(shape) != len(data_format):
        raise ValueError(
            f"{name} must be {len(data_format)}-D ({', '.join(data_format)}) for data_format={data_format!r}, "
            f"got shape {tuple(int(s) for s in shape)} with {len(shape)} dimensions"
        )
    if not channels_last(data_format):
        return tuple(shape)
    return (shape[0], shape[-1], *shape[1:-1])


def to_channels_first(xp: Any, a: Any, data_format: str) -> Any:
    """`a` (N, ..., C) as (N, C, ...) when `data_format` is channels-last; else `a` itself."""
    if not channels_last(data_format):
        return a
    return xp.permute_dims(a, (0, a.ndim - 1, *range(1, a.ndim - 1)))


def to_data_format(xp: Any, a: Any, data_format: str) -> Any:
    """`a` (N, C, ...) as (N, ..., C) when `data_format` is channels-last; else `a` itself."""
    if not channels_last(data_format):
        return a
    return xp.permute_dims(a, (0, *range(2, a.ndim), 1))


def shape_in(shape: tuple[int, ...], data_format: str) -> tuple[int, ...]:
    """The channels-first `shape` as an array in `data_format` has it."""
    return tuple(shape) if not channels_last(data_format) else (shape[0], *shape[2:], shape[1])

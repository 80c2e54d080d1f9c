"""Shapes and arguments of one convolution: normalisation, checks and their messages. No arrays here."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

IntPair = int | Sequence[int]
Padding = int | Sequence[int] | str


@dataclass(frozen=True)
class Geometry:
    """Everything about a convolution except the batch size and the dtype (hashable: a cache key)."""

    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, bottom, left, right: "same" may be asymmetric
    dilation: tuple[int, int]
    groups: int
    out_h: int
    out_w: int

    @property
    def channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def filters_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def patch_size(self) -> int:
        """Rows of one group's patch matrix: channels of the group times kernel elements."""
        return self.channels_per_group * self.kernel_h * self.kernel_w

    @property
    def positions(self) -> int:
        return self.out_h * self.out_w

    @property
    def sample_size(self) -> int:
        return self.in_channels * self.height * self.width

    @property
    def padded(self) -> bool:
        return any(self.padding)


def _is_int(value: object) -> TypeGuard[int]:
    # NumPy integers are welcome; bool is an int subclass, but stride=True is a bug, not a stride of one.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def positive_ints(name: str, value: object, meaning: str) -> tuple[int, ...]:
    """A tuple of positive ints of the length `meaning` names, e.g. ``"(rows, cols)"``."""
    length = meaning.count(",") + 1
    if isinstance(value, str):
        raise TypeError(f"{name} must be {meaning} of positive ints, got the string {value!r}")
    if not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name} must be {meaning} of positive ints, got {value!r}")
    if not all(map(_is_int, value)):
        raise TypeError(f"{name} must be {meaning} of positive ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be {meaning} of positive ints (each at least 1), got {value!r}")
    return tuple(int(v) for v in value)


def int_pair(name: str, value: IntPair, *, minimum: int) -> tuple[int, int]:
    """`value` as (rows, cols): an int for both, or a pair; each at least `minimum`."""
    kind = "positive" if minimum == 1 else "non-negative"
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(map(_is_int, value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be a {kind} int or a pair of {kind} ints (rows, cols), got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be {kind} (at least {minimum}) in both directions, got {value!r}")
    return pair


def normalize_padding(
    padding: Padding, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from an int, a pair, ``"valid"`` or ``"same"`` (as PyTorch reads them)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"padding='same' needs stride=1, got stride={stride}; pass explicit padding for a strided convolution"
                )
            # The total is dilation*(kernel-1); when it is odd the extra row/column goes after, as in PyTorch.
            (top, left) = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)
            return (top, dilation[0] * (kernel[0] - 1) - top, left, dilation[1] * (kernel[1] - 1) - left)
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    rows, cols = int_pair("padding", padding, minimum=0)
    return (rows, rows, cols, cols)


def _shape_text(shape: tuple[int, ...]) -> str:
    return str(tuple(int(s) for s in shape))


def make_geometry(
    x_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Geometry:
    """Check every argument of a convolution and return its geometry; raise before any work is done."""
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {_shape_text(x_shape)} with {len(x_shape)} dimensions")
    if len(weight_shape) != 4:
        raise ValueError(
            f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), got shape {_shape_text(weight_shape)}"
        )
    groups = positive_int("groups", groups)
    _, channels, height, width = x_shape
    out_channels, channels_per_group, kernel_h, kernel_w = weight_shape
    if min(weight_shape) < 1:
        raise ValueError(f"weight must have no empty dimension, got shape {_shape_text(weight_shape)}")
    if channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide both the input channels (x has {channels}) "
            f"and the output channels (weight has {out_channels})"
        )
    if channels_per_group * groups != channels:
        raise ValueError(
            f"weight shape {_shape_text(weight_shape)} expects {channels_per_group * groups} input channels "
            f"(weight.shape[1]={channels_per_group} times groups={groups}), but x has {channels}"
        )
    if bias_shape is not None and tuple(bias_shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},) (one per output channel), got {_shape_text(bias_shape)}")
    stride = int_pair("stride", stride, minimum=1)
    dilation = int_pair("dilation", dilation, minimum=1)
    pads = normalize_padding(padding, (kernel_h, kernel_w), stride, dilation)
    reach_h = dilation[0] * (kernel_h - 1) + 1
    reach_w = dilation[1] * (kernel_w - 1) + 1
    padded_h = height + pads[0] + pads[1]
    padded_w = width + pads[2] + pads[3]
    if reach_h > padded_h or reach_w > padded_w:
        raise ValueError(
            f"the kernel spans {reach_h}x{reach_w} (kernel {kernel_h}x{kernel_w}, dilation {dilation}) but the padded "
            f"input is only {padded_h}x{padded_w} (x is {height}x{width}, padding {padding!r}); "
            "use a smaller kernel or dilation, or more padding"
        )
    return Geometry(
        in_channels=channels,
        height=height,
        width=width,
        out_channels=out_channels,
        kernel_h=kernel_h,
        kernel_w=kernel_w,
        stride=stride,
        padding=pads,
        dilation=dilation,
        groups=groups,
        out_h=(padded_h - reach_h) // stride[0] + 1,
        out_w=(padded_w - reach_w) // stride[1] + 1,
    )


def check_output_shape(name: str, shape: tuple[int, ...], batch: int, geom: Geometry) -> None:
    """An output gradient must have the forward output's shape."""
    expected = (batch, geom.out_channels, geom.out_h, geom.out_w)
    if tuple(shape) != expected:
        raise ValueError(f"{name} must have the forward output's shape {expected} (N, O, OH, OW), got {tuple(shape)}")

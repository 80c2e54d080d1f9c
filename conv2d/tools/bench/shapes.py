"""The convolutions to time: :class:`Shape`, the presets and the ``--shapes`` parsing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One convolution to time: batch, input, filters and their arguments, as PyTorch defines them.

    Square stride, padding and dilation (one int each) are enough for a benchmark and keep the
    command-line form short: ``N,C,H,W,O,KH,KW,stride,pad[,dilation,groups]``.
    """

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    groups: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        label = self.name or self.spec
        for key in ("n", "c", "h", "w", "o", "kh", "kw", "stride", "dilation", "groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"shape {label!r}: {key.upper()}={value!r} must be a positive integer")
        if not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"shape {label!r}: PAD={self.pad!r} must be a non-negative integer")
        for key in ("c", "o"):
            if getattr(self, key) % self.groups:
                raise ValueError(
                    f"shape {label!r}: {key.upper()}={getattr(self, key)} is not divisible by groups={self.groups}"
                )
        if self.out_h < 1 or self.out_w < 1:
            raise ValueError(
                f"shape {label!r}: the kernel {self.kh}x{self.kw} (dilation {self.dilation}) does not fit in "
                f"the padded input {self.h + 2 * self.pad}x{self.w + 2 * self.pad}"
            )

    @property
    def out_h(self) -> int:
        return (self.h + 2 * self.pad - self.dilation * (self.kh - 1) - 1) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.w + 2 * self.pad - self.dilation * (self.kw - 1) - 1) // self.stride + 1

    @property
    def spec(self) -> str:
        """The command-line form, ``N,C,H,W,O,KH,KW,stride,pad,dilation,groups``."""
        return ",".join(str(getattr(self, key)) for key in _SHAPE_FIELDS)

    @property
    def label(self) -> str:
        return self.name or self.spec

    @property
    def conv_kwargs(self) -> dict[str, int]:
        return {"stride": self.stride, "padding": self.pad, "dilation": self.dilation, "groups": self.groups}

    @property
    def gemm(self) -> tuple[int, int, int, int]:
        """(groups, O/groups, C/groups*KH*KW, N*OH*OW): the sizes of the forward's matrix product."""
        g = self.groups
        return g, self.o // g, self.c // g * self.kh * self.kw, self.n * self.out_h * self.out_w

    @property
    def forward_flops(self) -> int:
        g, m, k, p = self.gemm
        return 2 * g * m * k * p


_SHAPE_FIELDS = ("n", "c", "h", "w", "o", "kh", "kw", "stride", "pad", "dilation", "groups")
SHAPE_FORMAT = "N,C,H,W,O,KH,KW,stride,pad[,dilation,groups]"

# The seed's own layer: N=64 samples of 32x32x32, 64 filters 3x3, stride 1, no padding. A target of
# the project is measured on it in float64, so every preset that can afford it includes it.
SEED_SHAPE = Shape(64, 32, 32, 32, 64, 3, 3, 1, 0, name="seed 32->64 3x3")

# Sized so that the whole "cpu" preset runs in well under 3 minutes on a 2-core machine with the
# default --repeat; one shape per kind of layer the issue names. An odd number of shapes each, so
# that the median over a preset, which the targets are read from, is the value of one shape.
PRESETS: dict[str, tuple[Shape, ...]] = {
    "cpu": (
        Shape(32, 3, 64, 64, 32, 3, 3, 1, 1, name="first 3->32 3x3"),
        Shape(32, 64, 16, 16, 64, 3, 3, 1, 1, name="mid 64 3x3 16x16"),
        Shape(32, 128, 8, 8, 128, 3, 3, 1, 1, name="mid 128 3x3 8x8"),
        SEED_SHAPE,
        Shape(32, 16, 32, 32, 32, 5, 5, 1, 2, name="5x5 16->32"),
        Shape(32, 64, 32, 32, 128, 3, 3, 2, 1, name="down 64->128 s2"),
        Shape(32, 128, 16, 16, 128, 1, 1, 1, 0, name="pointwise 128 1x1"),
        Shape(32, 64, 32, 32, 64, 3, 3, 1, 1, 1, 64, name="depthwise 64 3x3"),
        Shape(32, 32, 32, 32, 32, 3, 3, 1, 2, 2, name="dilated 32 d2"),
    ),
    "gpu": (
        Shape(64, 3, 224, 224, 64, 7, 7, 2, 3, name="stem 3->64 7x7 s2"),
        Shape(128, 64, 56, 56, 64, 3, 3, 1, 1, name="mid 64 3x3 56x56"),
        Shape(128, 256, 14, 14, 256, 3, 3, 1, 1, name="mid 256 3x3 14x14"),
        SEED_SHAPE,
        Shape(128, 64, 28, 28, 128, 5, 5, 1, 2, name="5x5 64->128"),
        Shape(128, 128, 56, 56, 256, 3, 3, 2, 1, name="down 128->256 s2"),
        Shape(128, 256, 28, 28, 256, 1, 1, 1, 0, name="pointwise 256 1x1"),
        Shape(128, 256, 28, 28, 256, 3, 3, 1, 1, 1, 256, name="depthwise 256 3x3"),
        Shape(128, 128, 28, 28, 128, 3, 3, 1, 2, 2, name="dilated 128 d2"),
    ),
    "seed": (SEED_SHAPE,),
}


def parse_shape(text: str) -> Shape:
    """A shape from its command-line form ``N,C,H,W,O,KH,KW,stride,pad[,dilation,groups]``.

    Raises
    ------
    ValueError
        Naming the string and the field that is wrong.

    Examples
    --------
    >>> parse_shape("8,3,32,32,16,3,3,1,1").out_h
    32
    """
    parts = [part.strip() for part in text.split(",")]
    if not 9 <= len(parts) <= 11:
        raise ValueError(
            f"shape {text!r}: expected {SHAPE_FORMAT} (9 to 11 integers), got {len(parts)} fields"
        )
    values = []
    for key, part in zip(_SHAPE_FIELDS, parts, strict=False):  # fewer parts: dilation and groups default to 1
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"shape {text!r}: {key.upper()}={part!r} is not an integer") from None
    # values holds the 9 to 11 ints that precede name among Shape's fields (checked above); mypy cannot count them.
    return Shape(*values, name=text.replace(" ", ""))  # type: ignore[arg-type, misc]


def parse_shapes(text: str) -> list[Shape]:
    """A preset name (``cpu``, ``gpu``, ``seed``) or one custom shape; the ``--shapes`` argument type."""
    if text in PRESETS:
        return list(PRESETS[text])
    if "," not in text:
        raise ValueError(
            f"shapes {text!r}: not a preset ({', '.join(PRESETS)}) nor a custom shape {SHAPE_FORMAT}"
        )
    return [parse_shape(text)]

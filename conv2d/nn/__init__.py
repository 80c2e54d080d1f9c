"""Layers, a network and their files: :class:`Sequential`, pooling, flatten and dense layers, the loss, and
:func:`save` / :func:`load`. The layers themselves are in ``_layers.py`` (see its docstring for their protocol),
:class:`conv2d.ConvolutionLayer` in ``_convolution.py``, the files in ``_checkpoint.py``."""

from ._checkpoint import load, save
from ._layers import (
    AvgPoolLayer,
    DenseLayer,
    FlattenLayer,
    MaxPoolLayer,
    Sequential,
    softmax_cross_entropy,
)

__all__ = [
    "AvgPoolLayer", "DenseLayer", "FlattenLayer", "MaxPoolLayer", "Sequential", "load", "save", "softmax_cross_entropy",
]

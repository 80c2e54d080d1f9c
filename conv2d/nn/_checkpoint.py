"""Saving a network to files that are safe to open from anyone: JSON for its shape, ``.npz`` for its numbers.

Nothing here runs code from the files: the JSON names layer classes from a fixed list and their
constructor arguments (checked by the constructors), and the arrays are read with
``allow_pickle=False``. Pickle, which can run anything, is for processes you trust (Dask).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import Backend
from . import _layers
from ._convolution import ConvolutionLayer

FORMAT = "conv2d.nn"
VERSION = 1
ARCHITECTURE_FILE = "architecture.json"
STATE_FILE = "state.npz"


# The constructor arguments a file may give each layer class (what its architecture() writes):
# nothing else reaches a constructor, so a file cannot choose a backend, an algorithm or a seed.
ARGUMENTS = {
    "ConvolutionLayer": {"in_channels", "filter_size", "numfilters", "stride", "padding", "dilation", "activation", "dtype"},
    "MaxPoolLayer": {"in_channels", "pool_size", "stride"},
    "AvgPoolLayer": {"in_channels", "pool_size", "stride"},
    "FlattenLayer": set(),
    "DenseLayer": {"in_features", "out_features", "activation", "dtype"},
    "Sequential": {"layers"},
}


def _layer_classes() -> dict[str, Any]:
    return {cls.__name__: cls for cls in (ConvolutionLayer, _layers.MaxPoolLayer, _layers.AvgPoolLayer,
                                          _layers.FlattenLayer, _layers.DenseLayer, _layers.Sequential)}


def save(network: Any, path: str | os.PathLike[str]) -> Path:
    """Write `network` to the folder `path`: ``architecture.json`` and ``state.npz``.

    Parameters
    ----------
    network : Sequential or any conv2d layer
    path : str or path
        A folder, created if needed; the two files in it are replaced.

    Returns
    -------
    Path
        The folder, for :func:`load`.

    Examples
    --------
    >>> import tempfile, numpy as np, conv2d, conv2d.nn as nn
    >>> net = nn.Sequential([conv2d.ConvolutionLayer((1, 6, 6), (3, 3), 2, seed=0), nn.FlattenLayer()])
    >>> folder = nn.save(net, tempfile.mkdtemp())
    >>> X = np.random.default_rng(0).random((1, 1, 6, 6))
    >>> bool(np.array_equal(nn.load(folder).forwardpass(X), net.forwardpass(X)))
    True
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    document = {"format": FORMAT, "version": VERSION, "network": network.architecture()}
    (folder / ARCHITECTURE_FILE).write_text(json.dumps(document, indent=1) + "\n")
    np.savez(folder / STATE_FILE, **network.state_dict())
    return folder


def _build(spec: Any, backend: Backend | str | None, where: str) -> Any:
    """The layer that `spec` (one architecture entry) describes, on `backend`; ValueError naming `where`."""
    classes = _layer_classes()
    if not isinstance(spec, dict) or spec.get("type") not in classes:
        raise ValueError(f"{where}: expected a layer {{'type': one of {sorted(classes)}, ...}}, got {spec!r}")
    name = spec["type"]
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in spec.items() if key != "type"}
    unexpected = sorted(set(args) - ARGUMENTS[name])
    if unexpected:
        raise ValueError(f"{where}: cannot build {name} from {spec!r}: unexpected {unexpected}; "
                         f"it takes {sorted(ARGUMENTS[name])}")
    if name == "Sequential":
        layers = spec.get("layers")
        if not isinstance(layers, list):
            raise ValueError(f"{where}: a Sequential needs a 'layers' list, got {spec!r}")
        return classes[name]([_build(layer, backend, f"{where}.layers[{i}]") for i, layer in enumerate(layers)])
    if name != "FlattenLayer":
        args["backend"] = backend
    try:
        return classes[name](**args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot build {name} from {spec!r}: {exc}") from exc


def load(path: str | os.PathLike[str], backend: Backend | str | None = None) -> Any:
    """Rebuild the network that :func:`save` (or ``python -m conv2d demo --save PATH``) wrote to `path`.

    Safe for files from others: no pickle, no code, only the layer classes of conv2d.

    Parameters
    ----------
    path : str or path
        The folder holding ``architecture.json`` and ``state.npz``.
    backend : str or Backend, optional
        Where the network will live; default: the active backend. The backend it was trained on
        does not matter (a network trained on a GPU loads on the CPU).

    Returns
    -------
    Sequential or layer
        With the saved parameters, ready for ``forwardpass``.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        The JSON is not a conv2d network, or describes a layer the constructors reject.
    KeyError, TypeError
        The arrays do not fit the architecture (the message names the parameter).
    """
    folder = Path(path)
    for name in (ARCHITECTURE_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} does not exist; load() reads the folder that conv2d.nn.save wrote")
    document = json.loads((folder / ARCHITECTURE_FILE).read_text())
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != VERSION:
        raise ValueError(
            f"{folder / ARCHITECTURE_FILE} is not a {FORMAT} network of version {VERSION} "
            f"(its format is {document.get('format') if isinstance(document, dict) else None!r})"
        )
    network = _build(document.get("network"), backend, "network")
    with np.load(folder / STATE_FILE, allow_pickle=False) as arrays:
        network.load_state_dict({key: arrays[key] for key in arrays.files})
    return network

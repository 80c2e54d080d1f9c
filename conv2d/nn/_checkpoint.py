"""Saving a network to files that are safe to open from anyone: JSON for its shape, ``.npz`` for its numbers.

Nothing here runs code from the files: the JSON names layer classes from a fixed list and their
constructor arguments (checked here, then by the constructors), and the arrays are read by
:mod:`conv2d._npz` (no pickle). A file costs what it is: the architecture's size and nesting are
bounded, the parameters it claims are computed from its numbers and checked against ``max_bytes``
and against the state file's own headers before any layer is built or any array decompressed.
Pickle, which can run anything, is for processes you trust (Dask).

``save`` writes each file to a temporary name in the folder and renames it over the old one (a
rename replaces a symbolic link itself, never its target): the state first, then the architecture,
which records the state file's size and SHA-256, so that a save cut off between the two leaves a
pair that ``load`` refuses, naming both, rather than a network with another network's numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import reprlib
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from .._geometry import positive_int, positive_ints
from ..backends import Backend
from . import _layers, _npz
from ._convolution import ConvolutionLayer
from ._transposed import TransposedConvolutionLayer

FORMAT = "conv2d.nn"
VERSION = 1
ARCHITECTURE_FILE = "architecture.json"
STATE_FILE = "state.npz"
# An architecture.json is a few hundred bytes per layer: anything near this is not one.
MAX_ARCHITECTURE_BYTES = 1 << 20
# Sequentials inside Sequentials, at most: deeper is no network anyone wrote, and recursion has limits.
MAX_NESTING = 32
# What load() lets an architecture claim, in parameter bytes, unless told more.
DEFAULT_MAX_BYTES = 2 << 30

_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 3, 60, 60, 8, 12


# The constructor arguments a file may give each layer class (what its architecture() writes):
# nothing else reaches a constructor, so a file cannot choose a backend, an algorithm or a seed.
ARGUMENTS = {
    "ConvolutionLayer": {"in_channels", "filter_size", "numfilters", "stride", "padding", "dilation", "activation", "dtype",
                         "padding_mode", "data_format"},
    "TransposedConvolutionLayer": {"input_shape", "kernel_size", "out_channels", "stride", "padding", "output_padding",
                                   "dilation", "activation", "dtype"},
    "MaxPoolLayer": {"in_channels", "pool_size", "stride"},
    "AvgPoolLayer": {"in_channels", "pool_size", "stride"},
    "FlattenLayer": set(),
    "DenseLayer": {"in_features", "out_features", "activation", "dtype"},
    "Sequential": {"layers"},
}


# File keys that are not the constructor's names: ConvolutionLayer's first argument was renamed from
# in_channels to input_shape; files keep "in_channels" (every saved folder has it, and earlier
# versions of conv2d read new files), mapped here, so that loading warns of nothing.
RENAMED = {"ConvolutionLayer": {"in_channels": "input_shape"}}


def _layer_classes() -> dict[str, Any]:
    return {cls.__name__: cls for cls in (ConvolutionLayer, _layers.MaxPoolLayer, _layers.AvgPoolLayer,
                                          _layers.FlattenLayer, _layers.DenseLayer, _layers.Sequential,
                                          TransposedConvolutionLayer)}


def _write_new(folder: Path, prefix: str, write: Any) -> Path:
    """A new file in `folder` (a fresh random name, never an existing file or link) filled by `write(file)`, synced."""
    path = folder / f".{prefix}.{secrets.token_hex(8)}.tmp"
    # O_EXCL: a name that exists (a link planted there) is refused, not followed; the umask sets the mode.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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

    Notes
    -----
    Each file is written under a temporary name in the folder and then renamed over the old one,
    so a reader never sees half a file, and a symbolic link named ``architecture.json`` or
    ``state.npz`` is replaced itself, its target left alone. The state goes first, then the
    architecture, which records the state file's size and SHA-256: if the save is cut off between
    the two, :func:`load` refuses the mismatched pair and says so.

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
    architecture = network.architecture()  # before writing anything: a network that cannot describe itself fails here
    state = network.state_dict()
    written: list[Path] = []
    try:
        # Uncompressed (np.savez): every parameter byte is in the file, which load() relies on.
        state_tmp = _write_new(folder, STATE_FILE, lambda file: np.savez(file, **state))
        written.append(state_tmp)
        record = {"file": STATE_FILE, "bytes": state_tmp.stat().st_size, "sha256": _sha256(state_tmp)}
        document = {"format": FORMAT, "version": VERSION, "network": architecture, "state": record}
        text = (json.dumps(document, indent=1) + "\n").encode()
        architecture_tmp = _write_new(folder, ARCHITECTURE_FILE, lambda file: file.write(text))
        written.append(architecture_tmp)
        os.replace(state_tmp, folder / STATE_FILE)
        os.replace(architecture_tmp, folder / ARCHITECTURE_FILE)
    finally:
        for leftover in written:
            leftover.unlink(missing_ok=True)  # only what was not renamed into place
    if hasattr(os, "O_DIRECTORY"):  # the renames themselves survive a power cut (POSIX)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return folder


def _read_architecture(path: Path) -> dict[str, Any]:
    """The JSON document at `path`, bounded in size and nesting; ValueError naming the file."""
    size = path.stat().st_size
    if size > MAX_ARCHITECTURE_BYTES:
        raise ValueError(f"{path} has {size} bytes, more than any architecture (at most {MAX_ARCHITECTURE_BYTES}); "
                         "it was not read")
    with open(path, "rb") as file:
        data = file.read(MAX_ARCHITECTURE_BYTES + 1)
    if len(data) > MAX_ARCHITECTURE_BYTES:  # grown since stat
        raise ValueError(f"{path} has more than {MAX_ARCHITECTURE_BYTES} bytes; it is no architecture")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (some Windows editors add one) is accepted
        document = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from exc
    except RecursionError as exc:
        raise ValueError(f"{path} is nested too deeply to be an architecture") from exc
    except ValueError as exc:  # json.JSONDecodeError, or an integer of thousands of digits
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a {FORMAT} network of version {VERSION} "
            f"(its format is {_short.repr(document.get('format')) if isinstance(document, dict) else None})"
        )
    return document


def _check_value(value: Any, where: str) -> None:
    """Constructor arguments are numbers, strings, null or flat lists of them: nothing deeper reaches a layer."""
    if isinstance(value, list):
        if any(isinstance(item, (list, dict)) for item in value):
            raise ValueError(f"{where}: expected a number, a string or a list of them, got {_short.repr(value)}")
    elif isinstance(value, dict):
        raise ValueError(f"{where}: expected a number, a string or a list of them, got {_short.repr(value)}")


def _parameter_dtype(spec: dict[str, Any], where: str) -> np.dtype[Any]:
    dtype = spec.get("dtype", "float64")
    if dtype not in ("float16", "float32", "float64"):
        raise ValueError(f"{where}.dtype must be 'float16', 'float32' or 'float64', got {_short.repr(dtype)}")
    return np.dtype(dtype)


def _parameter_shapes(name: str, spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of a layer's parameters, from the architecture's numbers alone (no layer built)."""
    if name == "ConvolutionLayer":
        depth = positive_ints("in_channels", spec.get("in_channels"), "(depth, rows, cols)")[0]
        rows, cols = positive_ints("filter_size", spec.get("filter_size"), "(rows, cols)")
        filters = positive_int("numfilters", spec.get("numfilters"))
        return {"weights": (filters, depth, rows, cols), "biases": (filters,)}
    if name == "TransposedConvolutionLayer":
        depth = positive_ints("input_shape", spec.get("input_shape"), "(depth, rows, cols)")[0]
        rows, cols = positive_ints("kernel_size", spec.get("kernel_size"), "(rows, cols)")
        filters = positive_int("out_channels", spec.get("out_channels"))
        return {"weights": (depth, filters, rows, cols), "biases": (filters,)}
    if name == "DenseLayer":
        inputs = positive_int("in_features", spec.get("in_features"))
        outputs = positive_int("out_features", spec.get("out_features"))
        return {"weights": (outputs, inputs), "biases": (outputs,)}
    return {}


def _expected(spec: Any, where: str, prefix: str, depth: int,
              out: dict[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> None:
    """Check one architecture entry (recursively) and add its parameters, key -> (shape, dtype), to `out`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or spec["type"] not in ARGUMENTS:
        raise ValueError(f"{where}: expected a layer {{'type': one of {sorted(ARGUMENTS)}, ...}}, got {_short.repr(spec)}")
    name = spec["type"]
    unexpected = sorted(set(spec) - ARGUMENTS[name] - {"type"})
    if unexpected:
        raise ValueError(f"{where}: cannot build {name} from {_short.repr(spec)}: unexpected {unexpected[:10]}; "
                         f"it takes {sorted(ARGUMENTS[name])}")
    if name == "Sequential":
        layers = spec.get("layers")
        if not isinstance(layers, list):
            raise ValueError(f"{where}: a Sequential needs a 'layers' list, got {_short.repr(spec)}")
        if not layers:
            raise ValueError(f"{where}.layers: a Sequential needs at least one layer, got an empty list")
        if depth >= MAX_NESTING:
            raise ValueError(f"{where}: Sequentials nested more than {MAX_NESTING} deep; no saved network is")
        for index, layer in enumerate(layers):
            _expected(layer, f"{where}.layers[{index}]", f"{prefix}{index}.", depth + 1, out)
        return
    for key, value in spec.items():
        _check_value(value, f"{where}.{key}")
    try:
        shapes = _parameter_shapes(name, spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot build {name} from {_short.repr(spec)}: {exc}") from exc
    if shapes:
        dtype = _parameter_dtype(spec, where)
        out.update((prefix + key, (shape, dtype)) for key, shape in shapes.items())


def _build(spec: Any, backend: Backend | str | None, where: str) -> Any:
    """The layer that `spec` (one entry, already checked by :func:`_expected`) describes, on `backend`."""
    classes = _layer_classes()
    name = spec["type"]
    if name == "Sequential":
        return classes[name]([_build(layer, backend, f"{where}.layers[{i}]") for i, layer in enumerate(spec["layers"])])
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in spec.items() if key != "type"}
    for key, argument in RENAMED.get(name, {}).items():
        if key in args:
            args[argument] = args.pop(key)
    if name != "FlattenLayer":
        args["backend"] = backend
    try:
        return classes[name](**args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot build {name} from {_short.repr(spec)}: {exc}") from exc


def _check_pair(document: dict[str, Any], architecture: Path, state: Path) -> None:
    """ValueError where `state` is not the file that was saved with `architecture` (a save cut off between them).

    Folders saved before the record existed have none and are not checked.
    """
    record = document.get("state")
    if record is None:
        return
    if (not isinstance(record, dict) or not isinstance(record.get("bytes"), int)
            or not isinstance(record.get("sha256"), str)):
        raise ValueError(f"{architecture}: 'state' must be {{'file', 'bytes', 'sha256'}} as save() writes it, "
                         f"got {_short.repr(record)}")
    size = state.stat().st_size
    if size != record["bytes"] or _sha256(state) != record["sha256"]:
        raise ValueError(
            f"{state} is not the state saved with {architecture} (it has {size} bytes, SHA-256 differs or size "
            f"{record['bytes']} expected): the two files are not a pair, as when a save was cut off between them; "
            "save the network again"
        )


def load(path: str | os.PathLike[str], backend: Backend | str | None = None, *,
         max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Rebuild the network that :func:`save` (or ``python -m conv2d demo --save PATH``) wrote to `path`.

    Safe for files from others: no pickle, no code, only the layer classes of conv2d, and no cost
    beyond what the files hold: the architecture is read only up to 1 MiB and 32 nested
    Sequentials; the parameters it implies are computed from its numbers and, before any layer is
    built or any array read, checked against `max_bytes` and against the names, shapes and dtypes
    in the state file's ``.npy`` headers; a member the architecture does not name is refused
    unread, and each array is read with exactly the bytes its shape needs.

    Parameters
    ----------
    path : str or path
        The folder holding ``architecture.json`` and ``state.npz``.
    backend : str or Backend, optional
        Where the network will live; default: the active backend. The backend it was trained on
        does not matter (a network trained on a GPU loads on the CPU). Parameters load bit for bit, but outputs
        are bit-identical only on the same backend (float32, torch to NumPy: up to 2.7e-5; compare with np.allclose).
    max_bytes : int, default 2 GiB
        The most parameter bytes the architecture may claim. Loading costs a few times this in
        memory at its peak (the arrays read, and the layers' own initial weights, drawn in float64).
        Raise it for a larger network you trust.

    Returns
    -------
    Sequential or layer
        With the saved parameters, ready for ``forwardpass``.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        The JSON is not a conv2d network (or too large, too deep, not UTF-8), describes a layer the
        constructors reject, claims more than `max_bytes`, or the state file is not its pair, not a
        zip, or holds an array of another shape or a malformed one. Each message names the file,
        and for a layer its place, such as ``network.layers[2].layers[0]``.
    KeyError, TypeError
        The state file lacks an array the architecture needs or has one it does not (KeyError), or
        an array has another dtype (TypeError); the message names the parameter.
    """
    max_bytes = positive_int("max_bytes", max_bytes)
    folder = Path(path)
    architecture, state = folder / ARCHITECTURE_FILE, folder / STATE_FILE
    for file in (architecture, state):
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; load() reads the folder that conv2d.nn.save wrote")
    document = _read_architecture(architecture)
    expected: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    _expected(document.get("network"), f"{architecture}: network", "", 0, expected)
    claimed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected.values())
    if claimed > max_bytes:
        raise ValueError(f"{architecture} describes {claimed} bytes of parameters, more than max_bytes={max_bytes}; "
                         f"if you trust it, call load(..., max_bytes={claimed})")
    _check_pair(document, architecture, state)
    arrays = _npz.read_expected(state, expected)
    network = _build(document["network"], backend, f"{architecture}: network")
    network.load_state_dict(arrays)
    return network

"""Reading a ``.npz`` of known arrays from an untrusted file, with every size checked before it is allocated.

``np.load`` reads whatever members a zip holds, each as large as its header claims and as long as
it decompresses: a 2 MB file can hold gigabytes of compressed zeros. Here the caller says which
arrays it expects (name, shape, dtype); any other member is refused unread, each member's ``.npy``
header is checked before its data is touched, and exactly the expected number of bytes is read
(a member holding more is refused). Used by :func:`conv2d.nn.load`.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

_CHUNK = 1 << 24  # bytes read at a time: the data goes straight into the array, no second copy
_HEADER_LIMIT = 10000  # numpy's own bound on a .npy header (np.load's max_header_size)


def _member_names(archive: zipfile.ZipFile, path: Path, expected: Mapping[str, Any]) -> dict[str, zipfile.ZipInfo]:
    """key -> member of `archive`; KeyError for a missing, unknown or repeated one (nothing read)."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        key = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
        if key in members:
            raise KeyError(f"{path} holds the array {key!r} twice; it cannot be told which to use")
        members[key] = info
    unknown = sorted(set(members) - set(expected))
    if unknown:
        raise KeyError(f"{path} has unknown key(s) {unknown[:10]} (left unread); the architecture's parameters are "
                       f"{sorted(expected)[:10]}")
    missing = sorted(set(expected) - set(members))
    if missing:
        raise KeyError(f"{path} has no {missing[:10]}; the architecture needs {sorted(expected)[:10]}")
    return members


def _header(stream: IO[bytes], path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran_order, dtype) from the ``.npy`` header at the start of `stream`; ValueError if malformed."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream, max_header_size=_HEADER_LIMIT)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(stream, max_header_size=_HEADER_LIMIT)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: the array {key!r} has no readable .npy header: {exc}") from exc
    raise ValueError(f"{path}: the array {key!r} is in .npy format version {version}; conv2d reads 1.0 and 2.0")


def _check_header(path: Path, key: str, header: tuple[tuple[int, ...], bool, np.dtype[Any]],
                  shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    """ValueError (shape) or TypeError (dtype) where the header is not the array the architecture implies."""
    found_shape, _, found_dtype = header
    if tuple(found_shape) != tuple(shape):
        raise ValueError(f"{path}: state[{key!r}] has shape {tuple(found_shape)}, the layer needs {tuple(shape)}")
    # Either byte order is the same numbers (np.save writes the machine's own).
    if found_dtype.newbyteorder("<") != dtype.newbyteorder("<"):
        raise TypeError(f"{path}: state[{key!r}] has dtype {found_dtype}, the layer needs {dtype}")


def _read_data(stream: IO[bytes], path: Path, key: str, header: tuple[tuple[int, ...], bool, np.dtype[Any]],
               dtype: np.dtype[Any]) -> np.ndarray:
    """Exactly the array's bytes from `stream` (after its header), in the machine's byte order and C order."""
    shape, fortran_order, found_dtype = header
    array = np.empty(math.prod(shape), dtype=found_dtype)
    view = memoryview(array.view(np.uint8).data)
    done = 0
    try:
        while done < array.nbytes:
            chunk = stream.read(min(_CHUNK, array.nbytes - done))
            if not chunk:
                raise ValueError(f"{path}: the array {key!r} ends after {done} of its {array.nbytes} bytes")
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        # Reading to the member's end also checks its CRC.
        if stream.read(1):
            raise ValueError(f"{path}: the array {key!r} holds more data than its header's shape {tuple(shape)}")
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: the array {key!r} cannot be read: {exc}") from exc
    array = array.reshape(shape, order="F" if fortran_order else "C")
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def read_expected(path: Path, expected: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at `path`, which must be exactly `expected` (key -> (shape, dtype)).

    Every member's name and header are checked before any array is allocated; then each is read
    with exactly the bytes its shape needs.

    Raises
    ------
    KeyError
        A member missing, unknown (not read) or repeated.
    ValueError
        Not a zip, a malformed or unsupported header, a shape other than expected, a stored member
        smaller than its array, a compression other than none or deflate, truncated or longer data,
        or a failed CRC.
    TypeError
        A dtype other than expected.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a .npz (zip) file that conv2d.nn.save wrote: {exc}") from exc
    with archive:
        members = _member_names(archive, path, expected)
        file_size = path.stat().st_size
        headers = {}
        for key, info in members.items():
            shape, dtype = expected[key]
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"{path}: the array {key!r} is compressed with method {info.compress_type}; "
                                 "conv2d reads stored (np.savez) and deflated (np.savez_compressed) members")
            try:
                with archive.open(info) as stream:
                    headers[key] = _header(stream, path, key)
                    data_start = stream.tell()
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # RuntimeError: encrypted
                raise ValueError(f"{path}: the array {key!r} cannot be read: {exc}") from exc
            _check_header(path, key, headers[key], shape, dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            # A stored member's bytes are in the file: its array must be, before memory is given to it.
            stored = info.compress_size - data_start
            if info.compress_type == zipfile.ZIP_STORED and not nbytes <= stored <= file_size:
                raise ValueError(f"{path}: the array {key!r} of {nbytes} bytes is stored in {stored} bytes "
                                 f"of a {file_size}-byte file: the file is truncated or not a saved network")
        arrays = {}
        for key, info in members.items():
            with archive.open(info) as stream:
                header = _header(stream, path, key)
                _check_header(path, key, header, *expected[key])  # the same member, read again
                arrays[key] = _read_data(stream, path, key, header, expected[key][1])
    return arrays

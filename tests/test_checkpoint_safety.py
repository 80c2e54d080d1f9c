"""conv2d.nn.load on files from others: small hostile files are refused quickly, before anything large is
built, allocated or decompressed, with a message naming the file and the place; conv2d.nn.save replaces
its files atomically, never through a symbolic link, and a save cut off between its two files is refused.

Oracle: the error messages and the bounds (peak RSS of a load in its own process), and the saved network's
own outputs for what must still load.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import conv2d
from conv2d import nn
from conv2d.nn import _checkpoint, _npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _network(activation="tanh", seed=0) -> nn.Sequential:
    return nn.Sequential([
        conv2d.ConvolutionLayer((1, 6, 6), (3, 3), 2, activation=activation, seed=seed, dtype="float32"),
        nn.Sequential([nn.MaxPoolLayer((2, 4, 4), 2), nn.FlattenLayer()]),
        nn.DenseLayer(8, 3, activation=activation, seed=seed + 1),
    ])


def _same(a, b) -> bool:
    X = np.random.default_rng(0).random((2, 1, 6, 6))
    return a.architecture() == b.architecture() and np.array_equal(a.forwardpass(X), b.forwardpass(X))


def _architecture(layers) -> dict:
    return {"format": "conv2d.nn", "version": 1, "network": {"type": "Sequential", "layers": layers}}


def _npy(array: np.ndarray, header_shape=None) -> bytes:
    """A .npy member: `array`'s bytes after a header that may claim another shape."""
    out = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    if header_shape is not None:
        header["shape"] = header_shape
    np.lib.format.write_array_header_1_0(out, header)
    out.write(np.ascontiguousarray(array).tobytes())
    return out.getvalue()


def _write_npz(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.fixture
def saved(tmp_path):
    net = _network()
    return net, nn.save(net, tmp_path / "model")


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if load() gets as far as building a layer or reading an array's data."""
    def refuse(*args, **kwargs):
        raise AssertionError("load() built a layer or read array data before refusing the files")

    monkeypatch.setattr(_checkpoint, "_build", refuse)
    monkeypatch.setattr(_npz, "_read_data", refuse)


# --------------------------------------------------------------------------------------------
# Hostile files: refused before anything is built or decompressed
# --------------------------------------------------------------------------------------------


def test_a_claimed_layer_larger_than_the_state_is_refused_unbuilt(saved, nothing_built):
    """A few hundred bytes of JSON claiming a 4096->4096 3x3 layer (600 MB): refused from the headers (it built it: 15 s, 1.8 GB)."""
    _, folder = saved
    document = json.loads((folder / "architecture.json").read_text())
    document["network"]["layers"][0].update(in_channels=[4096, 3, 3], numfilters=4096)
    (folder / "architecture.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"state.npz: state\['0.weights'\] has shape \(2, 1, 3, 3\), "
                                         r"the layer needs \(4096, 4096, 3, 3\)"):
        nn.load(folder)


def test_a_claim_over_max_bytes_is_refused_with_how_to_raise_it(saved, nothing_built):
    _, folder = saved
    document = json.loads((folder / "architecture.json").read_text())
    document["network"]["layers"][0].update(in_channels=[8192, 3, 3], numfilters=8192, dtype="float64")
    (folder / "architecture.json").write_text(json.dumps(document))
    claimed = (8192 * 8192 * 9 + 8192) * 8 + (3 * 8 + 3) * 8
    with pytest.raises(ValueError, match=rf"architecture.json describes {claimed} bytes of parameters, more than "
                                         rf"max_bytes=2147483648; if you trust it, call load\(\.\.\., max_bytes={claimed}\)"):
        nn.load(folder)


def test_max_bytes_is_the_bound(saved):
    net, folder = saved
    claimed = sum(array.nbytes for array in net.state_dict().values())
    with pytest.raises(ValueError, match=f"more than max_bytes={claimed - 1}"):
        nn.load(folder, max_bytes=claimed - 1)
    assert _same(nn.load(folder, max_bytes=claimed), net)
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        nn.load(folder, max_bytes=0)


def test_an_unknown_compressed_member_is_refused_unread(saved, nothing_built):
    """An extra deflated member (a zip bomb) is named and never decompressed (it was read whole: 300 MB)."""
    _, folder = saved
    with zipfile.ZipFile(folder / "state.npz", "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("extra.npy", _npy(np.zeros(1 << 16)))
    _checkpoint_record_off(folder)
    with pytest.raises(KeyError, match=r"state.npz has unknown key\(s\) \['extra'\] \(left unread\)"):
        nn.load(folder)


def _checkpoint_record_off(folder) -> None:
    """Drop the state record from architecture.json (a folder saved before it existed), to edit state.npz."""
    document = json.loads((folder / "architecture.json").read_text())
    document.pop("state", None)
    (folder / "architecture.json").write_text(json.dumps(document))


# The child's own high-water mark: /proc's VmHWM belongs to the process's memory since exec, whereas
# getrusage's ru_maxrss keeps the forking parent's peak (the test process, torch and JAX loaded: 0.7 GB).
_CHILD = """
import sys
import conv2d.nn as nn
try:
    nn.load(sys.argv[1], backend="numpy")
    print("loaded")
except Exception as exc:
    print(type(exc).__name__, exc)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def test_hostile_files_cost_no_memory(tmp_path):
    """Each hostile folder, loaded in its own process, is refused with its peak RSS under 150 MiB
    (it was 0.5 GB and 0.3 GB here: the claimed 150 MB layer built and initialised, the 256 MB member read)."""
    net = nn.Sequential([conv2d.ConvolutionLayer((1, 6, 6), (3, 3), 2, seed=0, dtype="float32"), nn.FlattenLayer()])
    claim, bomb = nn.save(net, tmp_path / "claim"), nn.save(net, tmp_path / "bomb")
    layer = {"type": "ConvolutionLayer", "in_channels": [1024, 3, 3], "filter_size": [3, 3], "numfilters": 4096,
             "dtype": "float32"}  # 150 MB of weights
    (claim / "architecture.json").write_text(json.dumps(_architecture([layer, {"type": "FlattenLayer"}])))
    _checkpoint_record_off(bomb)
    size = 256 << 20
    with zipfile.ZipFile(bomb / "state.npz", "a", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("extra.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (size // 8,)})
        for _ in range(size >> 20):
            member.write(bytes(1 << 20))
    assert (bomb / "state.npz").stat().st_size < 2 << 20
    env = {**os.environ, "PYTHONPATH": REPO}
    peaks = {}
    for folder, message in ((claim, "ValueError"), (bomb, "KeyError")):
        result = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], capture_output=True, text=True,
                                timeout=120, env=env, check=True)
        outcome, peak_kib = result.stdout.strip().splitlines()
        assert outcome.startswith(message), outcome
        peaks[folder.name] = int(peak_kib) // 1024
    assert max(peaks.values()) < 150, f"peak RSS in MiB: {peaks}"


def test_members_that_are_not_what_their_headers_say(saved):
    """Longer, shorter, of another dtype, repeated or not a zip: each refused, naming the array and the file."""
    net, folder = saved
    _checkpoint_record_off(folder)
    state = net.state_dict()

    def write(compression=zipfile.ZIP_STORED, **members):
        _write_npz(folder / "state.npz", {f"{k}.npy": _npy(v) for k, v in state.items()} | members, compression)

    longer = _npy(np.arange(3.0), header_shape=(2,))  # 2.biases is (3,): a (2,) header over 3 values
    write(**{"2.biases.npy": _npy(np.arange(4.0), header_shape=(3,))}, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match=r"state.npz: the array '2.biases' holds more data than its header's shape \(3,\)"):
        nn.load(folder)
    write(**{"2.biases.npy": _npy(np.arange(2.0), header_shape=(3,))}, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match=r"the array '2.biases' ends after 16 of its 24 bytes"):
        nn.load(folder)
    write(**{"2.biases.npy": _npy(np.arange(2.0), header_shape=(3,))})
    with pytest.raises(ValueError, match=r"the array '2.biases' of 24 bytes is stored in \d+ bytes"):
        nn.load(folder)
    write(**{"2.biases.npy": longer})
    with pytest.raises(ValueError, match=r"state\['2.biases'\] has shape \(2,\), the layer needs \(3,\)"):
        nn.load(folder)
    write(**{"0.biases.npy": _npy(np.zeros(2))})
    with pytest.raises(TypeError, match=r"state\['0.biases'\] has dtype float64, the layer needs float32"):
        nn.load(folder)
    write(**{"0.biases.npy": b"\x93NUMPY\x01\x00" + b"\xff" * 20})
    with pytest.raises(ValueError, match=r"the array '0.biases' has no readable .npy header"):
        nn.load(folder)
    with zipfile.ZipFile(folder / "state.npz", "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("2.weights.npy", _npy(state["2.weights"]))
    with pytest.raises(KeyError, match=r"holds the array '2.weights' twice"):
        nn.load(folder)
    _write_npz(folder / "state.npz", {f"{k}.npy": _npy(v) for k, v in state.items() if k != "0.weights"})
    with pytest.raises(KeyError, match=r"state.npz has no \['0.weights'\]"):
        nn.load(folder)
    (folder / "state.npz").write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match=r"state.npz is not a .npz \(zip\) file"):
        nn.load(folder)
    # What np.savez_compressed writes, and big-endian arrays, are still read.
    np.savez_compressed(folder / "state.npz", **{k: v.astype(v.dtype.newbyteorder(">")) for k, v in state.items()})
    assert _same(nn.load(folder), net)


# --------------------------------------------------------------------------------------------
# The architecture: bounded, and every error names the file and the place
# --------------------------------------------------------------------------------------------


def _write_architecture(folder, text: str | bytes) -> None:
    (folder / "architecture.json").write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("text, message", [
    ("", r"architecture.json is not valid JSON: Expecting value: line 1 column 1"),
    ('{"format": "conv2d.nn", ', r"architecture.json is not valid JSON"),
    (b"\xff\xfe{}", r"architecture.json is not UTF-8 text"),
    ("[" * 5000 + "]" * 5000, r"architecture.json is nested too deeply to be an architecture"),
    (" " * (1 << 20) + "{}", r"architecture.json has 1048578 bytes, more than any architecture \(at most 1048576\); it was not read"),
    ('{"format": "conv2d.nn", "version": 1, "network": {"type": ["Sequential"]}}',
     r"architecture.json: network: expected a layer"),
    (json.dumps(_architecture([{"type": "FlattenLayer"}, {"type": "Sequential", "layers": [
        {"type": "Sequential", "layers": []}]}])),
     r"architecture.json: network.layers\[1\].layers\[0\].layers: a Sequential needs at least one layer"),
    (json.dumps(_architecture([{"type": "DenseLayer", "in_features": 4, "out_features": [[3]]}])),
     r"network.layers\[0\].out_features: expected a number, a string or a list of them"),
    (json.dumps(_architecture([{"type": "DenseLayer", "in_features": 4, "out_features": 0}])),
     r"network.layers\[0\]: cannot build DenseLayer .*out_features must be a positive int"),
    (json.dumps(_architecture([{"type": "DenseLayer", "in_features": 4, "out_features": 3, "dtype": "int8"}])),
     r"network.layers\[0\].dtype must be 'float16', 'float32' or 'float64', got 'int8'"),
])
def test_architecture_errors_name_the_file_and_the_place(saved, nothing_built, text, message):
    _, folder = saved
    _write_architecture(folder, text)
    with pytest.raises(ValueError, match=message):
        nn.load(folder)


def test_sequentials_nested_too_deep(saved, nothing_built):
    _, folder = saved
    network = {"type": "FlattenLayer"}
    for _ in range(40):
        network = {"type": "Sequential", "layers": [network]}
    _write_architecture(folder, json.dumps({"format": "conv2d.nn", "version": 1, "network": network}))
    with pytest.raises(ValueError, match=r"network(\.layers\[0\]){32}: Sequentials nested more than 32 deep"):
        nn.load(folder)


def test_a_byte_order_mark_is_accepted(saved):
    net, folder = saved
    _write_architecture(folder, b"\xef\xbb\xbf" + (folder / "architecture.json").read_bytes())
    assert _same(nn.load(folder), net)


def test_a_folder_saved_before_the_state_record_still_loads(saved):
    net, folder = saved
    _checkpoint_record_off(folder)
    assert _same(nn.load(folder), net)


# --------------------------------------------------------------------------------------------
# save: atomic, no links followed, a cut-off save never loads as a mismatched network
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["architecture.json", "state.npz"])
def test_save_replaces_a_symbolic_link_not_its_target(tmp_path, name):
    folder, outside = tmp_path / "model", tmp_path / "outside.txt"
    folder.mkdir()
    outside.write_text("precious")
    (folder / name).symlink_to(outside)
    net = _network()
    nn.save(net, folder)
    assert outside.read_text() == "precious"
    assert not (folder / name).is_symlink()
    assert sorted(os.listdir(folder)) == ["architecture.json", "state.npz"]  # no temporary file left
    assert _same(nn.load(folder), net)


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_save_cut_off_never_loads_as_a_mismatched_network(saved, monkeypatch, failing_call):
    """The second network has the first's parameter shapes but another activation and weights: a save that
    fails at the state's rename leaves the old pair; one that fails at the architecture's is refused on load."""
    old, folder = saved
    new = _network(activation="relu", seed=5)
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        nn.save(new, folder)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["architecture.json", "state.npz"]  # no temporary file left
    if failing_call == 1:
        assert _same(nn.load(folder), old)
    else:
        with pytest.raises(ValueError, match=r"state.npz is not the state saved with .*architecture.json .*not a pair"):
            nn.load(folder)
    nn.save(new, folder)
    assert _same(nn.load(folder), new)

"""`python -m conv2d bench`: the command runs end to end, its arguments, and a faithful seed baseline.

No timing is asserted: the numbers depend on the machine. The shapes are tiny so that the whole
file runs in seconds.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import conv2d
from conv2d import bench
from conv2d.__main__ import main

TINY = "2,3,8,8,4,3,3,1,1"
TINY_GROUPED = "2,4,9,9,6,3,3,2,1,2,2"  # stride 2, dilation 2, groups 2: the seed cannot run it
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _strict_json(path) -> dict:
    def reject(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=reject)


def test_cli_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--shapes", TINY, TINY_GROUPED, "--repeat", "1", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "ours/torch" in printed and "seed/ours" in printed and "fwd/floor" in printed
    assert TINY in printed and TINY_GROUPED in printed
    assert "seed: the seed has no groups and no dilation" in printed

    report = _strict_json(path)
    assert {"command", "settings", "machine", "results", "summary", "total_seconds", "load_average_1min"} <= set(report)
    assert report["settings"]["backend"] == "numpy"
    assert report["settings"]["dtype"] == "float32"
    machine = report["machine"]
    assert {"cpu_model", "processor", "cpu_count", "threadpools", "versions"} <= set(machine)
    assert machine["versions"]["conv2d"] == conv2d.__version__
    assert "numpy" in machine["versions"]

    plain, grouped = report["results"]
    assert plain["shape"]["spec"] == "2,3,8,8,4,3,3,1,1,1,1"
    assert (plain["shape"]["out_h"], plain["shape"]["out_w"]) == (8, 8)
    expected = {"ours_fwd", "ours_bwd", "ours_fwdbwd", "floor_fwd", "floor_grad_w", "floor_grad_cols",
                "floor_fwdbwd", "seed_fwd", "seed_fwdbwd"}
    if HAS_TORCH:
        expected |= {"torch_fwd", "torch_fwdbwd"}
    assert expected <= set(plain["ms"])
    assert all(value > 0 for value in plain["ms"].values())
    assert len(plain["samples_ms"]["ours_fwd"]) == 1
    assert all(plain["ms"][name] == value for name, value in plain["median_ms"].items())  # the default --stat
    assert plain["min_ms"]["ours_fwd"] == min(plain["samples_ms"]["ours_fwd"])
    ratios = plain["ratios"]
    assert ratios["seed_over_ours"] == pytest.approx(plain["ms"]["seed_fwdbwd"] / plain["ms"]["ours_fwdbwd"])
    assert ratios["fwd_over_floor"] == pytest.approx(plain["ms"]["ours_fwd"] / plain["ms"]["floor_fwd"])
    if HAS_TORCH:
        assert ratios["ours_over_torch"] == pytest.approx(plain["ms"]["ours_fwdbwd"] / plain["ms"]["torch_fwdbwd"])
    # NumPy's allocations are visible: one forward+backward holds at least its output and gradients.
    assert plain["peak_bytes"]["default"] >= plain["outputs_bytes"] > 0

    assert "seed_fwd" not in grouped["ms"] and grouped["ratios"]["seed_over_ours"] is None
    assert "seed" in grouped["skipped"]
    assert report["summary"]["fwd_over_floor"]["worst_shape"] in (TINY, TINY_GROUPED)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="--plot needs matplotlib")
def test_cli_plot_writes_png(tmp_path):
    path = tmp_path / "bench.png"
    assert main(["bench", "--shapes", TINY, "--repeat", "1", "--stat", "min", "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_parse_shape_good():
    shape = bench.parse_shape(" 8, 3,32,32,16,3,3,2,1")
    assert (shape.n, shape.c, shape.h, shape.w, shape.o, shape.kh, shape.kw) == (8, 3, 32, 32, 16, 3, 3)
    assert (shape.stride, shape.pad, shape.dilation, shape.groups) == (2, 1, 1, 1)
    assert (shape.out_h, shape.out_w) == (16, 16)
    full = bench.parse_shape("4,8,10,12,8,3,5,1,2,2,8")
    assert (full.dilation, full.groups, full.out_h, full.out_w) == (2, 8, 10, 8)
    assert bench.parse_shape(full.spec) == bench.Shape(4, 8, 10, 12, 8, 3, 5, 1, 2, 2, 8, name=full.spec)
    assert bench.parse_shapes("seed") == [bench.SEED_SHAPE]
    assert bench.parse_shapes(TINY) == [bench.parse_shape(TINY)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,2,3", "got 3 fields"),
        ("1,2,3,4,5,6,7,8,9,10,11,12", "got 12 fields"),
        ("8,3,32,x,16,3,3,1,1", "W='x' is not an integer"),
        ("8,3,32,32,16,3,3,1.5,1", "STRIDE='1.5' is not an integer"),
        ("8,3,32,32,16,3,3,0,1", "STRIDE=0 must be a positive integer"),
        ("0,3,32,32,16,3,3,1,1", "N=0 must be a positive integer"),
        ("8,3,32,32,16,3,3,1,-1", "PAD=-1 must be a non-negative integer"),
        ("8,3,32,32,16,3,3,1,1,1,2", "C=3 is not divisible by groups=2"),
        ("8,4,32,32,6,3,3,1,1,1,4", "O=6 is not divisible by groups=4"),
        ("2,3,4,4,4,7,7,1,0", "does not fit in the padded input 4x4"),
    ],
)
def test_parse_shape_bad_names_the_value(text, message):
    with pytest.raises(ValueError, match="shape") as info:
        bench.parse_shape(text)
    assert repr(text) in str(info.value)
    assert message in str(info.value)


def test_parse_shapes_unknown_preset():
    with pytest.raises(ValueError, match=r"'tpu'.*not a preset.*cpu, gpu, seed"):
        bench.parse_shapes("tpu")


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--shapes", "8,3,32"])
    assert info.value.code == 2
    assert "'8,3,32'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--repeat", "0"])
    assert "'0'" in capsys.readouterr().err
    assert main(["bench", "--backend", "nonsense", "--shapes", TINY]) == 2
    assert "'nonsense'" in capsys.readouterr().err
    assert main(["bench", "--algorithm", "nonsense", "--shapes", TINY]) == 2
    assert "'nonsense'" in capsys.readouterr().err


def test_presets_cover_the_layers_the_issue_names():
    cpu = bench.PRESETS["cpu"]
    assert bench.SEED_SHAPE in cpu and bench.SEED_SHAPE in bench.PRESETS["gpu"]
    seed = bench.SEED_SHAPE
    assert (seed.n, seed.c, seed.h, seed.w, seed.o, seed.kh, seed.kw, seed.stride, seed.pad) == (
        64, 32, 32, 32, 64, 3, 3, 1, 0
    )
    assert any(s.c == 3 for s in cpu)  # a first layer
    assert any(s.kh == s.kw == 3 and s.pad == 1 and s.stride == 1 and s.groups == 1 for s in cpu)
    assert any(s.kh == s.kw == 5 for s in cpu)
    assert any(s.stride == 2 for s in cpu)
    assert any(s.kh == s.kw == 1 for s in cpu)
    assert any(s.groups == s.c > 1 for s in cpu)  # depthwise
    assert any(s.dilation > 1 for s in cpu)
    assert len(cpu) % 2 == 1  # the median over shapes is one shape's value


@pytest.mark.parametrize(
    "spec", ["3,4,9,9,5,3,3,1,0", "2,3,11,10,4,3,2,2,0", "2,3,8,8,4,3,3,1,1", "2,2,9,7,3,4,3,3,2", "1,1,5,5,1,5,5,1,0"]
)
def test_seed_reimplementation_matches_conv2d(spec):
    shape = bench.parse_shape(spec)
    assert bench.seed_skip_reason(shape) is None
    rng = np.random.default_rng(7)
    x = rng.standard_normal((shape.n, shape.c, shape.h, shape.w))
    weight = rng.standard_normal((shape.o, shape.c, shape.kh, shape.kw))
    bias = rng.standard_normal(shape.o)
    grad_out = rng.standard_normal((shape.n, shape.o, shape.out_h, shape.out_w))
    indices = bench.seed_indices(shape.c, shape.kh, shape.kw, shape.out_h, shape.out_w, shape.stride)

    y, patches = bench.seed_forward(x, weight, bias, shape.stride, shape.pad, indices)
    expected = conv2d.conv2d(x, weight, bias, stride=shape.stride, padding=shape.pad)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    seed_grads = bench.seed_backward(grad_out, x.shape, weight, patches, shape.pad, indices)
    ours = conv2d.conv2d_backward(grad_out, x, weight, stride=shape.stride, padding=shape.pad)
    for name, got, expected in zip(("grad_x", "grad_weight", "grad_bias"), seed_grads, ours, strict=True):
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-11, err_msg=name)


def test_seed_skips_what_it_cannot_express():
    assert "groups" in bench.seed_skip_reason(bench.parse_shape("2,4,8,8,4,3,3,1,1,1,4"))
    assert "dilation" in bench.seed_skip_reason(bench.parse_shape("2,4,8,8,4,3,3,1,2,2,1"))
    assert "MB" in bench.seed_skip_reason(bench.parse_shape("256,256,64,64,256,3,3,1,1"))


def test_time_calls_takes_turns_after_warmup():
    order: list[str] = []
    samples = bench.time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeat=2, warmup=1)
    assert order == ["a", "b"] * 3
    assert {name: len(values) for name, values in samples.items()} == {"a": 2, "b": 2}
    assert all(value >= 0 for values in samples.values() for value in values)


def test_table_marks_missing_numbers():
    result = {
        "shape": {"name": "x"},
        "ms": {"ours_fwd": 1.0, "ours_bwd": 2.0, "ours_fwdbwd": 3.0},
        "ratios": {"ours_over_torch": None, "fwd_over_floor": 1.25, "fwdbwd_over_floor": 1.5, "seed_over_ours": None},
        "peak_bytes": {"default": 3 * 2**20, "64MB": None},
    }
    row = bench.table_row(result, 5)
    assert row.split() == ["x", "1.0", "2.0", "3.0", "-", "-", "1.25", "1.50", "-", "3/-"]
    assert len(row) == len(bench.table_header(5).splitlines()[0])


def test_noise_warning_discounts_this_run():
    assert bench._other_load({"before": 1.9, "after": 1.7}, 2) == 0  # the load was the previous command's
    assert bench._other_load({"before": 0.2, "after": 3.5}, 2) == pytest.approx(0.2)
    assert bench._other_load({"before": 1.5, "after": 3.2}, 2) == pytest.approx(1.2)
    assert bench._other_load({"before": None, "after": 2.0}, 2) is None

"""`python -m conv2d bench`: the command runs end to end, its arguments, and a faithful seed baseline.

No timing is asserted: the numbers depend on the machine. The shapes are tiny so that the whole
file runs in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

import conv2d
from conv2d.__main__ import main
from conv2d.tools import bench

from .conftest import require_or_skip

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
    assert main(["bench", "--shapes", TINY, TINY_GROUPED, "--repeat", "1", "--rounds", "2", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    # Two rounds: every implementation timed twice, each time in a fresh process, the samples pooled.
    assert "in 2 rounds (the order reversed every other round" in printed
    assert "PyTorch CPU (round 2)" in printed or not HAS_TORCH
    assert "bare matrix product (round 1)" in printed and "bare matrix product (round 2)" in printed
    assert "ours/PyTorch" in printed and "add.at/ours" in printed and "fwd/bare" in printed
    assert "method: each implementation" in printed and "in a process of its own" in printed
    assert "4 warm-ups (the steady state of a training loop; the first calls page-fault fresh memory)" in printed
    assert "PyTorch CPU" in printed and "the original NumPy layer (np.add.at)" in printed
    assert TINY in printed and TINY_GROUPED in printed
    assert "seed: the seed has no groups and no dilation" in printed

    report = _strict_json(path)
    assert {"command", "settings", "machine", "results", "summary", "total_seconds", "load_average_1min"} <= set(report)
    settings = report["settings"]
    assert settings["backend"] == "numpy"
    assert settings["dtype"] == "float32"
    # The CPU path: four warm-ups, the wall clock, no GPU settings, no deterministic comparison unless asked.
    assert (settings["warmup"], settings["timer"], settings["gpu_precision"]) == (4, "perf_counter", {})
    assert settings["on_gpu"] is False and settings["deterministic"] is False
    # Each implementation was timed in a child process, which reported its library's threads.
    assert settings["isolation"] == "process" and settings["rounds"] == 2
    assert "BLAS" in settings["threads"]["ours"] and "BLAS" in settings["threads"]["seed"]
    if HAS_TORCH:
        assert "CPU threads" in settings["threads"]["torch"]
    machine = report["machine"]
    assert {"cpu_model", "processor", "cpu_count", "threadpools", "versions"} <= set(machine)
    assert machine["versions"]["conv2d"] == conv2d.__version__
    assert "numpy" in machine["versions"]
    # Numba's version where installed, and whether NumPy's compiled kernels ran here.
    numba_found = importlib.util.find_spec("numba") is not None
    assert (machine["numba"]["version"] is not None) == numba_found == machine["numba"]["compiled_kernels"]
    assert ("Numba: not installed" in printed) != numba_found

    plain, grouped = report["results"]
    assert plain["shape"]["spec"] == "2,3,8,8,4,3,3,1,1,1,1"
    assert (plain["shape"]["out_h"], plain["shape"]["out_w"]) == (8, 8)
    expected = {"ours_fwd", "ours_bwd", "ours_fwdbwd", "ours_layer_fwdbwd", "floor_fwd", "floor_grad_w", "floor_grad_cols",
                "floor_fwdbwd", "seed_fwd", "seed_fwdbwd"}
    if HAS_TORCH:
        expected |= {"torch_fwd", "torch_fwdbwd"}
    assert expected <= set(plain["ms"])
    assert all(value > 0 for value in plain["ms"].values())
    # One a round; an implementation re-timed for an implausible figure has its one new sample instead.
    for group in ("ours", "floor"):
        assert len(plain["samples_ms"][f"{group}_fwd"]) == (1 if group in plain["retimed"] else 2)
    assert isinstance(plain["implausible"], dict) and isinstance(plain["retimed"], list)
    assert all(plain["ms"][name] == value for name, value in plain["median_ms"].items())  # the default --stat
    assert plain["min_ms"]["ours_fwd"] == min(plain["samples_ms"]["ours_fwd"])
    ratios = plain["ratios"]
    # The seed's layer is compared with ours as a layer (its patches kept from forward to backward, as the seed's).
    assert ratios["seed_over_ours"] == pytest.approx(plain["ms"]["seed_fwdbwd"] / plain["ms"]["ours_layer_fwdbwd"])
    assert ratios["fwd_over_floor"] == pytest.approx(plain["ms"]["ours_fwd"] / plain["ms"]["floor_fwd"])
    if HAS_TORCH:
        assert ratios["ours_over_torch"] == pytest.approx(plain["ms"]["ours_fwdbwd"] / plain["ms"]["torch_fwdbwd"])
    # NumPy's allocations are visible: one forward+backward holds at least its output and gradients.
    assert plain["peak_bytes"]["default"] >= plain["outputs_bytes"] > 0

    assert "seed_fwd" not in grouped["ms"] and grouped["ratios"]["seed_over_ours"] is None
    assert "seed" in grouped["skipped"]
    assert "ours_fwdbwd_det" not in plain["ms"] and plain["ratios"]["det_over_default"] is None
    summ = report["summary"]
    assert summ["fwd_over_floor"]["worst_shape"] in (TINY, TINY_GROUPED)
    assert summ["targets_for"] == "cpu"
    assert summ["fwd_over_floor"]["target"] == "goal <= 1.3"
    assert summ["fwd_over_floor"]["met"] == (summ["fwd_over_floor"]["median"] <= 1.3)
    assert "det_over_default" not in summ


def test_cli_deterministic_column(tmp_path, capsys):
    """--deterministic times forward+backward with deterministic=True beside the default."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--shapes", TINY, "--repeat", "1", "--warmup", "0", "--deterministic", "--no-seed",
                 "--isolation", "none",
                 "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "det/dflt" in printed and "after 0 warm-ups (no seed)" in printed and "0 warm-ups (--warmup)" in printed
    assert "in this process, one after another" in printed
    assert "seed: not asked for (--no-seed)" in printed
    report = _strict_json(path)
    (result,) = report["results"]
    assert report["settings"]["warmup"] == 0 and report["settings"]["deterministic"] is True
    assert report["settings"]["seed"] is False and "seed_fwdbwd" not in result["ms"]
    assert result["ratios"]["det_over_default"] == pytest.approx(
        result["ms"]["ours_fwdbwd_det"] / result["ms"]["ours_fwdbwd"]
    )
    assert report["summary"]["det_over_default"]["target"] == "goal <= 1.3"
    assert "fwd+bwd deterministic/default: median" in printed


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_calls_pass_the_argument(monkeypatch, deterministic):
    """ours_calls adds the deterministic=True call only when asked; the default call leaves the
    choice to CONV2D_DETERMINISTIC (deterministic=None)."""
    seen: list[object] = []

    def forward(x, weight, bias=None, *, deterministic=None, **kwargs):
        seen.append(deterministic)
        return conv2d.conv2d(x, weight, bias, **kwargs)

    def backward(grad_out, x, weight, *, deterministic=None, **kwargs):
        seen.append(deterministic)
        return conv2d.conv2d_backward(grad_out, x, weight, **kwargs)

    monkeypatch.setattr(bench.calls, "conv2d", forward)
    monkeypatch.setattr(bench.calls, "conv2d_backward", backward)
    case = bench.Case.make(conv2d.get_backend("numpy"), bench.parse_shape(TINY), "float32")
    calls = bench.ours_calls(case, deterministic=deterministic)
    assert ("ours_fwdbwd_det" in calls) is deterministic
    calls["ours_fwdbwd"]()
    if deterministic:
        calls["ours_fwdbwd_det"]()
    assert seen == [None, None, True, True][: 4 if deterministic else 2]
    monkeypatch.setattr(bench.report, "torch_calls", lambda case: "not needed here")
    monkeypatch.setattr(bench.report, "seed_calls", lambda case: "not needed here")
    result = bench.measure(case, repeat=1, deterministic=deterministic)
    if deterministic:
        assert result["ratios"]["det_over_default"] > 0
    else:
        assert result["ratios"]["det_over_default"] is None and "ours_fwdbwd_det" not in result["ms"]


def test_a_failing_child_process_is_an_error_with_its_output(monkeypatch, capsys):
    monkeypatch.setattr(bench.isolation, "child_command",
                        lambda *args: [sys.executable, "-c", "import sys; print('child says why'); sys.exit(3)"])
    assert main(["bench", "--shapes", TINY, "--repeat", "1", "--no-seed"]) == 1
    err = capsys.readouterr().err
    assert "timing ours in its own process failed (exit 3)" in err and "child says why" in err
    assert main(["bench", "--only", "torch", "--shapes", TINY]) == 2
    assert "--only" in capsys.readouterr().err


def test_cli_markdown_has_the_method_the_table_and_the_goals(tmp_path):
    path = tmp_path / "bench.md"
    assert main(["bench", "--shapes", TINY, "--repeat", "1", "--isolation", "none", "--no-seed",
                 "--markdown", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert "Command: `python -m conv2d bench" in text and "Threads: conv2d (ours): NumPy" in text
    assert "\nNumba: " in text
    assert "method: each implementation" in text
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {TINY} |")]
    assert len(row.split("|")) == len(text.splitlines()[text.splitlines().index(row) - 2].split("|"))
    assert "- fwd+bwd ours/" in text and "goal <= 1.5" in text


def test_cli_plot_writes_png(tmp_path):
    require_or_skip("matplotlib")  # --plot needs it
    path = tmp_path / "bench.png"
    assert main(["bench", "--shapes", TINY, "--repeat", "1", "--stat", "min", "--isolation", "none",
                 "--plot", str(path)]) == 0
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
    with pytest.raises(SystemExit):
        main(["bench", "--warmup", "-1"])
    assert "'-1'" in capsys.readouterr().err
    assert main(["bench", "--backend", "nonsense", "--shapes", TINY]) == 2
    assert "'nonsense'" in capsys.readouterr().err
    assert main(["bench", "--algorithm", "nonsense", "--shapes", TINY]) == 2
    assert "'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["cupy", "nonsense"])
def test_cli_bad_backend_is_named_as_the_option(spec, capsys):
    """`bench --backend cupy` without CuPy names --backend, where the value came from, not get_backend()."""
    if spec == "cupy" and conv2d.available_backends()["cupy"] is True:
        pytest.skip("CuPy is usable here")
    assert main(["bench", "--backend", spec, "--shapes", TINY]) == 2
    err = capsys.readouterr().err
    assert f"'{spec}' (from --backend)" in err and "get_backend" not in err, err


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
    assert len(bench.PRESETS["gpu"]) % 2 == 1  # the GPU targets are read on the median shape


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


def test_time_calls_times_each_call_in_a_block_of_its_own():
    order: list[str] = []
    samples = bench.time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeat=2, warmup=1)
    assert order == ["a"] * 3 + ["b"] * 3  # never interleaved: each call's warm-up, then its repeats
    assert {name: len(values) for name, values in samples.items()} == {"a": 2, "b": 2}
    assert all(value >= 0 for values in samples.values() for value in values)


def test_time_calls_uses_each_calls_timer_for_warmup_and_repeats():
    used: list[str] = []

    def timer(label: str, seconds: float):
        def timed(call):
            used.append(label)
            call()
            return seconds

        return timed

    samples = bench.time_calls({"a": lambda: None, "b": lambda: None}, repeat=2, warmup=3,
                               timer={"a": timer("A", 1.0), "b": timer("B", 2.0)})
    assert used == ["A"] * 5 + ["B"] * 5  # warm-up calls wait for the device too
    assert samples == {"a": [1.0, 1.0], "b": [2.0, 2.0]}


class _FakeEvent:
    """Stands in for cupy.cuda.Event / torch.cuda.Event: records the clock of a fake device."""

    def __init__(self, device: dict, log: list) -> None:
        self.device, self.log, self.ms = device, log, None

    def record(self, stream=None):
        self.log.append(("record", stream))
        self.ms = self.device["clock_ms"]

    def synchronize(self):
        self.log.append(("synchronize",))


def test_event_timer_reads_the_device_clock_between_two_events():
    device, log = {"clock_ms": 100.0}, []

    def call():
        log.append(("call",))
        device["clock_ms"] += 7.5  # the device works 7.5 ms

    timer = bench.EventTimer(lambda: _FakeEvent(device, log), lambda start, end: end.ms - start.ms, stream="s")
    assert timer(call) == pytest.approx(7.5e-3)
    assert log == [("record", "s"), ("call",), ("record", "s"), ("synchronize",)]
    samples = bench.time_calls({"k": call}, repeat=2, warmup=1, timer=timer)
    assert samples == {"k": [pytest.approx(7.5e-3)] * 2}


def test_measure_times_ours_and_the_floor_by_the_backends_timer_and_torch_by_torchs(monkeypatch):
    """On a GPU backend ours and the floor go by its events, torch's reference by torch's (here: stand-ins)."""
    used: dict[str, set] = {"backend": set(), "torch": set()}

    def labelled(label):
        def make(*args):
            def timed(call):
                used[label].add(call)
                call()
                return 1e-3

            return timed

        return make

    monkeypatch.setattr(bench.report, "backend_timer", labelled("backend"))
    monkeypatch.setattr(bench.report, "_torch_timer", labelled("torch"))
    monkeypatch.setattr(bench.report, "seed_calls", lambda case: "not needed here")
    case = bench.Case.make(conv2d.get_backend("numpy"), bench.parse_shape(TINY), "float32")
    result = bench.measure(case, repeat=2, warmup=0)
    assert all(result["samples_ms"][name] == [1.0, 1.0] for name in result["samples_ms"])
    # ours_fwd, ours_bwd, ours_fwdbwd, ours_layer_fwdbwd (TINY is a layer the seed computes), floor_fwd,
    # floor_grad_w, floor_grad_cols
    assert len(used["backend"]) == 7
    assert len(used["torch"]) == (2 if HAS_TORCH else 0)


def test_cpu_backends_keep_the_wall_clock_and_four_warmups():
    numpy_backend = conv2d.get_backend("numpy")
    assert not isinstance(bench.backend_timer(numpy_backend), bench.EventTimer)
    # Four: the forward of the preset's 5x5 layer settled at its fifth call (first calls page-fault).
    assert bench.default_warmup(numpy_backend) == 4 and bench.WARMUP["gpu"] == 3
    with bench.gpu_precision(numpy_backend) as settings:
        assert settings == {}


@pytest.mark.skipif(not HAS_TORCH, reason="torch's flags")
def test_torch_precision_turns_tf32_off_and_restores_it():
    import torch

    flags = ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cudnn, "benchmark"))
    before = [getattr(owner, name) for owner, name in flags]
    settings: dict = {}
    with bench.precision._torch_precision(settings):
        assert [getattr(owner, name) for owner, name in flags] == [False, False, True]
    assert [getattr(owner, name) for owner, name in flags] == before
    assert settings["torch.backends.cuda.matmul.allow_tf32"] is False
    assert settings["torch.backends.cudnn.allow_tf32"] is False
    assert settings["torch.backends.cudnn.benchmark"] is True


def test_cupy_precision_forces_plain_fp32_and_restores_it(monkeypatch):
    """With CUPY_TF32=1 and a float32 product made before (compute type TF32), the bench runs in FP32."""
    state = {"float32": 7}  # COMPUTE_TYPE_TF32
    names = {1: "COMPUTE_TYPE_DEFAULT", 7: "COMPUTE_TYPE_TF32"}
    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.COMPUTE_TYPE_DEFAULT = 1
    linalg.get_compute_type = lambda dtype: state[np.dtype(dtype).name]
    linalg.set_compute_type = lambda dtype, value: state.__setitem__(np.dtype(dtype).name, value)
    linalg.compute_type_to_str = names.get
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    monkeypatch.setenv("CUPY_TF32", "1")
    settings: dict = {}
    with bench.precision._cupy_precision(settings):
        assert os.environ["CUPY_TF32"] == "0" and state["float32"] == 1
    assert os.environ["CUPY_TF32"] == "1" and state["float32"] == 7
    assert settings == {"CUPY_TF32": "0", "CUPY_TF32_before": "1", "cupy_float32_compute_type": "COMPUTE_TYPE_DEFAULT"}

    # On a CuPy backend, gpu_precision sets both sides: torch's reference and CuPy.
    cupy_backend = types.SimpleNamespace(name="cupy", spec="cupy")
    with bench.gpu_precision(cupy_backend) as both:
        assert state["float32"] == 1
    assert both["cupy_float32_compute_type"] == "COMPUTE_TYPE_DEFAULT"
    if HAS_TORCH:
        assert both["torch.backends.cuda.matmul.allow_tf32"] is False and both["torch.backends.cudnn.benchmark"] is True

    monkeypatch.delenv("CUPY_TF32")
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", None)  # a CuPy without that module
    with bench.precision._cupy_precision(settings):
        assert os.environ["CUPY_TF32"] == "0"
    assert "CUPY_TF32" not in os.environ
    assert settings["cupy_float32_compute_type"].startswith("unknown (ModuleNotFoundError")


def _result(name: str, **ratios: float | None) -> dict:
    keys = ("ours_over_torch", "fwd_over_floor", "fwdbwd_over_floor", "seed_over_ours", "det_over_default")
    return {"shape": {"name": name, "spec": name}, "ratios": {key: ratios.get(key) for key in keys},
            "peak_bytes": {"default": None, "64MB": None}}


def test_summary_reads_the_gpu_targets_on_the_median_shape():
    results = [_result("a", ours_over_torch=1.2, fwd_over_floor=1.1, det_over_default=1.0),
               _result("b", ours_over_torch=1.4, fwd_over_floor=1.6, det_over_default=1.5),
               _result("c", ours_over_torch=2.0, fwd_over_floor=1.2, det_over_default=1.1)]
    summ = bench.summary(results, "float32", on_gpu=True)
    assert summ["targets_for"] == "gpu"
    assert summ["ours_over_torch"]["median_shape"] == "b"
    assert (summ["ours_over_torch"]["median"], summ["ours_over_torch"]["met"]) == (1.4, True)
    assert summ["ours_over_torch"]["target"] == bench.TARGETS["gpu"]["ours_over_torch"].text
    assert "median shape of the gpu preset" in summ["ours_over_torch"]["target"]
    assert (summ["fwd_over_floor"]["median"], summ["fwd_over_floor"]["met"]) == (1.2, True)
    assert (summ["det_over_default"]["median"], summ["det_over_default"]["worst_shape"]) == (1.1, "b")
    assert "fwdbwd_over_floor" not in summ  # no shape has it
    lines = "\n".join(bench.summary_lines(summ))
    assert "fwd+bwd ours/PyTorch CUDA: median 1.40 (b) (goal <= 1.5 in float32, median shape of the gpu preset: met)" in lines
    assert "fwd+bwd deterministic/default: median 1.10 (c) (goal <= 1.3: met), worst 1.50 (b)" in lines

    missed = bench.summary([_result("a", ours_over_torch=1.6), _result("b", ours_over_torch=1.8)], "float32", True)
    assert missed["ours_over_torch"]["met"] is False and "median_shape" not in missed["ours_over_torch"]
    assert "(goal <= 1.5 in float32, median shape of the gpu preset; measured 1.70x)" in bench.summary_lines(missed)[0]
    assert bench.summary(results, "float32")["targets_for"] == "cpu"


def test_table_marks_missing_numbers():
    result = {
        "shape": {"name": "x"},
        "ms": {"ours_fwd": 1.0, "ours_bwd": 2.0, "ours_fwdbwd": 3.0},
        "ratios": {"ours_over_torch": None, "fwd_over_floor": 1.25, "fwdbwd_over_floor": 1.5, "seed_over_ours": None,
                   "det_over_default": None},
        "peak_bytes": {"default": 3 * 2**20, "64MB": None},
    }
    row = bench.table_row(result, 5)
    assert row.split() == ["x", "1.0", "2.0", "3.0", "-", "-", "1.25", "1.50", "-", "-", "3/-"]
    assert len(row) == len(bench.table_header(5).splitlines()[0])
    result["ratios"]["det_over_default"] = 1.25
    assert bench.table_row(result, 5).split()[8] == "1.25"


def test_noise_warning_discounts_this_run():
    assert bench.machine._other_load({"before": 1.9, "after": 1.7}, 2) == 0  # the load was the previous command's
    assert bench.machine._other_load({"before": 0.2, "after": 3.5}, 2) == pytest.approx(0.2)
    assert bench.machine._other_load({"before": 1.5, "after": 3.2}, 2) == pytest.approx(1.2)
    assert bench.machine._other_load({"before": None, "after": 2.0}, 2) is None


@pytest.mark.parametrize("mode", ["steady", "default"])
def test_every_timing_process_gets_the_allocator_thresholds(monkeypatch, capsys, tmp_path, mode):
    """--malloc steady (the default) starts each timing process at glibc's top thresholds; the
    caller's own MALLOC_* settings win; --malloc default adds nothing. Header and JSON say which."""
    import subprocess

    seen = []
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        if "env" in kwargs:  # a timing process (lscpu and the like get none)
            seen.append((command[command.index("--only") + 1], kwargs["env"]))
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(bench.isolation.subprocess, "run", run)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345678")  # the caller's own: kept as it is
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    path = tmp_path / "bench.json"
    argv = ["bench", "--shapes", TINY, "--repeat", "1", "--warmup", "0", "--rounds", "1", "--no-seed", "--json", str(path)]
    assert main(argv + ([] if mode == "steady" else ["--malloc", "default"])) == 0
    printed = capsys.readouterr().out
    # ours, the bare matrix product, PyTorch (no seed); one of them again if it gave an implausible figure
    # (likely without warm-up calls).
    assert [group for group, _ in seen[:3]] == ["ours", "floor", "torch"] and len(seen) <= 6
    for _, env in seen:
        assert env["MALLOC_TRIM_THRESHOLD_"] == "12345678"
        assert env.get("MALLOC_MMAP_THRESHOLD_") == ("33554432" if mode == "steady" else None)
    settings = _strict_json(path)["settings"]
    assert settings["malloc"]["mode"] == mode
    expected = ("allocator: glibc's steady-state thresholds in every timing process (MALLOC_MMAP_THRESHOLD_=33554432, "
                "MALLOC_TRIM_THRESHOLD_=12345678" if mode == "steady" else
                "allocator: glibc's start-up thresholds (--malloc default); MALLOC_TRIM_THRESHOLD_=12345678 from the environment")
    assert expected in printed and settings["malloc"]["line"].startswith(expected)


# --------------------------------------------------------------------------------------------------
# Implausible figures: the rule on synthetic samples, the marks, one re-time (no timing here)

STEADY = [1.0, 1.02, 0.98, 1.01, 0.99]


def test_a_forward_slower_than_forward_and_backward_is_implausible():
    """The first `--shapes seed --rounds 1`: forward 506.9 ms beside forward+backward 90.0 ms, printed without a word."""
    samples = {"ours_fwd": [506.9, 480.0, 530.2], "ours_bwd": [60.0, 61.0, 59.0], "ours_fwdbwd": [90.0, 91.0, 89.5],
               "floor_fwd": [19.7, 19.8, 19.6]}
    found = bench.plausibility.implausible(samples)
    assert set(found) == {"ours_fwd", "ours_fwdbwd"}  # which of the two is wrong cannot be told
    assert found["ours_fwd"] == "ours_fwd 507 ms is slower than ours_fwdbwd 90 ms, which makes the same calls and more"
    # The same comparison for the other parts and wholes, by the bench's --stat.
    for part, whole in (("ours_bwd", "ours_fwdbwd"), ("torch_fwd", "torch_fwdbwd"), ("seed_fwd", "seed_fwdbwd")):
        assert set(bench.plausibility.implausible({part: [3.0, 1.0, 3.0], whole: [2.0, 2.0, 2.0]})) == {part, whole}
        assert bench.plausibility.implausible({part: [3.0, 1.0, 3.0], whole: [2.0, 2.0, 2.0]}, min) == {}
    # Plausible: a part faster than its whole, or as fast; a measurement without its pair.
    assert bench.plausibility.implausible({"ours_fwd": [30.0] * 3, "ours_fwdbwd": [90.0] * 3, "ours_bwd": [90.0] * 3,
                                           "torch_fwd": [5.0], "seed_fwdbwd": [1.0]}) == {}


@pytest.mark.parametrize(
    ("values", "ratio"),
    [(STEADY, 0.02), ([10.0, 10.2, 10.5, 11.0, 30.0], 0.8 / 10.5),  # one outlier: the median is unmoved
     ([10.0, 10.0, 30.0, 30.0], 1.0), ([1.0, 1.0, 1.0, 1.0, 50.0, 60.0, 70.0], 54.0),
     ([1.0, 100.0, 1000.0], None), ([0.0] * 4, None)],  # too few samples to tell; no time at all
)
def test_spread_is_the_interquartile_range_over_the_median(values, ratio):
    assert bench.plausibility.spread(values) == (None if ratio is None else pytest.approx(ratio))
    flagged = bench.plausibility.implausible({"floor_fwd": values})
    assert ("floor_fwd" in flagged) == (ratio is not None and ratio > bench.plausibility.SPREAD_LIMIT)
    # The same spread over calls of microseconds is the jitter of a Python call, not a disturbed measurement.
    assert bench.plausibility.implausible({"floor_fwd": [t / 1e4 for t in values]}) == {}
    if flagged:
        assert flagged["floor_fwd"].startswith(f"floor_fwd's samples spread too widely: their interquartile range is "
                                               f"{ratio:.2f}x their median")


def _seconds(ms: dict[str, list[float]]) -> dict[str, list[float]]:
    return {name: [t / 1e3 for t in values] for name, values in ms.items()}


SEED_RUN = {"ours_fwd": [506.9] * 5, "ours_bwd": [60.0] * 5, "ours_fwdbwd": [90.0] * 5, "ours_layer_fwdbwd": [88.0] * 5,
            "floor_fwd": [19.7] * 5, "floor_grad_w": [20.0] * 5, "floor_grad_cols": [21.0] * 5,
            "torch_fwd": [8.0] * 5, "torch_fwdbwd": [25.0] * 5, "seed_fwd": [100.0] * 3, "seed_fwdbwd": [300.0] * 3}


def test_implausible_figures_are_marked_in_the_table_and_json_fields():
    result = bench.assemble(bench.SEED_SHAPE, "float32", _seconds(SEED_RUN), {}, None, "median")
    assert set(result["implausible"]) == {"ours_fwd", "ours_fwdbwd"} and result["retimed"] == []
    json.dumps(result)  # plain JSON
    width = len(bench.SEED_SHAPE.label)  # a label with spaces: the cells are what follows it
    cells = bench.table_row(result, width)[width:].split()
    assert len(bench.table_row(result, width)) == len(bench.table_header(width).splitlines()[0])
    # fwd, f+b, ours/PyTorch, fwd/bare, f+b/bare read a flagged figure; bwd, PyTorch f+b, add.at/ours do not.
    assert cells[:9] == ["506.9!", "60.0", "90.0!", "25.0", "3.60!", "25.73!", "1.48!", "-", "3.41"]
    lines = bench.report.implausible_lines([result])
    assert len(lines) == 2 and "ours_fwdbwd" in lines[1]  # one line a flagged measurement
    line = lines[0]
    assert line.startswith(f"'!' {bench.SEED_SHAPE.label}: ours_fwd 507 ms is slower than ours_fwdbwd 90 ms")
    assert line.endswith("the figures read from it are unreliable (the machine was busy?): rerun, with more --rounds "
                         "or --stat min") and "re-time" not in line
    clean = bench.assemble(bench.SEED_SHAPE, "float32", _seconds({**SEED_RUN, "ours_fwd": [26.6] * 5}), {}, None, "median")
    assert clean["implausible"] == {} and "!" not in bench.table_row(clean, 30)
    assert bench.report.implausible_lines([clean]) == []
    markdown = bench.report.markdown([result], bench.summary([result], "float32"), ["header"])
    assert "| 506.9! | 60.0 | 90.0! |" in markdown and f"- '!' {bench.SEED_SHAPE.label}: ours_fwd 507 ms" in markdown


@pytest.mark.parametrize("again", ["plausible", "still implausible"])
def test_implausible_figures_are_timed_again_once(monkeypatch, capsys, again):
    """The implementation with an implausible figure is timed once more on that shape only; its new samples
    replace its old ones; what is still implausible stays marked, "even after one re-time"."""
    import argparse

    shapes = [bench.SEED_SHAPE, bench.parse_shape(TINY)]
    results = [bench.assemble(shapes[0], "float32", _seconds(SEED_RUN), {}, None, "median"),
               bench.assemble(shapes[1], "float32", _seconds({**SEED_RUN, "ours_fwd": [30.0] * 5}), {}, None, "median")]
    calls = []
    retimed_fwd = [26.6] * 5 if again == "plausible" else [400.0] * 5

    def time_once(args, backend, shapes_timed, extra, warmup, group):
        calls.append((group, [shape.spec for shape in shapes_timed]))
        new = {"ours_fwd": retimed_fwd, "ours_bwd": [61.0] * 5, "ours_fwdbwd": [91.0] * 5, "ours_layer_fwdbwd": [89.0] * 5}
        return {"group": group, "threads": "-", "shapes": [{"samples": _seconds(new), "skipped": {}, "peak_bytes": None}]}

    monkeypatch.setattr(bench.isolation, "_time_once", time_once)
    args = argparse.Namespace(dtype="float32", stat="median")
    checked = bench.isolation.recheck(args, conv2d.get_backend("numpy"), shapes, {}, 4, results)
    assert calls == [("ours", [bench.SEED_SHAPE.spec])]  # only ours, only the flagged shape
    assert "conv2d (ours): implausible figures (ours_fwd, ours_fwdbwd) on 1 shape; timing them again" in capsys.readouterr().out
    first, second = checked
    assert first["retimed"] == ["ours"] and second["retimed"] == [] and second is results[1]
    assert first["samples_ms"]["ours_fwd"] == pytest.approx(retimed_fwd)  # replaced, not pooled
    assert first["samples_ms"]["torch_fwd"] == pytest.approx(SEED_RUN["torch_fwd"])  # the others' are kept
    if again == "plausible":
        assert first["implausible"] == {} and first["ms"]["ours_fwd"] == pytest.approx(26.6)
        assert bench.report.implausible_lines(checked) == []
    else:
        assert set(first["implausible"]) == {"ours_fwd", "ours_fwdbwd"}
        width = len(bench.SEED_SHAPE.label)
        assert bench.table_row(first, width)[width:].split()[0] == "400.0!"
        assert "ours_fwd 400 ms is slower than ours_fwdbwd 91 ms" in bench.report.implausible_lines(checked)[0]
        assert "even after one re-time" in bench.report.implausible_lines(checked)[0]

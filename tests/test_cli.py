"""``python -m conv2d``'s parsing: no abbreviated options, and a subcommand's mistakes shown with its own usage."""

from __future__ import annotations

import subprocess
import sys

import pytest

import conv2d.tools.bench
import conv2d.tools.demo
from conv2d.__main__ import main


@pytest.fixture(autouse=True)
def _no_command_runs(monkeypatch):
    """The parsing alone is tested: a command that got as far as running fails the test."""
    for module in (conv2d.tools.demo, conv2d.tools.bench):
        monkeypatch.setattr(module, "run", lambda args: pytest.fail(f"ran with {args}"))


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--epoch", "1"], "--epoch 1 (did you mean --epochs?)"),
        (["demo", "--no-plot"], "--no-plot (did you mean --no-plots?)"),
        (["bench", "--rep", "1"], "--rep 1 (did you mean --repeat?)"),
        (["bench", "--determ"], "--determ"),
    ],
)
def test_abbreviated_options_are_refused(argv, expected, capsys):
    """argparse took `--epoch 1` for `--epochs 1` without a word: every parser has allow_abbrev=False."""
    err = _refused(argv, capsys)
    assert f"usage: python -m conv2d {argv[0]} " in err
    assert f"python -m conv2d {argv[0]}: error: unrecognized arguments: {expected}" in err, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--ephocs", "1"], "--ephocs 1 (did you mean --epochs?)"),
        (["demo", "--ephocs", "1", "--lrr", "2"], "--ephocs 1 --lrr 2 (did you mean --epochs for --ephocs, --lr for --lrr?)"),
        (["bench", "--zzzz"], "--zzzz"),
        (["info", "extra"], "extra"),
    ],
)
def test_a_typo_shows_the_subcommands_usage(argv, expected, capsys):
    """A misspelt option of `demo` printed the top-level usage (`python -m conv2d [-h] {info,...}`), which
    lists no option of the demo."""
    err = _refused(argv, capsys)
    assert err.startswith(f"usage: python -m conv2d {argv[0]} "), err
    assert "{info,bench,demo,scale}" not in err
    assert err.rstrip().endswith(f"python -m conv2d {argv[0]}: error: unrecognized arguments: {expected}"), err


def test_a_typo_from_the_shell():
    """The same, as typed: exit status 2, the demo's usage and error on stderr, nothing trained."""
    done = subprocess.run([sys.executable, "-m", "conv2d", "demo", "--ephocs", "1"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("usage: python -m conv2d demo ") and "--ephocs 1 (did you mean --epochs?)" in done.stderr


def test_full_option_names_still_parse(monkeypatch):
    seen = []
    monkeypatch.setattr(conv2d.tools.demo, "run", lambda args: seen.append(args) or 0)
    assert main(["demo", "--epochs", "3", "--no-plots", "--save=model"]) == 0
    assert seen[0].epochs == 3 and seen[0].no_plots and str(seen[0].save) == "model"

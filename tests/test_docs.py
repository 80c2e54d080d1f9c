"""The documentation keeps up with the code: every algorithm is described wherever the choice is
documented, every public name has an API page, and the README stays a front door (short, and with
no image links that break on the package index's page)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import conv2d
from conv2d import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ALGORITHMS_PAGE = (ROOT / "docs" / "user_guide" / "algorithms.rst").read_text(encoding="utf-8")
API_PAGE = (ROOT / "docs" / "api.rst").read_text(encoding="utf-8")


def _info_sections(capsys) -> dict[str, list[str]]:
    """`python -m conv2d info`'s output, as {heading line: the names of its indented lines}."""
    assert cli.info() == 0
    sections: dict[str, list[str]] = {}
    heading = ""
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):
            sections.setdefault(heading, []).append(line.split()[0])
        else:
            heading = line
    return sections


def test_the_algorithm_parameter_lists_every_algorithm():
    """The docstring's choices for `algorithm` are exactly "auto" and conv2d.ALGORITHMS."""
    match = re.search(r"^\s*algorithm : \{(.*?)\}", conv2d.conv2d.__doc__, flags=re.MULTILINE)
    assert match, "conv2d.conv2d's docstring has no 'algorithm : {...}' line"
    assert re.findall(r'"(\w+)"', match.group(1)) == ["auto", *conv2d.ALGORITHMS]


@pytest.mark.parametrize("name", conv2d.ALGORITHMS)
def test_every_algorithm_is_described_in_the_docstring(name):
    """Each algorithm is described as a value (``"name"``), not merely a word of the text."""
    assert f'``"{name}"``' in conv2d.conv2d.__doc__, f"conv2d.conv2d's docstring does not describe {name!r}"


@pytest.mark.parametrize("name", conv2d.ALGORITHMS)
def test_every_algorithm_is_described_in_the_user_guide(name):
    """The algorithms page has a definition (a term at the line's start) for each algorithm."""
    assert re.search(rf"^``{name}``", ALGORITHMS_PAGE, flags=re.MULTILINE), f"docs/user_guide/algorithms.rst: no entry for {name}"


def test_info_lists_every_algorithm_and_auto_picks_only_real_ones(capsys, monkeypatch):
    """`info` lists the algorithms of conv2d.ALGORITHMS, no more, no fewer, and auto's rule names
    only algorithms that exist, ending with the fallback."""
    monkeypatch.setenv("CONV2D_BACKEND", "numpy")
    sections = _info_sections(capsys)
    listed = next(names for heading, names in sections.items() if heading.startswith("algorithms"))
    assert listed == list(conv2d.ALGORITHMS)
    rule = next(names for heading, names in sections.items() if heading.startswith("algorithm 'auto'"))
    assert set(rule) <= set(conv2d.ALGORITHMS) and rule[-1] == "slices"


def test_info_shows_what_auto_picks_on_numpy(capsys, monkeypatch):
    """The old `info` said "auto there: slices" though auto also runs winograd and pointwise on NumPy."""
    monkeypatch.setenv("CONV2D_BACKEND", "numpy")
    assert cli.info() == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("active backend"))
    if conv2d.get_backend("numpy").kernels is not None:  # Numba installed: the compiled kernels, and which set
        names = ("kernels (winograd)", "kernels (pointwise)", "kernels (direct)")
    else:
        names = ("slices", "winograd", "pointwise", "direct")
    for name in names:
        assert f": {name}" in line


@pytest.mark.parametrize("module, names", [
    ("conv2d", [n for n in conv2d.__all__ if n not in ("nn", "optim")]),
    ("conv2d.nn", conv2d.nn.__all__),
    ("conv2d.optim", conv2d.optim.__all__),
])
def test_every_public_name_is_in_the_api_reference(module, names):
    """docs/api.rst names every public function and class under its module (autosummary makes its page)."""
    sections = re.split(r"^\.\. currentmodule:: ", API_PAGE, flags=re.MULTILINE)
    section = next(text for text in sections if text.startswith(module + "\n"))
    entries = set(re.findall(r"^   (\w+)$", section, flags=re.MULTILINE)) | set(re.findall(r"^\.\. data:: (\w+)$", section, flags=re.MULTILINE))
    assert set(names) <= entries, f"missing from docs/api.rst: {sorted(set(names) - entries)}"


def test_the_readme_is_at_most_250_lines():
    assert README.count("\n") <= 250


def test_the_readme_has_no_relative_image_links():
    """Relative image links break on the package index's page, which shows the README alone."""
    targets = re.findall(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)", README) + re.findall(r"<img[^>]*\ssrc=[\"']([^\"']+)", README)
    assert all(re.match(r"https?://", target) for target in targets), targets


def test_the_readme_installs_cpu_only_torch_before_the_test_command():
    """The test command is CI's, exactly, and the CPU-only PyTorch line comes before it, not after."""
    test_command = 'python -m pip install "torch==2.13.0" -e ".[test]" && python -m pytest'
    cpu_only = 'python -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu'
    assert test_command in README and cpu_only in README
    assert README.index(cpu_only) < README.index(test_command)


def test_the_readme_speaks_to_users():
    """No load averages, no history and no word of this project's own machines in the front door."""
    for phrase in ("load average", "this project's", "the seed", "the mission", "minutes before", "min before"):
        assert phrase not in README.lower(), phrase

"""Command line of conv2d: python -m conv2d info | demo | bench | scale."""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.metadata
import os
import platform
import sys

from . import __version__
from ._conv import auto_algorithm
from ._determinism import ENV_VAR as DETERMINISTIC_ENV_VAR
from ._determinism import resolve_deterministic
from ._geometry import make_geometry
from .backends import ENV_VAR, BackendUnavailableError, available_backends, get_backend

_DISTRIBUTIONS = ("numpy", "array-api-compat", "numba", "cupy-cuda12x", "cupy-cuda13x", "torch", "jax", "array-api-strict")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# Every value of algorithm= besides "auto", with where it applies: `info` prints these (tests/test_docs.py
# fails when an algorithm of conv2d.ALGORITHMS is missing here).
_ALGORITHM_NOTES = {
    "gather": "im2col by an indexed gather, scatter-add back",
    "slices": "im2col by kH*kW strided slices, slice additions back",
    "kernels": "compiled kernels: CuPy's device kernels; NumPy's CPU kernels where Numba is installed",
    "native": "the library's own convolution, torch and JAX only",
    "direct": "kH*kW shifted multiply-adds, no patch matrix",
    "winograd": "Winograd F(2x2, 3x3), 3x3 kernels with stride 1",
    "pointwise": "batched products on NCHW, 1x1 kernels",
}

# auto's rule, the first entry that applies wins (conv2d._conv.auto_algorithm has the reasons).
_AUTO_RULE = (
    ("native", ("torch; JAX but for 1x1 kernels and layers of at most 4 channels per group "
                "(not on a JAX GPU in deterministic mode)")),
    ("kernels", "CuPy; NumPy where Numba is installed (its Winograd layers: finite inputs)"),
    ("direct", "grouped layers of at most 4 channels per group (not on JAX)"),
    ("pointwise", "NumPy, 1x1 kernels"),
    ("winograd", ("NumPy, finite inputs, 3x3 stride-1 layers of at least 64 channels and filters per group "
                  "(32 on outputs of at most 16x16)")),
    ("slices", "everything else"),
)

# Typical layers for which `info` shows auto's choice on the active backend: (label, input, weight, options).
_EXAMPLE_LAYERS: tuple[tuple[str, tuple[int, ...], tuple[int, ...], dict[str, int]], ...] = (
    ("3x3, 16 channels", (1, 16, 8, 8), (16, 16, 3, 3), {"padding": 1}),
    ("3x3, 64 channels", (1, 64, 16, 16), (64, 64, 3, 3), {"padding": 1}),
    ("1x1", (1, 64, 16, 16), (64, 64, 1, 1), {}),
    ("depthwise 3x3", (1, 16, 8, 8), (16, 1, 3, 3), {"padding": 1, "groups": 16}),
)


def info() -> int:
    """Print versions, which backends are usable here (or why not), the active one, what ``auto``
    runs there, every algorithm, and the deterministic mode."""
    print(f"conv2d {__version__}, Python {platform.python_version()} on {platform.platform()}")
    for distribution in _DISTRIBUTIONS:
        print(f"  {distribution:18s} {_version(distribution)}")
    print("backends:")
    for name, usable in available_backends().items():
        print(f"  {name:18s} {'usable' if usable is True else usable}")
    print("algorithms (algorithm=):")
    for name, note in _ALGORITHM_NOTES.items():
        print(f"  {name:18s} {note}")
    print("algorithm 'auto' runs the first of these that applies:")
    for name, where in _AUTO_RULE:
        print(f"  {name:18s} {where}")
    source = f"{ENV_VAR}={os.environ[ENV_VAR]!r}" if os.environ.get(ENV_VAR) else "default"
    try:
        backend = get_backend()
        try:
            deterministic, mode_error = resolve_deterministic(None), None
        except ValueError as exc:  # still say what auto runs (in the default mode), then the error
            deterministic, mode_error = False, exc
        picks = []
        for label, x_shape, w_shape, options in _EXAMPLE_LAYERS:
            geom = make_geometry(x_shape, w_shape, None, **options)
            pick = auto_algorithm(backend, deterministic, geom=geom)
            if pick == "kernels" and hasattr(backend.kernels, "kernel_set_name"):  # NumPy's: which kernel set
                pick += f" ({backend.kernels.kernel_set_name(geom)})"
            picks.append(f"{label}: {pick}")
        print(f"active backend: {backend.spec} (from {source}); algorithm 'auto' there: {'; '.join(picks)}")
        if mode_error is not None:
            raise mode_error
        print(f"deterministic mode: {'on' if deterministic else 'off'} "
              f"({DETERMINISTIC_ENV_VAR}={os.environ.get(DETERMINISTIC_ENV_VAR, '')!r})")
    except (ValueError, BackendUnavailableError) as exc:
        print(f"error: {exc}")
        return 1
    return 0


# command -> (module that defines add_arguments(parser) and run(args) -> exit code, help line).
# Modules are imported only for the command that runs: `info` must not pay for matplotlib.
_COMMANDS = {
    "info": (None, "versions, usable backends and the active one"),
    "bench": (".tools.bench", "time conv2d against PyTorch, the bare matrix products and the seed"),
    "demo": (".tools.demo", "train a small CNN on scikit-learn's digits"),
    "scale": (".tools.scale", "inference images/s and training ms/step on 1..k Dask workers (needs conv2d[dask])"),
}


def _unrecognized(sub: argparse.ArgumentParser, extra: list[str]) -> str:
    """The subcommand's error for arguments it does not take, with the closest option to a misspelt one."""
    options = [option for action in sub._actions for option in action.option_strings]
    guesses = {word: close[0] for word in extra if word.startswith("-")
               for close in [difflib.get_close_matches(word.split("=")[0], options, 1)] if close}
    hint = ", ".join(f"{guess} for {word}" if len(guesses) > 1 else guess for word, guess in guesses.items())
    return f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {hint}?)" if hint else "")


def main(argv: list[str] | None = None) -> int:
    # allow_abbrev=False everywhere: argparse would otherwise take --epoch for --epochs, silently, and
    # a prefix that names an option today could name another once an option is added.
    parser = argparse.ArgumentParser(prog="python -m conv2d", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    subs = {}
    for name, (module_name, help_text) in _COMMANDS.items():
        subs[name] = sub = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if module_name is not None:
            importlib.import_module(module_name, __package__).add_arguments(sub)
    # The subcommand, not the top-level parser, reports what it does not take, with its own usage
    # (parse_args would print `python -m conv2d [-h] {info,bench,...}` for a typo in `demo --ephocs`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        subs[args.command].error(_unrecognized(subs[args.command], extra))
    module_name = _COMMANDS[args.command][0]
    if module_name is None:
        return info()
    return importlib.import_module(module_name, __package__).run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line of conv2d: python -m conv2d info | demo | bench | scale."""

from __future__ import annotations

import argparse
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

_DISTRIBUTIONS = ("numpy", "array-api-compat", "cupy-cuda12x", "cupy-cuda13x", "torch", "jax", "array-api-strict")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    """Print versions, which backends are usable here (or why not), the active one and the mode."""
    print(f"conv2d {__version__}, Python {platform.python_version()} on {platform.platform()}")
    for distribution in _DISTRIBUTIONS:
        print(f"  {distribution:18s} {_version(distribution)}")
    print("backends:")
    for name, usable in available_backends().items():
        print(f"  {name:18s} {'usable' if usable is True else usable}")
    source = f"{ENV_VAR}={os.environ[ENV_VAR]!r}" if os.environ.get(ENV_VAR) else "default"
    try:
        backend = get_backend()
        dense = make_geometry((1, 16, 8, 8), (16, 16, 3, 3), None, padding=1)
        depthwise = make_geometry((1, 16, 8, 8), (16, 1, 3, 3), None, padding=1, groups=16)
        print(f"active backend: {backend.spec} (from {source}); algorithm 'auto' there: "
              f"{auto_algorithm(backend, geom=dense)} (depthwise layers: {auto_algorithm(backend, geom=depthwise)})")
        print(f"deterministic mode: {'on' if resolve_deterministic(None) else 'off'} "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conv2d", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in _COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if module_name is not None:
            importlib.import_module(module_name, __package__).add_arguments(sub)
    args = parser.parse_args(argv)
    module_name = _COMMANDS[args.command][0]
    if module_name is None:
        return info()
    return importlib.import_module(module_name, __package__).run(args)


if __name__ == "__main__":
    sys.exit(main())

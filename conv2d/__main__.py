"""Command line: ``python -m conv2d info``."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from . import __version__
from .backends import ENV_VAR, BackendUnavailableError, available_backends, get_backend

_DISTRIBUTIONS = ("numpy", "array-api-compat", "cupy-cuda12x", "cupy-cuda13x", "torch", "jax", "array-api-strict")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    """Print versions, which backends are usable here (or why not), and the active one."""
    print(f"conv2d {__version__}, Python {platform.python_version()} on {platform.platform()}")
    for distribution in _DISTRIBUTIONS:
        print(f"  {distribution:18s} {_version(distribution)}")
    print("backends:")
    for name, usable in available_backends().items():
        print(f"  {name:18s} {'usable' if usable is True else usable}")
    source = f"{ENV_VAR}={os.environ[ENV_VAR]!r}" if os.environ.get(ENV_VAR) else "default"
    try:
        print(f"active backend: {get_backend().spec} (from {source})")
    except (ValueError, BackendUnavailableError) as exc:
        print(f"active backend: none: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conv2d", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, usable backends and the active one")
    parser.parse_args(argv)
    return info()


if __name__ == "__main__":
    sys.exit(main())

"""Sphinx configuration: PyData theme, numpydoc docstrings, an autosummary API reference and a
sphinx-gallery of the scripts in ``examples/`` (run at build time, figures rendered).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``; doctests of the pages:
``python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's conv2d, also when the installed one is elsewhere

# Every example and doctest runs on NumPy with one BLAS thread (the gallery's convolutions are small),
# whatever the builder's environment says; set before conv2d or NumPy is imported.
os.environ["CONV2D_BACKEND"] = "numpy"
for _threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

import conv2d  # noqa: E402  (after the environment above)

project = "conv2d"
copyright = "conv2d contributors"
version = release = conv2d.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
# The bench's own Markdown outputs are data that benchmarks.md quotes, not pages of their own.
exclude_patterns = ["_build", "bench-*.md", "backend_table.rst", "**/*.ipynb", "**/*.py.md5", "auto_examples/*.zip"]

# API reference: one page per public name, from its docstring.
autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters section says the types
autodoc_default_options = {"inherited-members": False}
numpydoc_show_class_members = True
numpydoc_class_members_toctree = False
numpydoc_show_inherited_class_members = True  # parameters(), state_dict(), ... of every layer
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()


sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r".*\.py$",  # every script runs at build time
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "reset_modules": ("matplotlib",),
    "within_subsection_order": "FileNameSortKey",
    "min_reported_time": 1,
}

myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = f"conv2d {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path: list[str] = []
html_show_sourcelink = False

doctest_global_setup = """
import numpy as np
import conv2d  # noqa: E402  (after the environment above)
"""

"""Sphinx configuration for the usp_npu documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (or ``make -C docs html``).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # autodoc imports the checkout, installed or not


def _version() -> str:
    text = (ROOT / "usp_npu" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    return match.group(1) if match else "unknown"


def _write_generated() -> None:
    """Tables built from the code at every build (see docs/examples/validation_messages.py)."""
    here = Path(__file__).resolve().parent
    path = here / "examples" / "validation_messages.py"
    spec = importlib.util.spec_from_file_location("validation_messages", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.write_tables(here / "_generated")


_write_generated()

project = "usp_npu"
author = "usp_npu contributors"
copyright = "usp_npu contributors"
release = version = _version()

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "examples", "Thumbs.db", ".DS_Store"]
language = "en"

# Markdown pages
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# API pages: torch must be importable; torch_npu never is on CPU build hosts
autodoc_mock_imports = ["torch_npu"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # no torch.nn.Module boilerplate on USPAttention.forward
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass "Attributes:" as fields, not duplicate attribute entries

# Theme: furo when installed, else Sphinx's built-in alabaster
try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:
    html_theme = "alabaster"
html_title = f"usp_npu {release}"

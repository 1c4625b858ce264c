"""Sphinx configuration for the usp_npu documentation, in English and Chinese.

One source, two languages: the Chinese site is the English pages translated through the gettext
catalogues in ``docs/locale/zh_CN/LC_MESSAGES`` (see docs/translating.md).

Build both: ``make -C docs html-all`` (``_build/html/en`` and ``_build/html/zh_CN``).
One language: ``sphinx-build -W -b html -D language=zh_CN docs docs/_build/html/zh_CN``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # autodoc and the generators import the checkout, installed or not

LANGUAGES = {"en": "English", "zh_CN": "简体中文"}  # the builds of `make html-all`


def _version() -> str:
    text = (ROOT / "usp_npu" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    return match.group(1) if match else "unknown"


def _load(name: str):
    """Import docs/<name>.py by path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _write_generated() -> None:
    """Tables and diagrams computed from the code at every build, into docs/_generated/.

    Nothing there is committed: the flag table comes from the real parser, the error table from
    ``validate()``, the diagrams from the schedule, split and mesh functions.
    """
    out = HERE / "_generated"
    _load("examples/validation_messages").write_tables(out)
    _load("examples/flags_reference").write_table(out)
    _load("diagrams").write_all(out)


_write_generated()

project = "usp_npu"
author = "usp_npu contributors"
copyright = "usp_npu contributors"
release = version = _version()

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "examples", "locale", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
smartquotes = False  # text copied from the pages (messages, flags) stays plain ASCII

# Languages: -D language=zh_CN selects the catalogue; one .po file per page
language = "en"
locale_dirs = ["locale/"]
gettext_compact = False
gettext_uuid = False
gettext_location = True
gettext_last_translator = "usp_npu contributors"
gettext_language_team = "usp_npu contributors"

# Markdown pages
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# Code on the pages runs: `make doctest` executes every {doctest} / {testcode} block
doctest_global_setup = """
import torch
import usp_npu
"""
doctest_test_doctest_blocks = ""  # only the explicit directives, never plain >>> text

# API pages: torch must be importable; torch_npu never is on CPU build hosts
autodoc_mock_imports = ["torch_npu"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # no torch.nn.Module boilerplate on USPAttention.forward
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass "Attributes:" as fields, not duplicate attribute entries

# Theme: furo when installed, else Sphinx's built-in alabaster. Both get the language switch.
try:
    import furo  # noqa: F401

    html_theme = "furo"
    html_sidebars = {
        "**": [
            "sidebar/brand.html",
            "sidebar/language-switch.html",
            "sidebar/search.html",
            "sidebar/scroll-start.html",
            "sidebar/navigation.html",
            "sidebar/scroll-end.html",
        ]
    }
except ImportError:
    html_theme = "alabaster"
    html_sidebars = {
        "**": ["about.html", "sidebar/language-switch.html", "navigation.html", "searchbox.html"]
    }
html_title = f"usp_npu {release}"


def _language_links(app, pagename, templatename, context, doctree) -> None:
    """The same page in every language: `make html-all` puts them in sibling folders."""
    up = "../" * (pagename.count("/") + 1)
    current = app.config.language
    context["language_links"] = [
        (name, f"{up}{code}/{pagename}.html", code == current, code)
        for code, name in LANGUAGES.items()
    ]


def setup(app) -> None:
    app.connect("html-page-context", _language_links)

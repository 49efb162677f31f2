"""Sphinx configuration of optax_paged8bit's documentation site.

Build it with `sphinx-build -W --keep-going docs docs/_build/html` (the docs
extra installs Sphinx, the theme and MyST); tests/test_docs.py runs every
code example of the guides."""

from __future__ import annotations

project = "optax_paged8bit"
author = "optax_paged8bit's authors"
copyright = "2026, optax_paged8bit's authors"

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx-mathjax-offline",  # MathJax served from the site itself: it works offline
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "optax_paged8bit"
html_static_path = ["_static"]
html_theme_options = {
  "show_toc_level": 2,
  "home_page_in_toc": True,
}
html_context = {"default_mode": "light"}

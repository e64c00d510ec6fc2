"""Sphinx configuration for the riemfip documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "riemfip"
author = "riemfip developers"
release = "0.1.0"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False
exclude_patterns = ["_build"]
html_theme = "alabaster"

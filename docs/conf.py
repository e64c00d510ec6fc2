"""Sphinx configuration for the riemfip documentation.

The build needs no network and no GPU: intersphinx reads the inventories committed
under ``_intersphinx/``, and the gallery (``../examples/plot_*.py``) runs on the CPU
on the offline MNIST subset. ``tests/test_docs.py`` builds it with ``-W``.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))  # _ext

project = "riemfip"
author = "riemfip developers"
copyright = "riemfip developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = [
    "_build",
    "_intersphinx",
    "**.ipynb_checkpoints",
    "auto_examples/*.ipynb",
]

# -- autodoc / napoleon ------------------------------------------------------------------
napoleon_google_docstring = False
napoleon_numpy_docstring = True
# "{'a', 'b'}, optional" rendered as literals; "Attributes" as fields, not as a second
# description of each member
napoleon_preprocess_types = True
napoleon_use_ivar = True
autodoc_member_order = "bysource"
# the numpy docstrings carry the types, so signatures stay short
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "show-inheritance": True}
# the API pages are written by write_api_pages below; autosummary only draws the tables
autosummary_generate = False


def _public_modules(*packages: str) -> list[str]:
    """Every importable module of ``packages`` whose dotted name has no ``_`` part."""
    names = []
    for package in packages:
        names.append(package)
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.append(info.name)
    return names


def _assigned_names(module) -> set[str]:
    """Names bound by a top-level assignment in ``module``'s source (its own data)."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return set()
    names = set()
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [getattr(node, "target", None)]
        )
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def public_names(module) -> tuple[list[str], list[str]]:
    """A module's public names (``__all__``, else those it defines), split into the ones it
    defines and the ones it re-exports from elsewhere (documented where they are defined)."""
    assigned = _assigned_names(module)
    if hasattr(module, "__all__"):
        names = [
            n
            for n in module.__all__
            if not inspect.ismodule(getattr(module, n)) and not n.startswith("__")
        ]
    else:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and not inspect.ismodule(obj)
            and (getattr(obj, "__module__", None) == module.__name__ or n in assigned)
        ]
    own, reexported = [], []
    for n in names:
        obj = getattr(module, n)
        home = (
            getattr(obj, "__module__", None)
            if (inspect.isclass(obj) or callable(obj))
            else None
        )
        is_own = home == module.__name__ if home is not None else n in assigned
        (own if is_own else reexported).append(n)
    return own, reexported


API_MODULES = _public_modules("manifolds", "riemfip")


def _summary(module) -> str:
    """The first paragraph of a module's docstring, on one line."""
    doc = inspect.getdoc(module) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _is_code(obj) -> bool:
    return inspect.isclass(obj) or callable(obj)


def _data_home(module, name: str) -> str:
    """The module under ``module`` that assigns the re-exported data ``name``."""
    obj = getattr(module, name)
    for candidate in API_MODULES:
        if candidate.startswith(module.__name__ + "."):
            other = importlib.import_module(candidate)
            if getattr(other, name, None) is obj and name in _assigned_names(other):
                return candidate
    raise LookupError(
        f"{module.__name__}.{name} is re-exported from a module outside the API"
    )


def _module_page(name: str) -> str:
    """The reStructuredText of one module's API page."""
    module = importlib.import_module(name)
    own, reexported = public_names(module)
    escaped = name.replace("_", r"\_")
    lines = [escaped, "=" * len(escaped), "", f".. automodule:: {name}"]
    lines += [f"   :members: {', '.join(own)}" if own else "   :no-members:", ""]
    if reexported:
        lines += [
            ".. rubric:: " + ("Re-exported names" if own else "Public names"),
            "",
            "Importable from here; each is documented in the module that defines it.",
            "",
            ".. autosummary::",
            "   :nosignatures:",
            "",
        ]
        lines += [f"   {n}" for n in reexported if _is_code(getattr(module, n))] + [""]
        data = [n for n in reexported if not _is_code(getattr(module, n))]
        if data:
            refs = ", ".join(f":data:`~{_data_home(module, n)}.{n}`" for n in data)
            lines += [f"Data: {refs}.", ""]
    children = [c for c in API_MODULES if c.rpartition(".")[0] == name]
    if children:
        lines += [".. rubric:: Modules", "", ".. list-table::", "   :widths: 30 70", ""]
        for child in children:
            summary = _summary(importlib.import_module(child))
            lines += [f"   * - :mod:`{child}`", f"     - {summary}"]
        lines += ["", ".. toctree::", "   :hidden:", ""] + [f"   {c}" for c in children]
    return "\n".join(lines) + "\n"


def write_api_pages(app) -> None:
    """One page per public module under ``api/generated/`` (rewritten only when changed)."""
    folder = Path(app.srcdir) / "api" / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    for name in API_MODULES:
        page = folder / f"{name}.rst"
        text = _module_page(name)
        if not page.exists() or page.read_text() != text:
            page.write_text(text)
    for page in folder.glob("*.rst"):  # modules that were renamed or removed
        if page.stem not in API_MODULES:
            page.unlink()


# -- intersphinx: local inventories only (no network at build time) ----------------------
# Fetched from Debian's python3.11-doc and python-scipy-doc packages. PyTorch, geoopt and
# NumPy publish their inventories only on their own sites, which this build cannot reach.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3.11/", "_intersphinx/python.inv"),
    "scipy": ("https://docs.scipy.org/doc/scipy-1.10.1/", "_intersphinx/scipy.inv"),
}

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = "riemfip"
html_static_path: list[str] = []
html_show_sourcelink = False

# -- matplotlib plot directive (the architecture diagram) ---------------------------------
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("svg", 100), ("png", 100)]

# -- sphinx-gallery ----------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "_ext.gallery.ExampleOrder",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "reset_modules": ("matplotlib", "_ext.gallery.reset_torch"),
    "min_reported_time": 1,
    "show_memory": False,
    "backreferences_dir": None,
    "doc_module": (),
}

# Cross-references to a re-exported name (``manifolds.PullbackMetric``) resolve to where the
# object is documented (``manifolds.pullback.PullbackMetric``).


def _canonical_name(target: str) -> str | None:
    """Where the object named ``target`` is defined (``module.qualname`` plus any attribute
    path below its class), or ``None`` when ``target`` does not import."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        home, rest = None, []
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
                module = getattr(obj, "__module__", None)
                qualname = getattr(obj, "__qualname__", None)
                if isinstance(module, str) and isinstance(qualname, str) and not rest:
                    home = f"{module}.{qualname}"
                else:
                    rest.append(attr)
        except AttributeError:
            return None
        return ".".join([home, *rest]) if home else None
    return None


def _resolve_reexport(app, env, node, contnode):
    """Resolve a Python reference that Sphinx could not: the target read in the context of
    the module (and class) it was written in, then mapped to where the object is defined."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates += [f"{module}.{cls}.{target}"] if cls else []
        candidates.append(f"{module}.{target}")
    # last, a public name written unqualified
    candidates += [f"manifolds.{target}", f"riemfip.{target}"]
    domain = env.get_domain("py")
    for candidate in candidates:
        if not candidate.startswith(("manifolds.", "riemfip.")):
            continue
        canonical = _canonical_name(candidate) or candidate
        if canonical == target:
            continue
        ref = domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode
        )
        if ref is not None:
            return ref
    return None


def _keep_enum_members(app, what, name, obj, skip, options):
    """Document the members of an enum (``Status.CONVERGED``) although they have no docstring."""
    return False if isinstance(obj, enum.Enum) else None


def setup(app):
    app.connect("autodoc-skip-member", _keep_enum_members)
    app.connect("builder-inited", write_api_pages)
    app.connect("missing-reference", _resolve_reexport)

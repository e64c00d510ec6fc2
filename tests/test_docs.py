"""The documentation: a Sphinx build with warnings as errors (the gallery executed once, on
the CPU, offline), every public name in the API reference, the doctests in docstrings, and
the getting-started snippets."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pkgutil
import posixpath
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((ROOT / "examples").glob("plot_*.py"))


def docstring_examples() -> dict[str, list[doctest.DocTest]]:
    """The docstring examples of every module of both packages, by module."""
    found = {}
    for package in ("manifolds", "riemfip"):
        names = [package] + [
            m.name
            for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")
        ]
        for name in names:
            module = importlib.import_module(name)
            tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
            if tests:
                found[name] = tests
    return found


DOCTESTS = docstring_examples()


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> Path:
    """HTML built once into a temporary folder: ``-W`` (every warning is an error), a fresh
    environment, and every gallery example executed (``run_stale_examples``) rather than
    taken from an earlier build's cache. One thread: the examples are small, and two
    OpenMP threads on a busy 2-core machine made one of them 20x slower."""
    out = tmp_path_factory.mktemp("docs")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-E", "-q"]
    cmd += ["-D", "sphinx_gallery_conf.run_stale_examples=1"]
    cmd += ["-d", str(out / "doctrees"), str(DOCS), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_docs_build_with_warnings_as_errors(built_docs):
    for page in ("index", "getting_started", "theory/geodesics", "api/index", "benchmarks"):
        assert (built_docs / f"{page}.html").is_file(), page
    assert (built_docs / "objects.inv").is_file()


def test_gallery_ran_every_example_and_drew_its_figures(built_docs):
    assert len(EXAMPLES) >= 6
    for example in EXAMPLES:
        page = built_docs / "auto_examples" / f"{example.stem}.html"
        assert page.is_file(), example.name
        figures = list((built_docs / "_images").glob(f"sphx_glr_{example.stem}_0*.png"))
        assert figures, f"{example.name} drew no figure"


def test_every_public_name_is_in_the_api_reference(built_docs):
    """Each public module has a page, and each name in its ``__all__`` (or, without one,
    each public name it defines) is documented there or where it is defined."""
    from sphinx.util.inventory import InventoryFile

    spec = importlib.util.spec_from_file_location("riemfip_docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    with open(built_docs / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    documented = {n for kind, names in inventory.items() if kind.startswith("py:") for n in names}
    missing = []
    for name in conf.API_MODULES:
        module = importlib.import_module(name)
        own, reexported = conf.public_names(module)
        if name not in documented:
            missing.append(name)
        missing += [f"{name}.{n}" for n in own if f"{name}.{n}" not in documented]
        for n in reexported:
            obj = getattr(module, n)
            home = (
                conf._canonical_name(f"{name}.{n}")
                if conf._is_code(obj)
                else f"{conf._data_home(module, n)}.{n}"
            )
            if home not in documented:
                missing.append(f"{name}.{n} (defined as {home})")
    assert not missing, f"public names missing from the API reference: {missing}"


@pytest.mark.parametrize("module", sorted(DOCTESTS))
def test_docstring_examples(module):
    """The ``>>>`` examples in a module's docstrings run and print what they say (``doctest``;
    examples marked ``+SKIP`` are shown, not run)."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in DOCTESTS[module]:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


@pytest.mark.parametrize("snippet", ["first_geodesic.py", "first_fip.py"])
def test_getting_started_snippet_runs(snippet, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the docs build: small work, a busy machine
    try:
        runpy.run_path(str(DOCS / "snippets" / snippet), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    if snippet == "first_geodesic.py":
        assert out.startswith("CONVERGED"), out
    else:
        assert "digits 5-9" in out and "AnchorDrift" in out, out

"""``python -m riemfip``: the ``riemfip`` command (:mod:`riemfip.cli`)."""

from riemfip.cli import main

if __name__ == "__main__":  # importing the module (doctest discovery, autodoc) runs nothing
    raise SystemExit(main())

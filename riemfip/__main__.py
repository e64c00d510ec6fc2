"""``python -m riemfip``: the ``riemfip`` command (:mod:`riemfip.cli`)."""

from riemfip.cli import main

raise SystemExit(main())

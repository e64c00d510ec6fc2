"""What a run tells the person watching it: stage lines and tqdm bars on stderr, or nothing.

``--quiet`` silences both; errors are printed by :mod:`riemfip.cli.command` regardless.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["Progress"]


class Progress:
    """Stage lines and progress bars, on stderr, unless ``quiet``.

    Parameters
    ----------
    quiet : bool
        Print nothing (the library calls get ``progress=False`` through :attr:`on`).
    """

    def __init__(self, quiet: bool = False):
        self.quiet = bool(quiet)

    @property
    def on(self) -> bool:
        """Whether the library's own bars should show (their ``progress`` argument)."""
        return not self.quiet

    def say(self, text: str) -> None:
        """One line on stderr, written so that it does not break an open bar."""
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def bar(self, total: int, desc: str, *, initial: int = 0, unit: str = "it") -> tqdm:
        """A tqdm bar with ETA on stderr (disabled when quiet); close it, or use ``with``."""
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            disable=self.quiet,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )

"""``riemfip``: the parser, the run of one subcommand, and what reaches the terminal.

Exit codes: 0 done; 2 bad input (one line on stderr, ``--out`` left as it was) or a
usage error; 130 interrupted (Ctrl-C or SIGTERM; the finished steps stay in
``--out/checkpoints`` for ``--resume``).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from riemfip import __version__
from riemfip.plotting import pyplot

from . import bench, connect, continual, demo, ensemble, sparsify, train
from .config import RUN_CONTROL, UsageError, check_ranges, config_defaults, read_config
from .progress import Progress
from .run_folder import RunFolder

__all__ = ["COMMANDS", "build_parser", "main"]

#: The subcommands, in the order ``riemfip --help`` lists them.
COMMANDS = {m.NAME: m for m in (demo, train, connect, continual, sparsify, ensemble, bench)}

_EPILOG = """examples:
  riemfip demo                                  # the main job, about 2 minutes on 2 cores
  riemfip train --seed 0 --out runs/a && riemfip train --seed 1 --out runs/b
  riemfip connect runs/a/model.pt runs/b/model.pt --out runs/ab
  riemfip demo --out runs/demo --resume         # continue an interrupted run
  riemfip SUBCOMMAND --help                     # its options and an example

Every run writes to --out: record.json, PNG plots and report.html (open it in a browser)."""


def _plain(doc: str) -> str:
    """A docstring without its reST markup, for ``--help``."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written; an option's default after its help, unless
    the option has none (``None``, or an unset flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    run = parser.add_argument_group("run options (every subcommand)")
    run.add_argument(
        "--out",
        type=Path,
        default=Path(f"riemfip-{name}"),
        help="output folder; refused if not empty, unless --resume or --force",
    )
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument(
        "--force",
        action="store_true",
        help="start over in a non-empty --out (its checkpoints "
        "are deleted, its record, plots and page replaced)",
    )
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--device", default="cpu", help="torch device")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the networks here are small, and on a busy machine idle "
        "threads spin and multiply the time",
    )
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE.toml",
        help="read options from a "
        "TOML file (keys are option names: epochs = 3); the command line takes precedence",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``riemfip`` parser and each subcommand's."""
    parser = argparse.ArgumentParser(
        prog="riemfip",
        description="Riemannian optimization in the weight space of neural networks: "
        "geodesics between trained networks and functionally invariant paths (FIP).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"riemfip {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    parsers = {}
    for name, module in COMMANDS.items():
        sub = subs.add_parser(
            name,
            help=module.SUMMARY,
            description=_plain(module.__doc__.split(": ", 1)[1]),
            epilog=f"example:\n  {module.EXAMPLE}",
            formatter_class=_HelpFormatter,
        )
        module.add_arguments(sub)
        _add_common_arguments(sub, name)
        parsers[name] = sub
    return parser, parsers


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with ``--config``, parse again with the file's values as defaults."""
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    if args.config is not None:
        sub = parsers[args.command]
        sub.set_defaults(
            **config_defaults(sub, read_config(args.config), f"--config {args.config}")
        )
        args = parser.parse_args(argv)
    return args


def _options(args: argparse.Namespace) -> dict:
    """The options that decide what a run computes (a resumed run must repeat them)."""
    out = {}
    for key, value in vars(args).items():
        if key in RUN_CONTROL or key == "command":
            continue
        out[key] = str(value.expanduser().resolve()) if isinstance(value, Path) else value
    return out


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return device


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a ``kill``) stops the run as Ctrl-C does."""

    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run ``riemfip`` with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name, folder = (argv[0] if argv else "riemfip"), None
    try:
        with _sigterm_as_interrupt():
            args = _parse(argv)
            name, module = args.command, COMMANDS[args.command]
            progress = Progress(quiet=args.quiet)
            folder = RunFolder(
                args.out,
                name,
                _options(args),
                force=args.force,
                resume=args.resume,
                progress=progress,
                argv=argv,
            )
            folder.check()
            check_ranges(args, at_least={"threads": 1})
            torch.set_num_threads(args.threads)
            job = module.prepare(args, _device(args.device), progress)
            pyplot()  # every run ends with plots: without matplotlib, say so before it starts
            folder.start()
            outcome = module.execute(job, folder)
            folder.finish(outcome)
    except KeyboardInterrupt:
        message = folder.interrupted_message() if folder else f"riemfip {name}: interrupted"
        print(message, file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as err:
        # Bad input: checkpoints, datasets, options, folders (CheckpointError, UsageError and
        # TOMLDecodeError are ValueErrors; a missing file or folder an OSError).
        print(f"riemfip {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if not args.quiet:
        for line in [*outcome.lines, f"report: {folder.path('report.html')}"]:
            print(line)
    return 0

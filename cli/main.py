"""`dlsr` entry point. Each package registers its own subcommands; settings are built here, once."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from dlsr_monitor.cli import bench_cmd, config_cmd, monitor_cmd, notify_cmd, ops_cmd, trainer_cmd, triage_cmd
from dlsr_monitor.config import ConfigFileError, Settings, StartupError, load_settings, settings_error_lines


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The full command tree; subcommands come from each package's `commands.register`."""
    parser = _Parser(
        prog="dlsr", description="DLSR Monitor: streaming OOD and drift detection for image streams."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for register in (
        monitor_cmd.register,
        ops_cmd.register,
        notify_cmd.register,
        trainer_cmd.register,
        bench_cmd.register,
        config_cmd.register,
        triage_cmd.register,
    ):
        register(sub)
    for leaf in _leaves(parser):
        leaf.set_defaults(_prog=leaf.prog)
    return parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The direct subcommands of `parser` by name (empty for a leaf)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    children = subparsers(parser)
    if not children:
        return [parser]
    return [leaf for child in children.values() for leaf in _leaves(child)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        # argparse would report the missing COMMAND first; the unknown option is the real mistake.
        print(f"dlsr: error: unrecognized arguments: {argv[0]} (see 'dlsr --help')", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Name the subcommand whose --help lists the valid options, in one line.
        prog = getattr(args, "_prog", parser.prog)
        print(
            f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see '{prog} --help')", file=sys.stderr
        )
        return 2
    try:
        settings = load_settings()
    except ValidationError as exc:
        for line in settings_error_lines(exc, Settings):
            print(f"dlsr: {line}", file=sys.stderr)
        return 2
    except ConfigFileError as exc:
        print(f"dlsr: {exc}", file=sys.stderr)
        return 2
    try:
        rc = int(args.handler(args, settings) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at interpreter exit
        return rc
    except BrokenPipeError:  # `dlsr config show | head`: the reader has all it wanted
        _drop_stdout()
        return 0
    except StartupError as exc:
        print(f"dlsr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _drop_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on the closed pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests): nothing to flush there
        pass


if __name__ == "__main__":
    sys.exit(main())

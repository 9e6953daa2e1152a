"""The `amaas` console script. A stage command goes to the preloaded stage host where one is up
(pipelines.stagehost) before anything beyond the standard library is imported: such a command costs the
interpreter's start and little else. Every other command, and a stage the host does not take, goes to
pipelines.cli."""

from __future__ import annotations

import argparse
import sys

from pipelines import stagehost
from pipelines.stages import STAGES


def global_options(parser: argparse.ArgumentParser) -> None:
    """The options before the command, of every command."""
    parser.add_argument("--params", help="settings file (default: $AMAAS_PARAMS or ./params.yaml)")
    parser.add_argument("--root", help="project folder for data/, models/, reports/ (default: $AMAAS_ROOT or .)")
    parser.add_argument("-v", "--verbose", action="store_true")


def command_of(argv: list[str] | None) -> str | None:
    """The command `argv` names, found by the global options alone (no stage module imported), or None (the full
    parser then says what is wrong)."""
    first = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    global_options(first)
    first.add_argument("command", nargs="?")
    try:
        command: str | None = first.parse_known_args(argv)[0].command
    except argparse.ArgumentError:
        return None
    return command


def main() -> int:
    argv = sys.argv[1:]
    command = command_of(argv)
    if command in STAGES and (code := stagehost.delegate(command, argv)) is not None:
        return code
    from pipelines.cli import main as run_command

    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())

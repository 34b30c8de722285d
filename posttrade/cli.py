"""The `posttrade` command.

Each sub-command lives in its own module under `posttrade.commands` and exposes
`register(subparsers)`; this module only assembles them, so adding a command never
means editing another command's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under posttrade.commands, in the order `posttrade --help` lists them.
COMMANDS = ("run", "stack", "demo", "worker", "positions", "reconcile", "validate", "forget")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrade", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"posttrade.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"posttrade.commands.{name}":
                continue  # not written yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``sdb`` command: one parser over the command modules; this file only dispatches.

Each command builds the same config the jobs and tests use and calls the same recipe; local
recipes run through ``sdb_core``, admin commands on a data dir through ``service``, client
commands over HTTP through ``sdb_client``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class Parser(argparse.ArgumentParser):
    """argparse, with an API key given in the wrong place (a positional, ``--url KEY``) never echoed in its
    usage errors; the subcommands' parsers are of this class too."""

    def error(self, message: str):
        from .console import redact

        super().error(redact(message))


def build_parser() -> argparse.ArgumentParser:
    from . import admin, distill, files, jobs, protect, transfer

    p = Parser(prog="sdb", description="Safe Distillation Box: protect, serve and distill models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (protect, distill, admin, jobs, files, transfer):
        module.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:  # the command modules import inside too (numpy, torch: a second or more), so a Ctrl-C then is one line
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except (ValueError, PermissionError, FileNotFoundError) as e:
        from .console import err

        err(str(e))
        return 2
    except KeyboardInterrupt:
        print("sdb: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

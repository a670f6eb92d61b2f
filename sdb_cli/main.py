"""The ``sdb`` command: one parser over the command modules; this file only dispatches.

Each command builds the same config the jobs and tests use and calls the same recipe; local
recipes run through ``sdb_core``, admin commands on a data dir through ``service``, client
commands over HTTP through ``sdb_client``.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


class DefaultsShown(argparse.HelpFormatter):
    """``--help`` gives each flag's default after its help, unless the help says it already (or there is none to
    give: no value, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, "")
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """argparse, with an API key given in the wrong place (a positional, ``--url KEY``) never echoed in its
    usage errors, and every flag's default in its help; the subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)

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
    for stream in (sys.stdout, sys.stderr):  # a name or label the terminal's encoding lacks, escaped, not an exit 2
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
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
    except BrokenPipeError:  # its reader stopped (`sdb files list --json | head`): nothing more to say, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would raise again
        return 141  # as a shell reports a process killed by SIGPIPE
    except Exception as e:
        # the CLI's own imports stay light: SQLAlchemy's only once something is raised
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(e, SQLAlchemyError):
            raise
        from .console import err

        # The driver's reason, first line: SQLAlchemy's own text holds the statement and its parameters (a new key's
        # secret hash, for one), and a PostgreSQL DETAIL line the values of a row.
        reason = str(getattr(e, "orig", None) or type(e).__name__).strip().splitlines()
        err(f"the data dir's store refused this ({reason[0] if reason else type(e).__name__}): check that it is "
            "writable and has room, or that its database is up (SDB_DATABASE_URL), then run it again")
        return 2


if __name__ == "__main__":
    sys.exit(main())

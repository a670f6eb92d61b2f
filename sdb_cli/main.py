"""The ``sdb`` command: one parser over the command modules; this file only dispatches.

Each command builds the same config the jobs and tests use and calls the same recipe; local
recipes run through ``sdb_core``, admin commands on a data dir through ``service``, client
commands over HTTP through ``sdb_client``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence


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


class Terminated(BaseException):
    """A SIGTERM (a CI cancel, Kubernetes stopping a pod) or a SIGHUP (the terminal closed), raised where the
    command is, as a Ctrl-C is: the same cleanups run (a download's ``.part``, the bundle writer's temporary copy)
    before ``sdb`` exits 128 + the signal's number, as a shell reports a process the signal killed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class _Signals:
    """The signal handlers ``main`` runs under. A Ctrl-C that lands inside a C extension's import (onnxruntime's)
    can come out as the extension's own ImportError with no KeyboardInterrupt chained to it: ``interrupted``
    remembers that one arrived."""

    def __init__(self) -> None:
        self.interrupted = False

    def on_sigint(self, signum, frame) -> None:
        self.interrupted = True
        raise KeyboardInterrupt  # what Python's own handler does

    @staticmethod
    def on_termination(signum, frame) -> None:
        raise Terminated(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        wanted = {signal.SIGINT: self.on_sigint, signal.SIGTERM: self.on_termination}
        if hasattr(signal, "SIGHUP"):
            wanted[signal.SIGHUP] = self.on_termination
        before = {}
        try:
            for signum, handler in wanted.items():
                if signal.getsignal(signum) in (signal.SIG_IGN, None):  # nohup's SIGHUP, a background job's
                    continue  # SIGINT, or a handler set outside Python (it could not be put back): kept
                before[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread (main called from a thread): Python's own handling stays
            pass
        try:
            yield
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)


def _interrupt_in_chain(e: BaseException) -> bool:
    """Whether ``e`` was raised because of a Ctrl-C: a KeyboardInterrupt among its causes or contexts (an import
    that a Ctrl-C broke is re-raised by the package as an ImportError of its own)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def main(argv: Sequence[str] | None = None) -> int:
    signals = _Signals()
    with signals.installed():
        try:
            return _dispatch(argv)
        except KeyboardInterrupt:
            return _interrupted()
        except Terminated as e:
            print(f"sdb: {e} received: stopped", file=sys.stderr)
            return e.exit_code
        except Exception as e:
            if signals.interrupted or _interrupt_in_chain(e):
                return _interrupted()
            raise


def _interrupted() -> int:
    print("sdb: interrupted", file=sys.stderr)
    return 130


def _dispatch(argv: Sequence[str] | None) -> int:
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
    except BrokenPipeError:  # its reader stopped (`sdb files list --json | head`): nothing more to say, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would raise again
        return 141  # as a shell reports a process killed by SIGPIPE
    except OSError as e:  # a path below a file, a full disk, stdout on /dev/full: the reason, not a traceback
        return _os_error(e)
    except Exception as e:
        # the CLI's own imports stay light: SQLAlchemy's only once something is raised
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(e, SQLAlchemyError) or _interrupt_in_chain(e):
            raise
        from .console import err

        # The driver's reason, first line: SQLAlchemy's own text holds the statement and its parameters (a new key's
        # secret hash, for one), and a PostgreSQL DETAIL line the values of a row.
        reason = str(getattr(e, "orig", None) or type(e).__name__).strip().splitlines()
        err(f"the data dir's store refused this ({reason[0] if reason else type(e).__name__}): check that it is "
            "writable and has room, or that its database is up (SDB_DATABASE_URL), then run it again")
        return 2


def _os_error(e: OSError) -> int:
    from .console import err

    where = " ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    err(f"{e.strerror or e}{': ' + where if where else ''}")
    if e.filename is None:  # stdout or stderr itself (a full disk, /dev/full): Python's exit flush would fail again
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 2


if __name__ == "__main__":
    sys.exit(main())

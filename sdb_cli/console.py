"""What every ``sdb`` command prints with: errors on stderr, a progress bar, the data-dir settings."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from service.settings import Settings


def redact(text: str) -> str:
    """``text`` with every API key's secret replaced by an ellipsis: what no message may echo, e.g. a key given where
    a URL or an argument goes. Its id stays, to tell which key it was. The SDK's pattern, which takes a key cut short
    or run on too (a secret of 63 digits was echoed whole)."""
    from sdb_client._base import _KEY_LIKE  # here: the SDK imports numpy, which a usage error needs not

    return _KEY_LIKE.sub(r"\1…", text)


def err(msg: str) -> None:
    print(f"sdb: error: {redact(msg)}", file=sys.stderr)


def progress_bar(desc: str):
    """A tqdm bar on stderr fed by the training loop's progress callback."""
    from tqdm import tqdm

    bars: list = []  # one bar per fit: a self-checking wrap fits once per attempt

    def update(p) -> None:
        if not bars:
            bars.append(tqdm(total=1000, desc=desc, file=sys.stderr, leave=False, disable=None,
                             bar_format="{desc} {percentage:3.0f}%|{bar:24}| {elapsed}<{remaining} {postfix}"))
        bar = bars[0]
        attempt = f" attempt {p.metrics['attempt']}" if "attempt" in p.metrics else ""
        bar.set_description_str(f"{desc}{attempt} epoch {p.epoch}/{p.epochs}")
        bar.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in list(p.metrics.items())[:3] if k != "attempt"))
        bar.n = int(p.fraction * 1000)
        bar.refresh()
        if p.fraction >= 1.0 or (p.epoch == p.epochs and p.step == p.steps):
            bars.pop().close()

    return update


def data_settings(args) -> Settings:
    if getattr(args, "data_dir", None):
        return Settings.load({"data_dir": "data-dir"}, data_dir=Path(args.data_dir))
    return Settings.load()



def add_training_flags(sp, epochs: int, lr: float = 0.01, batch: int = 64) -> None:
    """The flags of a command that trains: epochs, learning rate, batch size, seed, data dir."""
    sp.add_argument("--epochs", type=int, default=epochs)
    sp.add_argument("--lr", type=float, default=lr)
    sp.add_argument("--batch-size", type=int, default=batch)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--data-dir", help="data directory (master key, bundles); env SDB_DATA_DIR")


class SDKWaits:
    """While open, the SDK's retry waits (a 429's Retry-After, a restarting server) are ``sdb: ...`` lines on
    stderr, so that a command that waits says why rather than hanging silently."""

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:  # sys.stderr as it is now, not when the handler was made
            print(f"sdb: {redact(record.getMessage())}", file=sys.stderr, flush=True)

    def __enter__(self) -> None:
        self.log, self.handler = logging.getLogger("sdb_client"), self._Handler(logging.INFO)
        self.level = self.log.level
        self.log.addHandler(self.handler)
        if not self.log.isEnabledFor(logging.INFO):
            self.log.setLevel(logging.INFO)

    def __exit__(self, *_: object) -> None:
        self.log.removeHandler(self.handler)
        self.log.setLevel(self.level)


def _page_size(text: str) -> int:
    from sdb_client._base import PAGE_MOST

    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= PAGE_MOST:
        raise argparse.ArgumentTypeError(f"takes 1 to {PAGE_MOST} (--all lists every one), not {text!r}")
    return n


def add_list_flags(sp, what: str, default: int) -> None:
    """``--limit`` and ``--all`` of a command that lists ``what`` from a server (newest first, a page at a time)."""
    from sdb_client._base import PAGE_MOST

    one = sp.add_mutually_exclusive_group()
    one.add_argument("--limit", type=_page_size, metavar="N",
                     help=f"the newest N {what}, 1 to {PAGE_MOST} (default: the server's, {default})")
    one.add_argument("--all", action="store_true", help=f"all the {what}, however many (read a page at a time)")


def listed(api, args, what: str, **filters) -> list[dict]:
    """The rows a ``list`` command prints, from ``api`` (the SDK's ``client.jobs``, ``client.files``): every one with
    ``--all``, else one page; a page with more after it says so on stderr (stdout stays the rows alone)."""
    if args.all:
        return api.list(all=True, **filters)
    page = api.list(limit=args.limit, **filters)
    if page.next is not None:
        print(f"sdb: more {what} than these {len(page)}: --all lists every one (--limit N: the newest N)",
              file=sys.stderr)
    return page


def over_http(args, run, *, needs_key: str | None = None) -> int:
    """``run(client, args)`` with an SDK client on ``--url``/``--api-key`` (or their env); an SDK error
    (unreachable, 4xx) is a message and exit 2. ``needs_key`` (the scopes, in words) refuses a call without a
    key before any request, naming where the key goes."""
    from sdb_client import Client, SDBError

    try:
        client = Client(args.url, args.api_key)
    except SDBError as e:
        raise ValueError(str(e)) from None
    if needs_key and not client.has_key:
        client.close()
        raise ValueError(f"this needs an API key with the {needs_key} scope: --api-key KEY or env SDB_API_KEY")
    try:
        with client, SDKWaits():
            return run(client, args)
    except SDBError as e:
        err(str(e))
        return 2

"""The order `make test` hands files to its workers: the slow ones first (tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

from .conftest import SLOW_FIRST

ROOT = Path(__file__).resolve().parents[1]


def test_every_file_named_slow_exists_once():
    """A renamed or removed file would lose its place silently: the suite's tail would grow again unseen."""
    assert [p for p in SLOW_FIRST if not (ROOT / p).is_file()] == []
    assert len(set(SLOW_FIRST)) == len(SLOW_FIRST)


def test_the_collected_order_starts_with_the_slow_files(request):
    files = list(dict.fromkeys(item.nodeid.split("::", 1)[0] for item in request.session.items))
    if len(files) > len(SLOW_FIRST):  # the whole suite collected (a single file run holds no order to check)
        assert files[:len(SLOW_FIRST)] == list(SLOW_FIRST), files[:len(SLOW_FIRST)]

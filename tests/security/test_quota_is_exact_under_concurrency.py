"""Hole 3: a key's sample quota is exact under concurrency.

Many clients drawing keyed batches at once, from one server process or from two sharing one store,
are served exactly the quota between them and never a sample more; a windowed quota gives exactly
the quota again once its window has passed. Before the fix the quota counter was cached per process
and a write-behind flush dropped the cached row, so the usage it held counted as zero: requests that
charged after a flush (or in another process) got the quota again.
"""
from __future__ import annotations

import json
import threading
import time
import types
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from service.auth import Keyring, create_key
from service.errors import ApiError
from service.store import Store
from tests.service.conftest import Server
from tests.service.jobs_helpers import key, prepare, together

MODEL = "digits-a"
CLIENTS = 12
HAMMER_S = 1.0  # how long the HTTP clients keep asking once refused
# A fast write-behind, so that the flushes fall between the requests (the old hole's trigger).
# The clients hammer as fast as they can: the per-key request rate (its own test) is off here.
SERVER_ENV = {"SDB_USAGE_FLUSH_S": "0.01", "SDB_REGISTER_DEMO": "false", "SDB_MODELS_SYNC_S": "0.2",
              "SDB_RATE_LIMIT_KEY_PER_S": "0"}




def _drain(charge: Callable[[int], bool], ceiling: int, until: float = 0.0) -> int:
    """One client: batches of 3 while they are granted, then single samples until refused and, like
    an attacker who keeps asking, until ``until`` (monotonic clock); samples served. Stops past
    ``ceiling``, more than the whole quota: a hole would otherwise never end."""
    served = 0
    for size in (3, 1):
        while served <= ceiling:
            if charge(size):
                served += size
            elif size == 3 or time.monotonic() >= until:
                break
    return served


# ------------------------------------------------------------------ the keyring on a store


def test_keyrings_sharing_a_store_charge_exactly_the_quota(db_url):
    # Two keyrings on two engines: two server processes. The write-behind flushes while they charge.
    quota = 150
    stores = [Store(db_url), Store(db_url)]
    try:
        _, api_key = create_key(stores[0], b"p" * 32, scopes=["distill"], quota=quota)
        keyrings = [Keyring(s, b"p" * 32) for s in stores]
        done = threading.Event()

        def flusher() -> None:
            while not done.is_set():
                for k in keyrings:
                    k.flush()
                done.wait(0.005)

        def client(i: int) -> int:
            def charge(n: int) -> bool:
                try:
                    keyrings[i % 2].charge(api_key, n)
                    return True
                except ApiError as e:
                    assert (e.status, e.code) == (429, "quota_exceeded"), e.message
                    return False
            return _drain(charge, quota)

        background = threading.Thread(target=flusher)
        background.start()
        try:
            served = sum(together(16, client))
        finally:
            done.set()
            background.join()
        for k in keyrings:
            k.flush()
        assert served == quota, f"served {served} samples on a quota of {quota}"
        assert stores[0].get_key(api_key.id).used == quota
    finally:
        for s in stores:
            s.close()


def test_a_key_without_a_quota_revoked_by_another_process_is_refused_at_once(db_url):
    # Its charge reads the store rather than writing it (no write lock per keyed request): the read must still see
    # a revocation made through another process's store at once, and its samples are counted, once, behind.
    stores = [Store(db_url), Store(db_url)]
    try:
        _, api_key = create_key(stores[0], b"p" * 32, scopes=["distill"])
        keyring = Keyring(stores[0], b"p" * 32)
        keyring.charge(api_key, 3)
        stores[1].revoke_key(api_key.id)
        with pytest.raises(ApiError) as e:
            keyring.charge(api_key, 1)
        assert e.value.status == 401 and e.value.code == "key_revoked"
        keyring.flush()
        keyring.flush()
        assert stores[1].get_key(api_key.id).used == 3
    finally:
        for s in stores:
            s.close()


def test_window_rollover_is_atomic_and_never_restarts_a_window(db_url, monkeypatch):
    # A clock the test moves: the window passes without waiting for it, and the second keyring's
    # process lags behind the first (clocks of two hosts differ).
    quota, window = 40, 60
    clock = {"now": 6000.0 * window + 1.0}
    fake = types.SimpleNamespace(time=lambda: clock["now"], monotonic=time.monotonic, gmtime=time.gmtime,
                                 strftime=time.strftime)
    monkeypatch.setattr("service.auth.time", fake)
    stores = [Store(db_url), Store(db_url)]
    try:
        _, api_key = create_key(stores[0], b"p" * 32, scopes=["distill"], quota=quota, quota_window_s=window)
        keyrings = [Keyring(s, b"p" * 32) for s in stores]

        def draw() -> int:
            def client(i: int) -> int:
                def charge(n: int) -> bool:
                    try:
                        keyrings[i % 2].charge(api_key, n)
                    except ApiError as e:
                        assert (e.status, e.code) == (429, "quota_exceeded"), e.message
                        assert 1 <= int(e.headers["Retry-After"]) <= window
                        return False
                    keyrings[i % 2].flush()  # the write-behind, between every two charges
                    return True
                return _drain(charge, quota)
            return sum(together(8, client))

        assert draw() == quota
        clock["now"] += window  # the next window: the quota again, and no more
        assert draw() == quota
        clock["now"] -= window  # a lagging clock does not reopen the window it left
        assert draw() == 0
        clock["now"] += 2 * window
        assert draw() == quota
    finally:
        for s in stores:
            s.close()


# ------------------------------------------------------------------ the real server


def _draw_over_http(urls: list[str], token: str, x: np.ndarray, quota: int,
                    retry_after_max: int | None = None) -> int:
    """CLIENTS concurrent HTTP clients spread over ``urls`` until each is refused; samples served."""
    headers = {"Authorization": f"Bearer {token}"}
    until = time.monotonic() + HAMMER_S

    def client(i: int) -> int:
        with httpx.Client(base_url=urls[i % len(urls)], timeout=60) as c:
            def charge(n: int) -> bool:
                r = c.post(f"/v1/models/{MODEL}/distill", json={"inputs": x[:n].tolist()}, headers=headers)
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "quota_exceeded", r.text
                    if retry_after_max is not None:
                        assert 1 <= int(r.headers["retry-after"]) <= retry_after_max
                    return False
                assert r.status_code == 200, r.text
                assert np.asarray(r.json()["logits"]).shape[0] == n
                return True
            return _drain(charge, quota, until)

    return sum(together(CLIENTS, client))


def _servers(tmp_path, bundles, n: int, **kw) -> tuple[list[Server], str]:
    data = tmp_path / "data"
    settings = prepare(data, bundles, {MODEL: bundles.a})
    token = key(settings, ["distill"], models=[MODEL], **kw)
    servers: list[Server] = []
    try:
        for _ in range(n):  # one data dir, one store: the processes share the counter
            servers.append(Server(data, bundles, SERVER_ENV))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers, token


def _used(tmp_path, token: str) -> int:
    from service.auth import parse_token
    from service.settings import Settings

    store = Store(Settings(data_dir=tmp_path / "data").db_url)
    try:
        return store.get_key(parse_token(token)[0]).used
    finally:
        store.close()


def _draw_exactly_the_quota(tmp_path, bundles, n_servers: int, quota: int = 150) -> None:
    """Concurrent clients spread over ``n_servers`` processes on one store draw the quota, no more, no less."""
    servers, token = _servers(tmp_path, bundles, n_servers, quota=quota)
    try:
        served = _draw_over_http([s.url for s in servers], token, bundles.x, quota)
    finally:
        for s in servers:
            s.stop()
    assert served == quota, f"{n_servers} server(s) served {served} keyed samples on a quota of {quota}"
    assert _used(tmp_path, token) == quota


def test_concurrent_clients_on_one_server_draw_exactly_the_quota(tmp_path, bundles):
    _draw_exactly_the_quota(tmp_path, bundles, 1)


def test_requests_checked_before_a_flush_cannot_spend_the_quota_again(tmp_path, bundles):
    # The old hole, step by step: requests whose key is checked (headers sent) before a write-behind
    # flush and whose samples are charged (body sent) after it, once the quota was drawn.
    quota = 10
    servers, token = _servers(tmp_path, bundles, 1, quota=quota)
    url, headers = servers[0].url, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    one = json.dumps({"inputs": bundles.x[:1].tolist()}).encode()
    release, slow_out = threading.Event(), []

    def slow() -> None:
        def body():
            release.wait(60)
            yield one
        with httpx.Client(base_url=url, timeout=60) as c:
            slow_out.append(c.post(f"/v1/models/{MODEL}/distill", content=body(), headers=headers).status_code)

    try:
        threads = [threading.Thread(target=slow) for _ in range(quota)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # their keys are checked; the bodies wait
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(quota):  # the whole quota, one sample at a time
                r = c.post(f"/v1/models/{MODEL}/distill", content=one, headers=headers)
                assert r.status_code == 200, r.text
        time.sleep(0.5)  # flushes (SDB_USAGE_FLUSH_S is 0.01 s) write the counter behind
        release.set()
        for t in threads:
            t.join(60)
    finally:
        release.set()
        for s in servers:
            s.stop()
    assert sorted(slow_out) == [429] * quota, f"{slow_out.count(200)} samples served past a spent quota of {quota}"
    assert _used(tmp_path, token) == quota


def test_two_server_processes_on_one_store_draw_exactly_the_quota(tmp_path, bundles, db_url):
    _draw_exactly_the_quota(tmp_path, bundles, 2)


def _next_window(window: int) -> float:
    """Sleep until just after the next window starts (windows are aligned to multiples of their length)."""
    now = time.time()
    start = now - now % window + window
    time.sleep(start + 0.1 - now)
    return start


def test_window_rollover_gives_the_quota_again_and_no_more(tmp_path, bundles):
    quota, window = 12, 5
    servers, token = _servers(tmp_path, bundles, 2, quota=quota, quota_window_s=window)
    try:
        for phase in range(2):
            start = _next_window(window)
            served = _draw_over_http([s.url for s in servers], token, bundles.x, quota, window)
            took = time.time() - start
            assert took < window, f"phase {phase} ran past its window ({took:.1f} s): too slow to tell"
            assert served == quota, f"window {phase}: served {served} keyed samples on a quota of {quota}"
    finally:
        for s in servers:
            s.stop()


# ------------------------------------------------------------------ what a refusal costs


@pytest.mark.anyio
async def test_a_refused_charge_costs_no_model_time(svc, monkeypatch):
    # v2 asks for both outputs in one request: its public half must not run when the keyed half is refused.
    from service.registry import HostedModel

    calls: list[bool] = []
    logits = HostedModel.logits

    async def counted(self, x, keyed=False, caller=None, gate=None):
        calls.append(keyed)
        return await logits(self, x, keyed, caller, gate)

    monkeypatch.setattr(HostedModel, "logits", counted)
    h = svc.auth(svc.key(("distill",), quota=1))
    x = np.zeros((2, 1, 8, 8), np.float32)
    r = await svc.client.post(f"/v1/models/{MODEL}/distill", json={"inputs": x.tolist()}, headers=h)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    v2 = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
          "outputs": [{"name": "probabilities"}, {"name": "distill_logits"}]}
    r = await svc.client.post(f"/v2/models/{MODEL}/infer", json=v2, headers=h)
    assert r.status_code == 429 and r.json()["error"].startswith("2 samples asked, more than this key")  # v2: the message
    assert calls == []
    r = await svc.client.post(f"/v1/models/{MODEL}/distill", json={"inputs": x[:1].tolist()}, headers=h)
    assert r.status_code == 200 and calls == [True]


def test_charges_asked_together_read_a_key_once_and_each_is_answered_alone(db_url, monkeypatch):
    # The keyed requests of one model call are charged together, in its thread (MicroBatcher's gate): one read
    # for a key without a quota, however many requests; each still gets its own answer, a refusal refuses only
    # its own request, nothing counts twice, and a quota stays exact.
    store = Store(db_url)
    reads: list[str] = []
    stands = store.key_stands
    monkeypatch.setattr(store, "key_stands", lambda key_id, now: reads.append(key_id) or stands(key_id, now))
    try:
        keyring = Keyring(store, b"p" * 32)
        _, free = create_key(store, b"p" * 32, scopes=["distill"])
        _, gone = create_key(store, b"p" * 32, scopes=["distill"])
        _, capped = create_key(store, b"p" * 32, scopes=["distill"], quota=5)
        store.revoke_key(gone.id)
        refusals = keyring.charge_each([(free, 2)] * 4 + [(gone, 1)] + [(capped, 1)] * 8 + [(free, 2)] * 4)
        codes = [None if r is None else r.code for r in refusals]
        assert codes[:4] == codes[13:] == [None] * 4 and codes[4] == "key_revoked"
        assert codes[5:13] == [None] * 5 + ["quota_exceeded"] * 3
        assert reads.count(free.id) == 1  # one read for eight requests
        keyring.flush()
        assert store.get_key(free.id).used == 16 and store.get_key(gone.id).used == 0
        assert store.get_key(capped.id).used == 5
    finally:
        store.close()

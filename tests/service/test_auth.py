"""The authorization matrix: every protected route × every kind of key."""
from __future__ import annotations

import time

import numpy as np
import pytest
from sqlalchemy import update

from service.auth import hash_secret, parse_token
from service.store import ApiKeyRow

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]  # SQLite and PostgreSQL

X = np.zeros((2, 1, 8, 8), np.float32)
V2 = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}],
      "outputs": [{"name": "probabilities"}, {"name": "distill_logits"}]}

# route → (scope it needs, is it about one model, how to call it)
ROUTES = {
    "distill": ("distill", True, lambda c, h: c.post("/v1/models/digits-a/distill", json={"inputs": X.tolist()}, headers=h)),
    "v2-keyed": ("distill", True, lambda c, h: c.post("/v2/models/digits-a/infer", json=V2, headers=h)),
    "keys-create": ("admin", False, lambda c, h: c.post("/v1/keys", json={"scopes": ["predict"]}, headers=h)),
    "keys-list": ("admin", False, lambda c, h: c.get("/v1/keys", headers=h)),
    "keys-revoke": ("admin", False, lambda c, h: c.delete("/v1/keys/000000000000", headers=h)),
    "models-add": ("deploy", False, lambda c, h: c.post("/v1/models", json={"file": "file-" + "0" * 24}, headers=h)),
    "models-remove": ("admin", False, lambda c, h: c.delete("/v1/models/digits-b", headers=h)),
    "files-list": ("jobs", False, lambda c, h: c.get("/v1/files", headers=h)),
    "files-delete": ("jobs", False, lambda c, h: c.delete("/v1/files/file-" + "0" * 24, headers=h)),
}
WRONG_SCOPE = {"distill": ("predict", "jobs"), "admin": ("distill", "predict", "jobs", "deploy"),
               "deploy": ("distill", "predict", "jobs"), "jobs": ("distill", "predict")}


def expire(svc, token: str) -> None:
    key_id, _ = parse_token(token)
    with svc.app.state.store.session.begin() as s:
        s.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(expires_at=time.time() - 1))


def cases(svc, scope: str, per_model: bool) -> list[tuple[str, dict | None, set[int]]]:
    valid = svc.key((scope,), models=["digits-a"] if per_model else None)
    revoked = svc.key((scope,))
    svc.app.state.store.revoke_key(parse_token(revoked)[0])
    expired = svc.key((scope,), expires_days=1)
    expire(svc, expired)
    key_id, secret = parse_token(valid)
    unknown = f"sdb_{'0' * 12}_{secret}"
    wrong_secret = f"sdb_{key_id}_{'f' * 64}"
    assert hash_secret(svc.settings.pepper, key_id, secret) != hash_secret(svc.settings.pepper, key_id, "f" * 64)
    out = [("no key", None, {401}),
           ("malformed", {"Authorization": "Bearer not-a-key"}, {401}),
           ("wrong scheme", {"Authorization": f"Basic {valid}"}, {401}),
           ("unknown id", svc.auth(unknown), {401}),
           ("wrong secret", svc.auth(wrong_secret), {401}),
           ("revoked", svc.auth(revoked), {401}),
           ("expired", svc.auth(expired), {401})]
    out += [(f"scope {s}", svc.auth(svc.key((s,))), {403}) for s in WRONG_SCOPE[scope]]
    if per_model:
        out.append(("other model", svc.auth(svc.key((scope,), models=["digits-b"])), {403}))
    # a valid key reaches the route: what follows is the route's own answer
    out.append(("valid", svc.auth(valid), {200, 201, 400, 404}))
    return out


@pytest.mark.parametrize("route", list(ROUTES))
async def test_authorization_matrix(svc, route):
    scope, per_model, call = ROUTES[route]
    for case, headers, statuses in cases(svc, scope, per_model):
        r = await call(svc.client, headers or {})
        assert r.status_code in statuses, (route, case, r.status_code, r.text)
        body = r.json()
        if r.status_code >= 400 and route.startswith("v2"):  # the Open Inference Protocol's body
            assert set(body) == {"error"} and isinstance(body["error"], str), body
        elif r.status_code >= 400:
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        if r.status_code == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        if case == "valid" and scope == "distill":
            assert r.status_code == 200 and "logits" in r.text


async def test_public_routes_need_no_key_and_reject_bad_ones(svc):
    c = svc.client
    body = {"inputs": X.tolist()}
    assert (await c.post("/v1/models/digits-a/predict", json=body)).status_code == 200
    assert (await c.post("/v2/models/digits-a/infer", json={**V2, "outputs": [{"name": "probabilities"}]})).status_code == 200
    # a presented key must be valid, even where none is needed
    r = await c.post("/v1/models/digits-a/predict", json=body, headers={"Authorization": "Bearer sdb_x"})
    assert r.status_code == 401
    # keyed output on v2 without a key: 401, and nothing keyed in the body
    r = await c.post("/v2/models/digits-a/infer", json=V2)
    assert r.status_code == 401 and set(r.json()) == {"error"}
    # a predict-only key asking for the keyed output: 403
    r = await c.post("/v2/models/digits-a/infer", json=V2, headers=svc.auth(svc.key(("predict",))))
    assert r.status_code == 403 and set(r.json()) == {"error"}


async def test_secret_is_never_returned_or_logged(svc, caplog):
    token = svc.key(("admin",))
    r = await svc.client.get("/v1/keys", headers=svc.auth(token))
    assert token not in r.text and parse_token(token)[1] not in r.text
    bad = f"sdb_{'1' * 12}_{'a' * 64}"
    r = await svc.client.get("/v1/keys", headers=svc.auth(bad))
    assert bad not in r.text and "a" * 64 not in caplog.text
    assert parse_token(token)[1] not in (await svc.client.get("/metrics")).text


async def test_quota_429_and_window_retry_after(svc):
    c = svc.client
    token = svc.key(("distill",), quota=3)
    h = svc.auth(token)
    one = {"inputs": X[:1].tolist()}
    assert (await c.post("/v1/models/digits-a/distill", json={"inputs": X.tolist()}, headers=h)).status_code == 200
    assert (await c.post("/v1/models/digits-a/distill", json=one, headers=h)).status_code == 200
    r = await c.post("/v1/models/digits-a/distill", json=one, headers=h)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert "retry-after" not in r.headers and set(r.json()) == {"error"}
    # predict does not spend the distill quota
    assert (await c.post("/v1/models/digits-a/predict", json=one, headers=h)).status_code == 200

    windowed = svc.auth(svc.key(("distill",), quota=1, quota_window_s=3600))
    two = {"inputs": X[:2].tolist()}  # more than the whole quota: no wait helps, and the message says so
    r = await c.post("/v1/models/digits-a/distill", json=two, headers=windowed)
    assert r.status_code == 429 and "retry-after" not in r.headers, r.text
    assert r.json()["error"]["message"] == ("2 samples asked, more than this key's whole quota of 1 per 3600 s: "
                                            "send at most 1 at a time (smaller batches)")
    assert (await c.post("/v1/models/digits-a/distill", json=one, headers=windowed)).status_code == 200
    r = await c.post("/v1/models/digits-a/distill", json=one, headers=windowed)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 3600

    # a quota of 0 ("send at most 0 at a time (smaller batches)" said nothing): served nothing, at any size
    r = await c.post("/v1/models/digits-a/distill", json=one, headers=svc.auth(svc.key(("distill",), quota=0)))
    assert r.status_code == 429 and "quota is 0 samples: it is served nothing" in r.json()["error"]["message"], r.text


async def test_a_keyed_call_that_fails_after_its_charge_gives_the_samples_back(svc, monkeypatch):
    """A quota was charged before the model ran and stayed charged when it then failed (a timeout, out of memory,
    a NaN answer): every SDK before 2026-12-06 sent such a call again after its 503, and paid twice or more."""
    from sdb_core.bundle import Bundle
    from service.store import Store

    def out_of_memory(self, x, options=None):  # ONNX Runtime's own failure, as a bounded arena gives it
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")

    refund = Store.refund

    def slow_refund(self, *args):  # a store a little slow to answer: the refund is still made before the answer
        time.sleep(0.3)
        return refund(self, *args)

    c = svc.client
    two = X[:2].tolist()
    v2 = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": X[:2].ravel().tolist()}],
          "outputs": [{"name": "distill_logits"}]}
    for window in (None, 3600):
        h = svc.auth(svc.key(("distill",), quota=2, quota_window_s=window))
        with monkeypatch.context() as m:
            m.setattr(Bundle, "network_logits", out_of_memory)
            m.setattr(Store, "refund", slow_refund)
            r = await c.post("/v1/models/digits-a/distill", json={"inputs": two}, headers=h)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_out_of_memory", r.text
            r = await c.post("/v2/models/digits-a/infer", json=v2, headers=h)
            assert r.status_code == 503, r.text
            both = {**v2, "outputs": [{"name": "probabilities"}, {"name": "distill_logits"}]}  # one call, two paths
            r = await c.post("/v2/models/digits-a/infer", json=both, headers=h)
            assert r.status_code == 503, r.text
            # given back before the answer left: the public half's error no longer leaves while the refund is pending
            assert (await c.get("/v1/keys/me", headers=h)).json()["quota_used"] == 0
        assert (await c.get("/v1/keys/me", headers=h)).json()["quota_used"] == 0
        ok = await c.post("/v1/models/digits-a/distill", json={"inputs": two}, headers=h)
        assert ok.status_code == 200, ok.text  # the whole quota is there still
        assert (await c.get("/v1/keys/me", headers=h)).json()["quota_used"] == 2


async def test_quota_windows_are_aligned_to_the_epoch_not_to_the_key(svc):
    """Fixed windows (docs/api.md): each starts at a multiple of quota_window_s since 1970, whenever the key was made,
    so a key may be served twice its quota across a window's end, within a second."""
    from service.auth import window_start
    from service.routes.account import quota_used

    store = svc.app.state.store
    key_id = parse_token(svc.key(("distill",), quota=2, quota_window_s=60))[0]
    created = store.get_key(key_id).created_at
    end = (int(created) // 60 + 2) * 60  # a window's end 60 to 120 s after the key was made: not a multiple of it
    assert store.charge(key_id, 2, end - 0.5) == (2, end - 60)
    assert store.charge(key_id, 1, end - 0.4) is None  # the quota is spent in this window
    assert store.charge(key_id, 2, end + 0.5) == (2, end)  # and whole again a second later
    assert store.charge(key_id, 1, end + 0.6) is None
    assert window_start(60, end + 59.9) == end and window_start(86400, end) % 86400 == 0  # UTC midnights
    assert quota_used(store.get_key(key_id), end + 59.9) == 2 and quota_used(store.get_key(key_id), end + 60) == 0

    # over HTTP: a day's quota, spent, is whole again at the next 00:00 UTC (Retry-After says when)
    daily = svc.auth(svc.key(("distill",), quota=1, quota_window_s=86400))
    one = {"inputs": X[:1].tolist()}
    assert (await svc.client.post("/v1/models/digits-a/distill", json=one, headers=daily)).status_code == 200
    r = await svc.client.post("/v1/models/digits-a/distill", json=one, headers=daily)
    midnight = (time.time() // 86400 + 1) * 86400
    assert r.status_code == 429 and abs(int(r.headers["retry-after"]) - (midnight - time.time())) <= 3, r.headers


async def test_quota_is_written_to_the_store(svc):
    token = svc.key(("distill",), quota=100)
    key_id = parse_token(token)[0]
    r = await svc.client.post("/v1/models/digits-a/distill", json={"inputs": X.tolist()}, headers=svc.auth(token))
    assert r.status_code == 200
    assert svc.app.state.store.get_key(key_id).used == 2  # the charge is in the store at once
    svc.app.state.keyring.flush()  # the usage statistics, written behind
    usage = svc.app.state.store.usage(key_id)
    assert [(u.model, u.kind, u.requests, u.samples) for u in usage] == [("digits-a", "distill", 1, 2)]


@pytest.mark.parametrize("quota", [100, None], ids=["quota", "no quota"])
async def test_keyed_path_refuses_a_key_revoked_by_another_process_at_once(svc, quota):
    # The cached row still says valid (another process revoked it); the charge reads the store: its UPDATE for a
    # key with a quota, a read for one without (no write lock per request), either at once.
    token = svc.key(("distill",), quota=quota)
    one = {"inputs": X[:1].tolist()}
    assert (await svc.client.post("/v1/models/digits-a/distill", json=one, headers=svc.auth(token))).status_code == 200
    svc.app.state.store.revoke_key(parse_token(token)[0])
    r = await svc.client.post("/v1/models/digits-a/distill", json=one, headers=svc.auth(token))
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked", r.text
    # the keyed output of v2 infer, asked with the public one (both in one model call), as well
    other = svc.key(("distill",), quota=quota)
    infer = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X[:1].ravel().tolist()}],
             "outputs": [{"name": "distill_logits"}, {"name": "probabilities"}]}
    assert (await svc.client.post("/v2/models/digits-a/infer", json=infer, headers=svc.auth(other))).status_code == 200
    svc.app.state.store.revoke_key(parse_token(other)[0])
    r = await svc.client.post("/v2/models/digits-a/infer", json=infer, headers=svc.auth(other))
    assert r.status_code == 401 and r.json() == {"error": "this API key was revoked"}, r.text
    svc.app.state.keyring.flush()  # a key without a quota counts its samples behind
    assert svc.app.state.store.get_key(parse_token(token)[0]).used == 1


async def test_a_key_without_a_quota_counts_its_keyed_samples_behind(svc):
    token = svc.key(("distill",))
    h = svc.auth(token)
    for n in (1, 2):
        r = await svc.client.post("/v1/models/digits-a/distill", json={"inputs": X[:n].tolist()}, headers=h)
        assert r.status_code == 200, r.text
    svc.app.state.keyring.flush()
    assert (await svc.client.get("/v1/keys/me", headers=h)).json()["quota_used"] == 3
    expiring = svc.key(("distill",), expires_days=1)
    one = {"inputs": X[:1].tolist()}
    assert (await svc.client.post("/v1/models/digits-a/distill", json=one, headers=svc.auth(expiring))).status_code == 200
    expire(svc, expiring)  # in the store, behind the cached row: the read refuses it at once
    r = await svc.client.post("/v1/models/digits-a/distill", json=one, headers=svc.auth(expiring))
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_expired", r.text


def test_concurrent_flushes_record_usage_once_and_a_flush_returns_only_once_it_is_stored(db_url):
    # The write-behind loop and a caller's flush (shutdown, a test) may run at once: neither may write
    # what the other took, and the caller's flush must not return while the loop is still writing
    # what was recorded before the call (CI once read the usage between the two and found a row missing).
    import threading

    from service.auth import Keyring, create_key
    from service.store import Store

    store = Store(db_url)
    try:
        _, key = create_key(store, b"p" * 32, scopes=["distill"], quota=100)
        keyring = Keyring(store, b"p" * 32)
        for model, n in (("digits-a", 3), ("digits-b", 2)):
            keyring.record(key.id, model, "distill", n)
        record_usage, writing = store.record_usage, threading.Event()

        def slow_record(*args):  # the real write, made slow enough for two flushes to overlap
            writing.set()
            threading.Event().wait(0.2)
            record_usage(*args)

        store.record_usage = slow_record
        loop = threading.Thread(target=keyring.flush)  # the write-behind takes both rows
        loop.start()
        assert writing.wait(5)
        keyring.flush()  # what was recorded before this call is stored when it returns
        assert sorted((u.model, u.requests, u.samples) for u in store.usage(key.id)) == [
            ("digits-a", 1, 3), ("digits-b", 1, 2)]
        loop.join()
        assert sorted((u.model, u.requests, u.samples) for u in store.usage(key.id)) == [
            ("digits-a", 1, 3), ("digits-b", 1, 2)]
    finally:
        store.close()


async def test_a_keyed_call_cancelled_after_its_charge_gives_the_samples_back(svc, monkeypatch):
    """The samples were given back on an error, not when the request itself was cancelled after its charge (a server
    shutting down cancels what is in flight): they were never served, and stayed charged."""
    import asyncio
    import threading

    from sdb_core.bundle import Bundle

    release, real = threading.Event(), Bundle.network_logits

    def held(self, *args, **kwargs):  # the model still running when the request is cancelled
        release.wait(10)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Bundle, "network_logits", held)
    h = svc.auth(svc.key(("distill",), quota=2, quota_window_s=3600))
    used = lambda: svc.client.get("/v1/keys/me", headers=h)
    call = asyncio.ensure_future(svc.client.post("/v1/models/digits-a/distill", json={"inputs": X.tolist()},
                                                 headers=h))
    for _ in range(200):
        await asyncio.sleep(0.02)
        if (await used()).json()["quota_used"] == 2:
            break
    else:
        pytest.fail("the call was never charged")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    release.set()
    for _ in range(100):  # the refund is made off the cancelled request, in a moment
        if (await used()).json()["quota_used"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await used()).json()["quota_used"] == 0

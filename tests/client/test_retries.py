"""The retry policy over real HTTP: a small ASGI app under uvicorn answers 503/429/4xx as
scripted and counts, server-side, the requests it received."""
from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from sdb_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthError,
    BadRequest,
    Client,
    NotFound,
    PermissionDenied,
    QuotaError,
    ServerError,
)

from .conftest import Reply, closed_port_url

KEY = "sdb_0123456789ab_" + "e" * 64
MODELS = ("GET", "/v1/models")
DISTILL = ("POST", "/v1/models/m/distill")
OK_MODELS = Reply(200, {"models": [{"name": "m"}]})
OK_LOGITS = Reply(200, {"model": "m", "version": "1", "logits": [[1.0, 2.0]]})


def err(status: int, code: str = "x", **headers) -> Reply:
    return Reply(status, {"error": {"code": code, "message": f"status {status}"}},
                 {k.replace("_", "-"): v for k, v in headers.items()})


def test_503_is_retried_then_succeeds(stub):
    stub.on(*MODELS, err(503, "not_ready"), err(503, "not_ready", retry_after="0"), OK_MODELS)
    with Client(stub.url, KEY) as c:
        assert c.models() == [{"name": "m"}]
    assert stub.hits[MODELS] == 3
    headers, _ = stub.seen[MODELS][-1]
    assert headers["authorization"] == f"Bearer {KEY}"


def test_503_retries_are_bounded(stub):
    stub.on(*MODELS, err(503, retry_after="0"))
    with Client(stub.url, KEY, max_retries=2) as c, pytest.raises(ServerError) as info:
        c.models()
    assert stub.hits[MODELS] == 3 and info.value.status == 503
    stub.reset()
    stub.on(*MODELS, err(503, retry_after="0"))
    with Client(stub.url, KEY, max_retries=2) as c, pytest.raises(ServerError):
        c.with_options(max_retries=0).models()
    assert stub.hits[MODELS] == 1


def test_429_honours_retry_after(stub):
    stub.on(*DISTILL, err(429, "quota_exceeded", retry_after="1"), OK_LOGITS)
    with Client(stub.url, KEY) as c:
        t0 = time.monotonic()
        z = c.distill_logits("m", np.zeros((1, 2), np.float32))
        waited = time.monotonic() - t0
    assert stub.hits[DISTILL] == 2 and z.tolist() == [[1.0, 2.0]]
    assert 0.9 <= waited < 5


def test_429_reads_retry_after_ms_first(stub):
    """A rate limit's wait of a few ms: Retry-After says 1 s (whole seconds), Retry-After-Ms says it exactly."""
    stub.on(*DISTILL, err(429, "rate_limited", retry_after="1", retry_after_ms="5"), OK_LOGITS)
    with Client(stub.url, KEY) as c:
        t0 = time.monotonic()
        c.distill_logits("m", np.zeros((1, 2), np.float32))
        waited = time.monotonic() - t0
    assert stub.hits[DISTILL] == 2 and waited < 0.5


def test_429_without_retry_after_is_not_retried(stub):
    stub.on(*DISTILL, err(429, "quota_exceeded"), OK_LOGITS)
    with Client(stub.url, KEY) as c, pytest.raises(QuotaError) as info:
        c.distill_logits("m", np.zeros((1, 2), np.float32))
    assert stub.hits[DISTILL] == 1 and info.value.retry_after is None


@pytest.mark.parametrize("status,cls", [(401, AuthError), (403, PermissionDenied), (404, NotFound),
                                        (422, BadRequest), (400, BadRequest), (500, ServerError)])
def test_no_retry_on_errors_that_cannot_change(stub, status, cls):
    # even with a Retry-After: a 4xx like these will answer the same however long one waits
    stub.on(*DISTILL, err(status, retry_after="0"), OK_LOGITS)
    with Client(stub.url, KEY) as c, pytest.raises(cls) as info:
        c.distill_logits("m", np.zeros((1, 2), np.float32))
    assert stub.hits[DISTILL] == 1 and info.value.status == status


def test_key_never_in_exception_messages(stub):
    stub.on(*MODELS, Reply(401, {"error": {"code": "invalid_key", "message": f"bad key {KEY}"}}))
    with Client(stub.url, KEY) as c, pytest.raises(AuthError) as info:
        c.models()
    assert KEY not in str(info.value) and KEY not in repr(info.value) and KEY not in info.value.message


def test_connection_errors_are_retried_then_raised():
    url = closed_port_url()
    with Client(url, KEY, max_retries=2, timeout=2) as c:
        t0 = time.monotonic()
        with pytest.raises(APIConnectionError) as info:
            c.models()
    assert info.value.status is None and info.value.code == "connection_error"
    assert time.monotonic() - t0 >= 0.25 * 0.5 * (1 + 2)  # two backoffs happened
    assert KEY not in str(info.value)


@pytest.mark.anyio
async def test_async_retries_the_same_way(stub):
    stub.on(*MODELS, err(503, retry_after="0"), OK_MODELS)
    stub.on(*DISTILL, err(404, "model_not_found"))
    async with AsyncClient(stub.url, KEY) as c:
        assert await c.models() == [{"name": "m"}]
        with pytest.raises(NotFound):
            await c.distill_logits("m", np.zeros((1, 2), np.float32))
    assert stub.hits[MODELS] == 2 and stub.hits[DISTILL] == 1
    stub.on(*DISTILL, err(429, retry_after="0"), OK_LOGITS)
    stub.hits.clear()
    async with AsyncClient(stub.url, KEY) as c:
        assert (await c.distill_logits("m", [[0.0, 0.0]])).shape == (1, 2)
    assert stub.hits[DISTILL] == 2


@pytest.mark.anyio
async def test_a_distill_batch_that_may_have_been_served_is_not_resent(stub):
    """After a read timeout the request had reached the server, which charges the key's quota before the model
    runs: three sends (max_retries=2) charged 768 samples for 256 and delivered none. A read is resent."""
    slow = Reply(200, {"model": "m", "version": "1", "logits": [[1.0, 2.0]]}, delay_s=0.5)
    tight = httpx.Timeout(5.0, read=0.1)
    for encoding in ("npy", "json"):
        stub.reset()
        stub.on(*DISTILL, slow)
        stub.on(*MODELS, Reply(200, {"models": []}, delay_s=0.5), OK_MODELS)
        with Client(stub.url, KEY, timeout=tight, max_retries=2) as c:
            with pytest.raises(APITimeoutError):
                c.distill("m", np.zeros((1, 2), np.float32), encoding=encoding)
            assert c.models() == [{"name": "m"}]  # a read: resent after its timeout
        async with AsyncClient(stub.url, KEY, timeout=tight, max_retries=2) as ac:
            with pytest.raises(APITimeoutError):
                await ac.distill("m", np.zeros((1, 2), np.float32), encoding=encoding)
        assert stub.hits[DISTILL] == 2 and stub.hits[MODELS] == 2  # one send each


def test_job_submission_is_not_resent_after_an_ambiguous_failure(stub):
    # a 503 is an answer (the job was not created), so it is retried; the policy for a broken
    # connection after sending (not retried for submit) is covered in test_base.
    stub.on("POST", "/v1/jobs", err(503, retry_after="0"), Reply(202, {"id": "j1", "status": "queued"}))
    with Client(stub.url, KEY) as c:
        assert c.jobs.submit("wrap")["id"] == "j1"
    assert stub.hits[("POST", "/v1/jobs")] == 2


def test_each_retry_wait_is_logged(stub, caplog):
    """A call waiting out a Retry-After (up to a minute, three times) used to say nothing: now each wait is an INFO
    line on the ``sdb_client`` logger, with the server's reason and no key."""
    stub.on("POST", "/v1/jobs", Reply(429, {"error": {"code": "too_many_jobs", "message": "wait for one to end"}},
                                      {"retry-after": "0"}), Reply(202, {"id": "j1", "status": "queued"}))
    with caplog.at_level("INFO", logger="sdb_client"), Client(stub.url, KEY) as c:
        assert c.jobs.submit("wrap")["id"] == "j1"
    waits = [r.getMessage() for r in caplog.records if r.name == "sdb_client"]
    assert len(waits) == 1 and "POST /v1/jobs: waiting 0.0 s before retry 1 of 3" in waits[0]
    assert "429 too_many_jobs: wait for one to end" in waits[0] and KEY not in waits[0]
    caplog.clear()
    with (caplog.at_level("INFO", logger="sdb_client"), Client(closed_port_url(), KEY, max_retries=1) as c,
          pytest.raises(APIConnectionError, match="cannot reach")):
        c.models()
    assert ["ConnectError" in r.getMessage() for r in caplog.records if r.name == "sdb_client"] == [True]


@pytest.mark.anyio
async def test_a_distill_batch_is_not_resent_after_a_503_given_once_charged(stub):
    """model_out_of_memory / model_timeout / model_unavailable come after the keyed path charged the quota: a resend
    charged one 1,024-sample call 4,096 samples and answered none. A 503 given before any charge is resent."""
    for code in ("model_out_of_memory", "model_timeout", "model_unavailable"):
        stub.reset()
        stub.on(*DISTILL, err(503, code, retry_after="0"), OK_LOGITS)
        with Client(stub.url, KEY) as c, pytest.raises(ServerError) as info:
            c.distill_logits("m", [[0.0, 0.0]])
        assert info.value.code == code and stub.hits[DISTILL] == 1  # sent once
        stub.reset()
        stub.on(*DISTILL, err(503, code, retry_after="0"), OK_LOGITS)
        async with AsyncClient(stub.url, KEY) as ac:
            with pytest.raises(ServerError):
                await ac.distill_logits("m", [[0.0, 0.0]], encoding="json")
        assert stub.hits[DISTILL] == 1
    for code in ("key_store_unavailable", "not_ready"):
        stub.reset()
        stub.on(*DISTILL, err(503, code, retry_after="0"), OK_LOGITS)
        with Client(stub.url, KEY) as c:
            assert c.distill_logits("m", [[0.0, 0.0]]).shape == (1, 2)
        assert stub.hits[DISTILL] == 2
    stub.on(*MODELS, err(503, "model_timeout", retry_after="0"), OK_MODELS)  # a read is resent whatever the code
    with Client(stub.url, KEY) as c:
        assert c.models() == [{"name": "m"}]


@pytest.mark.anyio
async def test_rate_limited_is_waited_out_within_a_time_budget(stub, monkeypatch):
    """Threads sharing a key each got the same few-ms Retry-After-Ms and gave up after 3 retries (48 of 90 calls
    raised): a rate limit is now waited out, with jitter, within RATE_LIMIT_WAIT_MAX_S, past max_retries."""
    limited = err(429, "rate_limited", retry_after="1", retry_after_ms="2")
    stub.on(*DISTILL, *[limited] * 6, OK_LOGITS)
    with Client(stub.url, KEY) as c:
        assert c.distill_logits("m", [[0.0, 0.0]]).shape == (1, 2)
    assert stub.hits[DISTILL] == 7
    stub.reset()
    stub.on(*DISTILL, *[limited] * 6, OK_LOGITS)
    async with AsyncClient(stub.url, KEY) as ac:
        assert (await ac.distill_logits("m", [[0.0, 0.0]])).shape == (1, 2)
    stub.reset()
    stub.on(*DISTILL, limited)
    with Client(stub.url, KEY, max_retries=0) as c, pytest.raises(QuotaError):  # no retries asked for: none
        c.distill_logits("m", [[0.0, 0.0]])
    assert stub.hits[DISTILL] == 1
    monkeypatch.setattr("sdb_client._base.RATE_LIMIT_WAIT_MAX_S", 0.2)
    t0 = time.monotonic()
    with Client(stub.url, KEY) as c, pytest.raises(QuotaError) as info:  # bounded in time, not for ever
        c.distill_logits("m", [[0.0, 0.0]])
    assert info.value.code == "rate_limited" and time.monotonic() - t0 < 2 and stub.hits[DISTILL] > 4


def test_a_server_from_before_npy_bodies_is_sent_json_after_its_415(stub):
    """`sdb distill --remote` against a server from before .npy bodies failed: 415 unsupported_media_type (given
    before any charge), no flag to ask for JSON. The client's default encoding turns JSON then, for good; an
    encoding the caller chose is theirs."""
    from sdb_client import RemoteTeacher

    stub.on(*DISTILL, err(415, "unsupported_media_type"), OK_LOGITS, OK_LOGITS, OK_LOGITS, err(415, "unsupported_media_type"),
            err(415, "unsupported_media_type"))
    x = np.zeros((1, 2), np.float32)
    with Client(stub.url, KEY) as c:
        assert c.distill_logits("m", x).tolist() == [[1.0, 2.0]]
        assert RemoteTeacher(c, "m", temperature=1.0)(x).tolist() == [[1.0, 2.0]]  # JSON at once now
        assert c.options.encoding == "npy" and c.distill_logits("m", x, encoding="json").tolist() == [[1.0, 2.0]]
        with pytest.raises(BadRequest, match="status 415"):
            c.distill_logits("m", x, encoding="npy")  # asked for: not changed behind the caller's back
    with Client(stub.url, KEY, encoding="npy") as c, pytest.raises(BadRequest, match="status 415"):
        c.distill_logits("m", x)  # a client that names it keeps it too
    kinds = [headers["content-type"].split(";")[0] for headers, _ in stub.seen[DISTILL]]
    assert kinds == ["application/x-npy", "application/json", "application/json", "application/json",
                     "application/x-npy", "application/x-npy"]


@pytest.mark.anyio
async def test_an_async_client_turns_json_after_a_415_to_npy(stub):
    stub.on(*DISTILL, err(415, "unsupported_media_type"), OK_LOGITS)
    async with AsyncClient(stub.url, KEY) as c:
        assert (await c.distill_logits("m", np.zeros((1, 2), np.float32))).tolist() == [[1.0, 2.0]]
    assert [h["content-type"].split(";")[0] for h, _ in stub.seen[DISTILL]] == ["application/x-npy", "application/json"]

"""Every method of ``Client`` and ``AsyncClient`` against the real service on a loopback port,
and the error each status of the real service maps to."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from sdb_client import (
    AsyncClient,
    AuthError,
    BadRequest,
    Client,
    ConfigurationError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    QuotaError,
    RemoteTeacher,
    SDBError,
    ServerError,
)

from sdb_core.bundle import load_bundle

from .conftest import MODEL, PAYLOAD_LIMIT, SMALL_REQUEST, Reply, write_png

NPY = "application/x-npy"


@pytest.fixture(scope="module")
def bundle(sdb_server, master_key):
    """The bundle the server hosts, loaded locally with its key."""
    return load_bundle(sdb_server.bundles.a, master_key)


@pytest.fixture(scope="module")
def keyed(bundle):
    return bundle.distill_logits


@pytest.fixture
def client(sdb_server):
    with Client(sdb_server.url, sdb_server.distill_key) as c:
        yield c


@pytest.fixture
def admin(sdb_server):
    with Client(sdb_server.url, sdb_server.admin_key) as c:
        yield c


def test_models_and_model(client):
    models = client.models()
    assert [m["name"] for m in models] == [MODEL]
    m = client.model(MODEL)
    assert m["name"] == MODEL and m["distillable"] and len(m["labels"]) == 10


def test_ids_that_are_path_steps_are_refused_not_resolved(admin):
    """``sdb jobs status .`` printed the job list and ``sdb files get .`` the file list: HTTP clients resolve "." and
    ".." away, so /v1/jobs/. was /v1/jobs/."""
    for call, what in ((lambda: admin.jobs.get("."), "job id"), (lambda: admin.files.get(".."), "file id"),
                       (lambda: admin.model("."), "model name"), (lambda: admin.jobs.get(""), "job id")):
        with pytest.raises(BadRequest, match=f"is not a {what}"):
            call()


def test_predict_inputs_and_image(client, sdb_server, tmp_path):
    x = sdb_server.bundles.x
    preds = client.predict(MODEL, x, top_k=3)
    assert len(preds) == len(x) and all(len(p["labels"]) == 3 for p in preds)
    public = Client(sdb_server.url, api_key=None)  # predict is public on this server
    assert [p["indices"] for p in public.predict(MODEL, x.tolist())] == [p["indices"][:1] for p in preds]
    png = write_png(tmp_path / "digit.png", x[0])
    (p,) = client.predict(MODEL, image_path=png, top_k=2)
    assert len(p["labels"]) == 2 and len(p["scores"]) == 2
    with pytest.raises(BadRequest):
        client.predict(MODEL)  # neither inputs nor an image


def test_distill_logits_equal_the_local_keyed_path(client, sdb_server, keyed):
    x = sdb_server.bundles.x
    z = client.distill_logits(MODEL, x)
    assert z.dtype == np.float32 and z.shape == (len(x), 10)
    np.testing.assert_allclose(z, keyed(x), atol=1e-4)
    d = client.distill(MODEL, x, temperature=4.0)
    e = np.exp(d.logits / 4.0 - (d.logits / 4.0).max(1, keepdims=True))
    np.testing.assert_allclose(d.soft_targets, e / e.sum(1, keepdims=True), atol=1e-5)
    assert (d.model, d.temperature) == (MODEL, 4.0)
    # distill_logits(..., temperature=T): tempered logits whose softmax is the soft target at T.
    zt = client.distill_logits(MODEL, x, 4.0)
    np.testing.assert_allclose(zt, keyed(x) / 4.0, atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        client.distill_logits(MODEL, x, 0.0)


def test_batching_1000_inputs_complete_and_in_order(client, sdb_server, keyed, bundle):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 1, 8, 8)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(1000)  # every sample distinct, so an order slip would show
    z = client.distill_logits(MODEL, x, batch_size=64)
    assert z.shape == (1000, 10)
    np.testing.assert_allclose(z, keyed(x), atol=1e-4)
    preds = client.with_options(batch_size=64).predict(MODEL, x, top_k=1)
    assert [p["indices"][0] for p in preds] == bundle.predict(x).argmax(1).tolist()
    # as .npy (256,128 bytes, a fifth of JSON's) the 1,000 fit this server's 256 KiB in one request
    np.testing.assert_allclose(client.distill_logits(MODEL, x, batch_size=1000), keyed(x), atol=1e-4)


def test_a_batch_over_the_servers_limits_is_sent_again_in_halves(sdb_server, keyed):
    """A batch over the server's body limit was a PayloadTooLarge (and the default batch of 256 failed every call for
    3x64x64 inputs); with SDB_MAX_REQUEST_SAMPLES under 256, every default call was a 422 too_many_samples. Both are
    refused before the body is read, so before any charge: the SDK now sends such a batch again in halves, each
    sample charged once. A single sample over the limit is still the server's 413."""
    x = np.random.default_rng(0).normal(size=(1100, 1, 8, 8)).astype(np.float32)
    token = sdb_server.key(("distill",), quota=3 * 1100)  # exactly the samples sent once each
    with Client(sdb_server.url, token) as c:
        # 1,100 as JSON (about 1.5 MB) and as .npy (281 KB) are over this server's 256 KiB
        np.testing.assert_allclose(c.distill_logits(MODEL, x, batch_size=1100, encoding="json"), keyed(x), atol=1e-4)
        np.testing.assert_allclose(c.distill_logits(MODEL, x, batch_size=1100), keyed(x), atol=1e-4)
        assert c._limits.body_bytes < PAYLOAD_LIMIT  # learnt: the next call's batches fit at once
        np.testing.assert_allclose(c.distill_logits(MODEL, x, batch_size=1100), keyed(x), atol=1e-4)
        assert len(c.predict(MODEL, x, batch_size=1100, encoding="json")) == 1100
    assert sdb_server.used(token) == 3 * 1100
    with Client(sdb_server.url, sdb_server.distill_key) as c, pytest.raises(PayloadTooLarge):
        c.distill_logits(MODEL, np.zeros((1, PAYLOAD_LIMIT // 4), np.float32))  # one sample: nothing to halve


@pytest.mark.anyio
async def test_the_default_batch_fits_a_server_that_takes_fewer_samples(small_server, keyed, bundle):
    """small_server takes 100 samples a request: the SDK's default 256 was a 422 too_many_samples on every call (and
    sdb distill --remote had no flag to change it)."""
    x = np.random.default_rng(1).normal(size=(300, 1, 8, 8)).astype(np.float32)
    token = small_server.key(("distill",), quota=4 * 300)
    with Client(small_server.url, token) as c:
        assert c.batch_size == 256 > SMALL_REQUEST
        np.testing.assert_allclose(c.distill_logits(MODEL, x), keyed(x), atol=1e-4)
        assert [p["indices"][0] for p in c.predict(MODEL, x)] == bundle.predict(x).argmax(1).tolist()
        with RemoteTeacher(c, MODEL) as teacher:
            np.testing.assert_allclose(teacher(x), keyed(x), atol=1e-4)
    async with AsyncClient(small_server.url, token) as ac:
        np.testing.assert_allclose(await ac.distill_logits(MODEL, x), keyed(x), atol=1e-4)
        assert len(await ac.predict(MODEL, x, encoding="json")) == 300
    assert small_server.used(token) == 3 * 300  # predict is not charged; no refused batch was


def test_batches_are_cut_to_the_servers_default_body_size_before_sending():
    """A 3x64x64 model's default batch of 256 was 12.5 MB of .npy, over the server's default 8 MiB: every call a 413.
    Batches are now cut by the bytes their samples take, and by half a refused one after a refusal."""
    from sdb_client import _base as b

    x = np.zeros((300, 3, 64, 64), np.float32)
    limits = b.RequestLimits()
    npy = b.Batches(np.full(len(x), b.sample_bytes(x, "npy")), 256, limits)
    assert npy.end(0) * 3 * 64 * 64 * 4 <= 8 << 20 < 256 * 3 * 64 * 64 * 4
    assert [s.stop - s.start for s in npy.slices()] == [169, 131]
    as_json = b.Batches(np.full(len(x), b.sample_bytes(x, "json")), 256, limits)
    assert as_json.end(0) * 3 * 64 * 64 * 24 <= 8 << 20 and as_json.end(0) == 28
    refused = PayloadTooLarge("too big", status=413, code="payload_too_large")
    assert npy.smaller(refused, 0, 169) and npy.end(0) == 84 and as_json.end(0) == 14  # one server: both learn
    few = BadRequest("too many", status=422, code="too_many_samples")
    assert npy.smaller(few, 0, 84) and limits.samples == 42 and npy.end(0) == 42 and npy.end(10, 20) == 20
    assert not npy.smaller(few, 0, 1)  # one sample: the error stands
    assert not npy.smaller(BadRequest("bad shape", status=422, code="invalid_shape"), 0, 42)
    images = b.Batches([3 << 20] * 5, 256, b.RequestLimits())  # 3 MiB image files: two a request
    assert [s.stop - s.start for s in images.slices()] == [2, 2, 1]


def test_many_images_are_sent_in_batches(client, sdb_server, tmp_path):
    """predict(image_path=[...]) sent every image in one request, batch_size ignored: 1,100 small PNGs were a 400
    (more files than the server reads in one form)."""
    pngs = [write_png(tmp_path / f"{i}.png", x) for i, x in enumerate(sdb_server.bundles.x)]
    each = [client.predict(MODEL, image_path=p)[0] for p in pngs]
    order = np.random.default_rng(0).integers(0, len(pngs), 1100)
    assert client.predict(MODEL, image_path=[pngs[i] for i in order]) == [each[i] for i in order]
    assert client.predict(MODEL, image_path=[pngs[i] for i in order[:50]], batch_size=8) == [each[i] for i in order[:50]]


@pytest.mark.anyio
async def test_async_many_images_are_sent_in_batches(client, sdb_server, tmp_path):
    pngs = [write_png(tmp_path / f"{i}.png", x) for i, x in enumerate(sdb_server.bundles.x)]
    each = [client.predict(MODEL, image_path=p)[0] for p in pngs]
    order = np.random.default_rng(1).integers(0, len(pngs), 1100)
    async with AsyncClient(sdb_server.url, sdb_server.distill_key) as ac:
        assert await ac.predict(MODEL, image_path=[pngs[i] for i in order]) == [each[i] for i in order]


def test_keys_create_list_revoke(admin, sdb_server):
    created = admin.keys.create(["distill"], models=[MODEL], quota=100, name="sdk-test")
    token = created["key"]
    assert created["scopes"] == ["distill"] and created["models"] == [MODEL] and token.startswith("sdb_")
    assert created["id"] in [k["id"] for k in admin.keys.list()]
    assert all("key" not in k for k in admin.keys.list())
    with Client(sdb_server.url, token) as c:
        assert c.distill_logits(MODEL, sdb_server.bundles.x[:2]).shape == (2, 10)
        assert admin.keys.revoke(created["id"])["revoked_at"] is not None
        with pytest.raises(AuthError) as info:
            c.distill_logits(MODEL, sdb_server.bundles.x[:2])
        assert info.value.code == "key_revoked" and token not in str(info.value)
    with pytest.raises(NotFound):
        admin.keys.revoke("0" * 12)
    with pytest.raises(BadRequest):
        admin.keys.create(["superuser"])


def test_jobs_methods_map_unknown_jobs_and_bad_params_to_typed_errors(admin, tmp_path):
    # Every jobs method reaches the real routes: an unknown job is NotFound, bad params BadRequest
    # (the happy paths run real workers in test_jobs_service).
    with pytest.raises(BadRequest) as info:
        admin.jobs.submit("wrap", {"data": "digits"})
    assert info.value.status == 422 and "params.teacher" in str(info.value)
    calls = [lambda: admin.jobs.get("j1"), lambda: admin.jobs.cancel("j1"), lambda: admin.jobs.logs("j1"),
             lambda: admin.jobs.artifacts("j1"), lambda: admin.jobs.download("j1", "student.safetensors", tmp_path),
             lambda: admin.jobs.wait("j1", timeout=1)]
    for call in calls:
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.status == 404
    assert isinstance(admin.jobs.list(status="running"), list)
    assert not list(tmp_path.iterdir())  # no partial download left behind


def test_errors_from_the_real_service(sdb_server):
    x = sdb_server.bundles.x[:2]
    with Client(sdb_server.url, api_key=None) as anon, pytest.raises(AuthError) as info:
        anon.distill_logits(MODEL, x)
    assert (info.value.status, info.value.code) == (401, "missing_key")
    unknown = "sdb_" + "a" * 12 + "_" + "b" * 64
    with Client(sdb_server.url, unknown) as c, pytest.raises(AuthError) as info:
        c.distill_logits(MODEL, x)
    assert unknown not in str(info.value) and unknown not in repr(info.value)
    with Client(sdb_server.url, sdb_server.distill_key) as c:
        with pytest.raises(NotFound) as nf:
            c.model("no-such-model")
        assert nf.value.code == "model_not_found"
        with pytest.raises(BadRequest) as bad:
            c.distill_logits(MODEL, np.zeros((2, 3, 5, 5), np.float32))
        assert (bad.value.status, bad.value.code) == (422, "invalid_shape")
        with pytest.raises(ConfigurationError) as bad:  # refused before the request (and its quota)
            c.distill(MODEL, x, temperature=-1.0)
        assert bad.value.status is None and bad.value.code == "invalid_option"
        with pytest.raises(PermissionDenied):
            c.keys.list()  # admin scope


def test_predict_only_key_gets_permission_denied_and_no_logits(sdb_server):
    with Client(sdb_server.url, sdb_server.predict_key) as c:
        assert len(c.predict(MODEL, sdb_server.bundles.x[:2])) == 2
        with pytest.raises(PermissionDenied) as info:
            c.distill_logits(MODEL, sdb_server.bundles.x[:2])
    assert (info.value.status, info.value.code) == (403, "forbidden_scope")
    assert "logits" not in vars(info.value)


def window_with_time_left(min_left_s: int = 1800) -> int:
    """A quota window of an hour or more whose current period has ``min_left_s`` seconds to run. Windows are
    aligned to the epoch, so an hour's ends on the hour: a test that ran in its last minute saw a Retry-After
    under a minute, which the client waits for, and the window rolled over before the retry."""
    now = int(time.time())
    return next(w for w in range(3600, 7200) if w - now % w >= min_left_s)


def test_quota_error_is_raised_without_waiting_an_hour(sdb_server):
    token = sdb_server.key(("distill",), quota=3, quota_window_s=window_with_time_left())
    with Client(sdb_server.url, token) as c:
        c.distill_logits(MODEL, sdb_server.bundles.x[:3])
        with pytest.raises(QuotaError) as info:
            c.distill_logits(MODEL, sdb_server.bundles.x[:1])
    assert info.value.status == 429 and info.value.code == "quota_exceeded" and info.value.retry_after > 60


@pytest.mark.anyio
async def test_a_quota_spent_part_way_gives_back_the_rows_answered(sdb_server, keyed, stub):
    """The batches answered before the quota ran out were charged, then thrown away with the error: they now go
    with it, as ``partial`` (the first ``partial_rows`` inputs' logits), and no batch is sent after the error."""
    x = np.random.default_rng(5).normal(size=(200, 1, 8, 8)).astype(np.float32)
    with Client(sdb_server.url, sdb_server.key(("distill",), quota=100), batch_size=32) as c, \
            pytest.raises(QuotaError) as info:
        c.distill_logits(MODEL, x, 2.0)
    assert info.value.partial_rows == 96
    np.testing.assert_allclose(info.value.partial, keyed(x[:96]) / 2.0, atol=1e-4)
    token = sdb_server.key(("distill",), quota=100)
    async with AsyncClient(sdb_server.url, token, batch_size=32, max_concurrency=1) as ac:
        with pytest.raises(QuotaError) as info:
            await ac.distill(MODEL, x)
    assert info.value.partial_rows == 96
    np.testing.assert_allclose(info.value.partial, keyed(x[:96]), atol=1e-4)
    refused = Reply(429, {"error": {"code": "quota_exceeded", "message": "spent"}})
    stub.on(*DISTILL_ROUTE, *[Reply(200, {"model": "m", "version": "1", "logits": [[0.0, 1.0]]})] * 2, refused)
    stub.on("GET", "/v1/models/m", Reply(200, {"name": "m", "input": {"shape": [2]}}))
    async with AsyncClient(stub.url, STUB_KEY, batch_size=1, max_concurrency=1) as ac:
        with pytest.raises(QuotaError) as info:
            await ac.distill_logits("m", np.zeros((8, 2), np.float32))
    assert info.value.partial_rows == 2 and stub.hits[DISTILL_ROUTE] == 3  # not the 8 batches


@pytest.mark.anyio
async def test_async_batches_answered_past_a_failed_one_go_with_the_error(sdb_server, keyed):
    """Batches of 100, 100 and 50 at once against a quota of 150: two were answered and charged (150 samples), and
    the error kept only those before the failed one (``_in_order`` dropped the rest): rows paid for, then lost. Every
    answered batch now goes with the error: the first rows as ``partial``, the others as ``answered_after``."""
    x = np.random.default_rng(6).normal(size=(250, 1, 8, 8)).astype(np.float32)
    token = sdb_server.key(("distill",), quota=150)
    async with AsyncClient(sdb_server.url, token, batch_size=100) as ac:
        with pytest.raises(QuotaError) as info:
            await ac.distill_logits(MODEL, x, 2.0)
    e = info.value
    answered = np.zeros(len(x), bool)
    answered[:e.partial_rows] = True
    if e.partial_rows:
        np.testing.assert_allclose(e.partial, keyed(x[:e.partial_rows]) / 2.0, atol=1e-4)
    for row, z in e.answered_after:
        assert row >= e.partial_rows and not answered[row:row + len(z)].any()
        np.testing.assert_allclose(z, keyed(x[row:row + len(z)]) / 2.0, atol=1e-4)  # tempered like the rest
        answered[row:row + len(z)] = True
    assert answered.sum() == sdb_server.used(token) == 150


# --------------------------------------------------------------------------- AsyncClient
@pytest.mark.anyio
async def test_async_client_every_method(sdb_server, keyed, tmp_path):
    x = sdb_server.bundles.x
    async with AsyncClient(sdb_server.url, sdb_server.admin_key, max_concurrency=3) as c:
        assert [m["name"] for m in await c.models()] == [MODEL]
        assert (await c.model(MODEL))["name"] == MODEL
        preds = await c.predict(MODEL, x, top_k=2, batch_size=3)
        assert len(preds) == len(x) and len(preds[0]["labels"]) == 2
        (p,) = await c.predict(MODEL, image_path=write_png(tmp_path / "d.png", x[1]))
        assert len(p["labels"]) == 1
        big = np.random.default_rng(1).normal(size=(300, 1, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(await c.distill_logits(MODEL, big, batch_size=64), keyed(big), atol=1e-4)
        np.testing.assert_allclose(await c.distill_logits(MODEL, x, 2.0), keyed(x) / 2.0, atol=1e-4)
        d = await c.distill(MODEL, x, temperature=2.0)
        assert d.soft_targets.shape == (len(x), 10)
        created = await c.keys.create("predict", name="async")
        assert created["id"] in [k["id"] for k in await c.keys.list()]
        assert (await c.keys.revoke(created["id"]))["revoked_at"] is not None
        with pytest.raises(BadRequest):
            await c.jobs.submit("nosuchkind")
        assert isinstance(await c.jobs.list(status="running"), list)
        for call in (c.jobs.get("j"), c.jobs.cancel("j"), c.jobs.logs("j", offset=5), c.jobs.artifacts("j"),
                     c.jobs.download("j", "a.bin", tmp_path), c.jobs.wait("j", timeout=1)):
            with pytest.raises(NotFound):
                await call


@pytest.mark.anyio
async def test_async_client_errors(sdb_server):
    x = sdb_server.bundles.x[:2]
    async with AsyncClient(sdb_server.url, sdb_server.predict_key) as c:
        with pytest.raises(PermissionDenied):
            await c.distill_logits(MODEL, x)
        with pytest.raises(NotFound):
            await c.model("nope")
        with pytest.raises(BadRequest):
            await c.predict(MODEL, np.zeros((1, 7), np.float32))
    async with AsyncClient(sdb_server.url) as c:
        with pytest.raises(AuthError):
            await c.keys.list()
        # over the server's 256 KiB: sent again in halves (test_a_batch_over_the_servers_limits_is_sent_again_in_halves)
        assert len(await c.predict(MODEL, np.zeros((1000, 1, 8, 8), np.float32) + 0.123456789, batch_size=1000,
                                   encoding="json")) == 1000
        assert len(await c.predict(MODEL, np.zeros((1100, 1, 8, 8), np.float32), batch_size=1100)) == 1100
        with pytest.raises(PayloadTooLarge):
            await c.predict(MODEL, np.zeros((1, PAYLOAD_LIMIT // 4), np.float32))  # one sample: nothing to halve


# --------------------------------------------------------------------------- encodings: .npy by default, JSON on request
def test_npy_by_default_and_json_on_request_give_the_local_keyed_logits(client, sdb_server, keyed):
    x = np.random.default_rng(2).normal(size=(300, 1, 8, 8)).astype(np.float32)
    assert client.options.encoding == "npy"
    binary = client.distill(MODEL, x, temperature=4.0, batch_size=128)
    as_json = client.distill(MODEL, x, temperature=4.0, batch_size=128, encoding="json")
    for d in (binary, as_json):
        assert d.logits.dtype == d.soft_targets.dtype == np.float32 and d.logits.shape == (300, 10)
        assert (d.model, d.version, d.temperature) == (MODEL, "1", 4.0)
        np.testing.assert_allclose(d.logits, keyed(x), rtol=1e-5, atol=1e-5)  # float32 rounding
    np.testing.assert_allclose(binary.logits, as_json.logits, rtol=0, atol=1e-6)  # one network, one answer
    np.testing.assert_allclose(binary.soft_targets, as_json.soft_targets, atol=1e-6)  # here vs the server's
    assert binary.soft_targets.sum(1) == pytest.approx(np.ones(300), abs=1e-5)
    assert client.distill(MODEL, x[:2]).soft_targets is None
    with Client(sdb_server.url, sdb_server.distill_key, encoding="json") as j:
        np.testing.assert_allclose(j.distill_logits(MODEL, x, batch_size=128), binary.logits, atol=1e-6)
        np.testing.assert_allclose(j.with_options(encoding="npy").distill_logits(MODEL, x, 2.0), binary.logits / 2,
                                   atol=1e-6)
    preds = client.predict(MODEL, x, top_k=3, batch_size=128)
    assert preds == client.predict(MODEL, x, top_k=3, batch_size=128, encoding="json")
    with pytest.raises(ConfigurationError):
        Client(sdb_server.url, encoding="msgpack")
    with pytest.raises(ConfigurationError):
        client.distill_logits(MODEL, x, encoding="npz")
    with pytest.raises(ConfigurationError):
        RemoteTeacher(client, MODEL, encoding="xml")


def test_remote_teacher_json_on_request(sdb_server, keyed):
    x = np.random.default_rng(3).normal(size=(70, 1, 8, 8)).astype(np.float32)
    with Client(sdb_server.url, sdb_server.distill_key) as c, RemoteTeacher(c, MODEL, batch_size=32) as binary, \
            RemoteTeacher(c, MODEL, batch_size=32, encoding="json") as j:
        assert (binary.encoding, j.encoding) == ("npy", "json")
        np.testing.assert_allclose(binary(x), j(x), atol=1e-6)
        np.testing.assert_allclose(binary(x), keyed(x), atol=1e-4)


def test_binary_errors_map_like_json(sdb_server):
    x = sdb_server.bundles.x[:2]
    for encoding in ("npy", "json"):
        with Client(sdb_server.url, sdb_server.distill_key, encoding=encoding) as c:
            with pytest.raises(BadRequest) as bad:
                c.distill_logits(MODEL, np.zeros((2, 3, 5, 5), np.float32))
            assert (bad.value.status, bad.value.code) == (422, "invalid_shape")
            with pytest.raises(BadRequest) as bad:
                c.distill_logits(MODEL, np.full((1, 1, 8, 8), 1e39, np.float64))  # Inf as float32
            assert bad.value.code == "non_finite"
            with pytest.raises(ConfigurationError):  # the SDK's check, in either encoding, before any request
                c.distill(MODEL, x, temperature=-1.0)
        with Client(sdb_server.url, sdb_server.predict_key, encoding=encoding) as c, \
                pytest.raises(PermissionDenied):
            c.distill_logits(MODEL, x)


def test_the_wire_format(stub):
    """What the SDK sends and reads, checked on the wire: .npy out with Accept naming it, and a .npy or a JSON
    answer read alike (an older server answers JSON); a malformed .npy answer is an error, never unpickled."""
    z = np.arange(6, dtype=np.float32).reshape(2, 3)
    buf = io.BytesIO()
    np.save(buf, z)
    route = ("POST", "/v1/models/m/distill")
    stub.on(*route, Reply(200, buf.getvalue(), {"content-type": NPY, "sdb-model": "m%20x", "sdb-model-version": "7",
                                                "sdb-temperature": "2.0"}))
    key = "sdb_0123456789ab_" + "e" * 64
    x = np.ones((2, 4), np.float64)
    with Client(stub.url, key) as c:
        d = c.distill("m", x, temperature=2.0)
        headers, body = stub.seen[route][-1]
        assert headers["content-type"] == NPY and headers["accept"].startswith(NPY)
        assert headers[":query"] == "temperature=2.0"
        sent = np.load(io.BytesIO(body), allow_pickle=False)
        assert sent.dtype == np.dtype("<f4") and np.array_equal(sent, x)
        assert (d.model, d.version, d.temperature) == ("m x", "7", 2.0) and np.array_equal(d.logits, z)
        e = np.exp(z / 2 - (z / 2).max(1, keepdims=True))
        np.testing.assert_allclose(d.soft_targets, e / e.sum(1, keepdims=True), atol=1e-6)
        stub.on(*route, Reply(200, {"model": "m", "version": "7", "logits": z.tolist()}))
        assert np.array_equal(c.distill_logits("m", x), z)  # a JSON answer to a .npy request
        c.distill_logits("m", x, encoding="json")
        headers, body = stub.seen[route][-1]
        assert headers["content-type"] == "application/json" and body.startswith(b'{"inputs"')
        pickled = io.BytesIO()
        np.save(pickled, np.array([object()], dtype=object), allow_pickle=True)
        for bad in (b"\x93NUMPY garbage", pickled.getvalue(), buf.getvalue()[:-3]):
            stub.on(*route, Reply(200, bad, {"content-type": NPY}))
            with pytest.raises(SDBError) as info:
                c.distill_logits("m", x)
            assert info.value.code == "malformed_answer"


@pytest.mark.anyio
async def test_async_client_encodings(sdb_server, keyed):
    x = np.random.default_rng(4).normal(size=(100, 1, 8, 8)).astype(np.float32)
    async with AsyncClient(sdb_server.url, sdb_server.distill_key, max_concurrency=2) as c:
        assert c.options.encoding == "npy"
        binary = await c.distill(MODEL, x, temperature=3.0, batch_size=32)
        as_json = await c.with_options(encoding="json").distill(MODEL, x, temperature=3.0, batch_size=32)
        np.testing.assert_allclose(binary.logits, keyed(x), atol=1e-4)
        np.testing.assert_allclose(binary.logits, as_json.logits, atol=1e-6)
        np.testing.assert_allclose(binary.soft_targets, as_json.soft_targets, atol=1e-6)
        assert await c.predict(MODEL, x[:5], top_k=2) == await c.predict(MODEL, x[:5], top_k=2, encoding="json")


# --------------------------------------------------------------------------- inputs as users hold them
def test_inputs_as_users_hold_them_give_the_same_logits(client, sdb_server, keyed):
    """numpy's float64 default, float16, big-endian, strided and transposed views, lists, torch tensors (with
    requires_grad, bfloat16 from mixed precision), one sample without its batch axis, one flat row."""
    import torch

    x = sdb_server.bundles.x
    ref = keyed(x)
    held = {"float64": x.astype(np.float64), "big-endian": x.astype(">f8"), "list": x.tolist(),
            "strided": np.repeat(x, 2, axis=0)[::2], "transposed": np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2),
            "torch": torch.from_numpy(x.copy()).requires_grad_(True)}
    for name, inputs in held.items():
        for encoding in ("npy", "json"):
            np.testing.assert_allclose(client.distill_logits(MODEL, inputs, encoding=encoding), ref, atol=1e-5,
                                       err_msg=f"{name} {encoding}")
    half = x.astype(np.float16)
    np.testing.assert_allclose(client.distill_logits(MODEL, half), keyed(half.astype(np.float32)), atol=1e-5)
    bf16 = torch.from_numpy(x).bfloat16()  # numpy has no bfloat16: .numpy() alone raises TypeError
    np.testing.assert_allclose(client.distill_logits(MODEL, bf16), keyed(bf16.float().numpy()), atol=1e-5)
    assert len(client.predict(MODEL, bf16)) == len(x)
    # one sample without its batch axis is one sample; a 1-D vector (a flat row of the 64 values, as a feature
    # vector is) too, even when it is longer than batch_size: never split into batches of its values
    np.testing.assert_allclose(client.distill_logits(MODEL, x[0]), ref[:1], atol=1e-5)
    flat = x[0].reshape(64)
    for encoding in ("npy", "json"):
        np.testing.assert_allclose(client.distill_logits(MODEL, flat, batch_size=16, encoding=encoding), ref[:1],
                                   atol=1e-5)
        np.testing.assert_allclose(client.distill_logits(MODEL, flat.tolist(), encoding=encoding), ref[:1], atol=1e-5)
    assert client.predict(MODEL, flat, batch_size=16) == client.predict(MODEL, x[:1])  # the public path alike


def test_one_sample_longer_than_a_batch_is_sent_whole(stub):
    """One sample without its batch axis whose first axis is longer than batch_size (a (3, 4, 4) image at
    batch_size 2, a (300, 4) sequence at the default 256) was cut along that axis into "batches" the server
    refused: the SDK asks the model's input rank then (once a call, only then) and sends it as one sample."""
    stub.on("GET", "/v1/models/m", Reply(200, {"name": "m", "input": {"name": "input", "shape": [3, 4, 4]}}))
    stub.on("POST", "/v1/models/m/predict", Reply(200, {"predictions": [{"labels": ["a"]}]}))
    stub.on("POST", "/v1/models/m/distill", Reply(200, {"model": "m", "version": "1", "logits": [[0.0, 1.0]]}))
    with Client(stub.url, STUB_KEY) as c:
        c.predict("m", np.zeros((3, 4, 4)), batch_size=2, encoding="json")
        c.distill("m", np.zeros((3, 4, 4)), batch_size=2, encoding="json")
        sent = [json.loads(body)["inputs"] for route in ("predict", "distill")
                for _, body in stub.seen[("POST", f"/v1/models/m/{route}")]]
        assert [np.shape(x) for x in sent] == [(1, 3, 4, 4)] * 2
        assert stub.hits[("GET", "/v1/models/m")] == 2
        stub.reset()
        stub.on("GET", "/v1/models/m", Reply(200, {"name": "m", "input": {"name": "input", "shape": [3, 4, 4]}}))
        stub.on("POST", "/v1/models/m/predict", Reply(200, {"predictions": [{"labels": ["a"]}] * 2}))
        c.predict("m", np.zeros((5, 3, 4, 4)), batch_size=2, encoding="json")  # a batch: split as before
        assert [np.shape(json.loads(body)["inputs"]) for _, body in stub.seen[("POST", "/v1/models/m/predict")]] \
            == [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)]
        c.predict("m", np.zeros((2, 3, 4, 4)), batch_size=2, encoding="json")  # fits one batch: no metadata call
        assert stub.hits[("GET", "/v1/models/m")] == 1
        stub.seen.clear()
        c.predict("m", np.zeros((5, 48)), batch_size=2, encoding="json")  # rows of flattened samples: a batch
        assert [np.shape(json.loads(body)["inputs"]) for _, body in stub.seen[("POST", "/v1/models/m/predict")]] \
            == [(2, 48), (2, 48), (1, 48)]


@pytest.mark.anyio
async def test_async_one_sample_longer_than_a_batch_is_sent_whole(stub):
    stub.on("GET", "/v1/models/m", Reply(200, {"name": "m", "input": {"name": "input", "shape": [3, 4, 4]}}))
    stub.on("POST", "/v1/models/m/distill", Reply(200, {"model": "m", "version": "1", "logits": [[0.0, 1.0]]}))
    async with AsyncClient(stub.url, STUB_KEY) as c:
        await c.distill("m", np.zeros((3, 4, 4)), batch_size=2, encoding="json")
    assert [np.shape(json.loads(body)["inputs"]) for _, body in stub.seen[("POST", "/v1/models/m/distill")]] \
        == [(1, 3, 4, 4)]


def test_integer_pixel_arrays_are_refused_not_answered(stub):
    """uint8 pixels (an image as numpy holds it) or int tensors are not normalised inputs: the SDK used to convert
    them to float32 and the server answered them as if they were, wrongly. Refused before any request."""
    import torch
    from PIL import Image

    stub.on(*DISTILL_ROUTE, Reply(200, {"model": "m", "version": "1", "logits": [[0.0, 1.0]]}))
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 1, 8, 8)).astype(np.uint8)
    with Client(stub.url, STUB_KEY) as c:
        for inputs in (pixels, pixels.astype(np.int64), torch.from_numpy(pixels), pixels > 0,
                       Image.fromarray(pixels[0, 0])):
            with pytest.raises(BadRequest) as info:
                c.distill_logits("m", inputs)
            assert info.value.code == "invalid_dtype" and "image_path" in info.value.message
            with pytest.raises(BadRequest):
                c.predict("m", inputs)
        with RemoteTeacher(c, "m") as teacher:
            for inputs in (pixels, torch.from_numpy(pixels)):
                with pytest.raises(BadRequest):
                    teacher(inputs)
        assert stub.hits[DISTILL_ROUTE] == 0
        c.distill_logits("m", [[0, 1]])  # a list of numbers as JSON would have them is taken as it is
        assert stub.hits[DISTILL_ROUTE] == 1


def test_integer_arrays_inside_lists_are_refused_too(stub):
    """Only a bare array or tensor was checked: a list of uint8 frames, of uint8 tensors, of PIL images or of bool
    masks went out as 0-255 floats and was answered. Plain Python numbers in nested lists are taken as they are."""
    import torch
    from PIL import Image

    stub.on(*DISTILL_ROUTE, Reply(200, {"model": "m", "version": "1", "logits": [[0.0, 1.0]]}))
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 1, 8, 8)).astype(np.uint8)
    lists = (list(pixels), [torch.from_numpy(p) for p in pixels], [Image.fromarray(pixels[0, 0])],
             list(pixels > 0), [[pixels[0]]], (pixels[0], pixels[1]))
    with Client(stub.url, STUB_KEY) as c, RemoteTeacher(c, "m") as teacher:
        for inputs in lists:
            with pytest.raises(BadRequest) as info:
                c.distill_logits("m", inputs)
            assert info.value.code == "invalid_dtype"
            with pytest.raises(BadRequest):
                c.predict("m", inputs)
            with pytest.raises(BadRequest) as info:
                teacher(inputs)
            assert info.value.code == "invalid_dtype"
        assert stub.hits[DISTILL_ROUTE] == 0
        c.distill_logits("m", [pixels[0].astype(np.float32)])  # float arrays in a list are fine
        c.distill_logits("m", [[[0, 1]]])
        assert stub.hits[DISTILL_ROUTE] == 2


@pytest.mark.anyio
async def test_unusable_temperatures_and_batch_sizes_are_refused_before_any_request(stub):
    """temperature 0/-1/NaN/Inf raised a plain ValueError after the request (its quota spent) or gave zeros;
    batch_size -1 dropped every sample from predict, blamed the server in distill, gave nothing from iter_batches."""
    stub.on(*DISTILL_ROUTE, Reply(200, {"model": "m", "version": "1", "logits": [[0.0, 1.0]]}))
    x = np.zeros((3, 2), np.float32)
    with Client(stub.url, STUB_KEY) as c, RemoteTeacher(c, "m") as teacher:
        for t in (0, -1.0, float("nan"), float("inf"), "4"):
            for call in (lambda t=t: c.distill_logits("m", x, t), lambda t=t: c.distill("m", x, temperature=t),
                         lambda t=t: teacher.soft_targets(x, temperature=t), lambda t=t: RemoteTeacher(c, "m", t)):
                with pytest.raises(ConfigurationError, match="temperature"):
                    call()
        for n in (0, -1, 2.5):
            for call in (lambda n=n: c.predict("m", x, batch_size=n), lambda n=n: c.distill("m", x, batch_size=n),
                         lambda n=n: list(teacher.iter_batches(x, batch_size=n)),
                         lambda n=n: RemoteTeacher(c, "m", None, n)):
                with pytest.raises(ConfigurationError, match="batch_size"):
                    call()
    async with AsyncClient(stub.url, STUB_KEY) as ac:
        for call in (ac.distill_logits("m", x, 0.0), ac.distill("m", x, float("nan")), ac.predict("m", x, batch_size=-1)):
            with pytest.raises(ConfigurationError):
                await call
    assert stub.hits[DISTILL_ROUTE] == 0 and stub.hits[("POST", "/v1/models/m/predict")] == 0


def test_predict_takes_image_bytes_and_pil_images(client, sdb_server, tmp_path):
    from PIL import Image

    png = write_png(tmp_path / "digit.png", sdb_server.bundles.x[0])
    (want,) = client.predict(MODEL, image_path=png, top_k=3)
    Image.open(png).save(tmp_path / "digit.jpg", quality=100)
    jpeg = (tmp_path / "digit.jpg").read_bytes()
    assert client.predict(MODEL, image_path=png.read_bytes(), top_k=3) == [want]
    assert client.predict(MODEL, image_path=Image.open(png), top_k=3) == [want]
    assert len(client.predict(MODEL, image_path=[png, png.read_bytes(), Image.open(png), jpeg])) == 4
    with pytest.raises(BadRequest, match="not int"):
        client.predict(MODEL, image_path=3)


# --------------------------------------------------------------------------- answers that are not the service's
DISTILL_ROUTE = ("POST", "/v1/models/m/distill")
STUB_KEY = "sdb_0123456789ab_" + "e" * 64
PROXY_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n")


def test_an_answer_that_is_not_json_is_an_sdk_error(stub):
    """A 200 HTML page (a captive portal, another server on the port) used to raise json.JSONDecodeError; a
    proxy's HTML error page is an error whose message is the page's title, not its markup."""
    page = Reply(200, b"<!doctype html><html><body>Welcome</body></html>", {"content-type": "text/html"})
    stub.on("GET", "/v1/models", page)
    stub.on(*DISTILL_ROUTE, page)
    stub.on("GET", "/v1/jobs/j1/logs", Reply(200, b"<html>", {"content-type": "application/json"}))
    with Client(stub.url, STUB_KEY) as c:
        for call in (c.models, lambda: c.distill_logits("m", np.zeros((1, 4))),
                     lambda: c.distill_logits("m", np.zeros((1, 4)), encoding="json"), lambda: c.jobs.logs("j1")):
            with pytest.raises(SDBError) as info:
                call()
            assert info.value.code == "malformed_answer" and "is not JSON" in info.value.message
            assert stub.url in info.value.message
        stub.on("GET", "/v1/models", Reply(502, PROXY_502, {"content-type": "text/html"}))
        with pytest.raises(ServerError) as info:
            c.with_options(max_retries=0).models()
        assert (info.value.status, info.value.code, info.value.message) == (502, "bad_gateway", "502 Bad Gateway")
        stub.on("GET", "/v1/models", Reply(401, {"error": "unknown API key"}))  # the v2 routes' error body
        with pytest.raises(AuthError) as info:
            c.models()
        assert info.value.message == "unknown API key"


def test_json_of_another_form_is_an_sdk_error(stub):
    """Another JSON API on that URL (or another version of this one) answers 200 with other fields: each call
    says the answer lacks what it needs, where it raised KeyError or TypeError from inside the SDK."""
    stub.on("GET", "/v1/models", Reply(200, {"data": []}))
    stub.on("POST", "/v1/models/m/predict", Reply(200, {"result": [1]}))
    stub.on(*DISTILL_ROUTE, Reply(200, [0.1, 0.9]))
    stub.on("GET", "/v1/keys", Reply(200, "keys"))
    stub.on("GET", "/v1/files", Reply(200, {"data": []}))
    with Client(stub.url, STUB_KEY) as c:
        for call, field in ((c.models, "'models'"), (lambda: c.predict("m", np.zeros((1, 4))), "'predictions'"),
                            (lambda: c.distill("m", np.zeros((1, 4)), encoding="json"), "'logits'"),
                            (c.keys.list, "list of keys"), (c.files.list, "'files'")):
            with pytest.raises(SDBError) as info:
                call()
            assert info.value.code == "malformed_answer" and field in info.value.message, info.value.message


@pytest.mark.anyio
async def test_async_an_answer_that_is_not_json_is_an_sdk_error(stub):
    stub.on("GET", "/v1/models", Reply(200, b"<html>hi</html>", {"content-type": "text/html"}))
    async with AsyncClient(stub.url, STUB_KEY) as c:
        with pytest.raises(SDBError) as info:
            await c.models()
    assert info.value.code == "malformed_answer"


@pytest.mark.parametrize(("route", "reply", "call"), [
    (DISTILL_ROUTE, Reply(200, {"model": "m", "version": "1", "logits": [[1.0, 2.0], [3.0]]}), "distill"),
    (DISTILL_ROUTE, Reply(200, {"model": "m", "version": "1", "logits": [["a", "b"]]}), "distill"),
    (DISTILL_ROUTE, Reply(200, {"model": "m", "version": "1", "logits": None}), "distill"),
    (DISTILL_ROUTE, Reply(200, {"model": "m", "version": "1", "logits": [1.0, 2.0]}), "distill"),  # 1-D
    (DISTILL_ROUTE, Reply(200, {"model": "m", "version": "1", "logits": [[1.0, 2.0], [3.0, 4.0]]}), "distill"),
    (("POST", "/v1/models/m/predict"), Reply(200, {"predictions": None}), "predict"),
    (("GET", "/v1/jobs/j1"), Reply(200, ["not", "a", "job"]), "wait"),
    (("GET", "/v1/jobs/j1/logs"), Reply(200, {"text": 5}), "logs"),
    (("GET", "/v1/jobs/j1/logs"), Reply(200, {"text": "x", "next_offset": "later"}), "logs"),
    (("GET", "/v1/jobs/j1/logs"), Reply(200, {"lines": [1, 2]}), "logs"),
    (("GET", "/v1/jobs/j1/logs"), Reply(200, b"x", {"content-type": "text/plain", "x-next-offset": "soon"}), "logs"),
], ids=["ragged logits", "logits of strings", "logits null", "logits 1-D", "two rows for one sample",
        "predictions null", "a job that is a list", "log text a number", "log offset not a number", "log lines not text",
        "log header offset not a number"])
@pytest.mark.anyio
async def test_answers_the_sdk_cannot_read_are_sdk_errors_not_python_ones(stub, route, reply, call):
    """A proxy's, another server's or a broken answer raised ValueError, TypeError or AttributeError from inside
    the SDK, or (two rows for one sample) was returned as it was."""
    stub.on(*route, reply)
    calls = {"distill": lambda c: c.distill("m", np.zeros((1, 2), np.float32), encoding="json"),
             "predict": lambda c: c.predict("m", np.zeros((1, 2), np.float32), encoding="json"),
             "wait": lambda c: c.jobs.wait("j1", timeout=5), "logs": lambda c: c.jobs.logs("j1")}
    with Client(stub.url, STUB_KEY) as c, pytest.raises(SDBError) as info:
        calls[call](c)
    assert info.value.code == "malformed_answer", info.value
    async with AsyncClient(stub.url, STUB_KEY) as ac:
        with pytest.raises(SDBError) as info:
            out = calls[call](ac)
            await out
        assert info.value.code == "malformed_answer", info.value


def test_a_forked_child_makes_its_own_connections(stub):
    """A Client used before a fork (a multiprocessing Pool, DataLoader workers) left its keep-alive socket to the
    children: processes on one socket read each other's answers (23 of 512 requests got another worker's logits).
    A child now connects anew, and leaves the parent's connection open for the parent."""
    import multiprocessing

    stub.on("GET", "/v1/models", Reply(200, {"models": []}))
    with Client(stub.url, STUB_KEY) as c:
        c.models()
        child = multiprocessing.get_context("fork").Process(target=c.models)
        child.start()
        child.join(30)
        assert child.exitcode == 0
        c.models()
    parent, forked, again = (h[":client"] for h, _ in stub.seen[("GET", "/v1/models")])
    assert forked != parent and again == parent


def test_an_async_client_outlives_its_event_loop(sdb_server):
    """A second asyncio.run() with the same AsyncClient raised RuntimeError 'Event loop is closed': the connections of
    the first loop are left, and the second opens its own."""
    import asyncio

    c = AsyncClient(sdb_server.url, sdb_server.distill_key)
    for _ in range(2):
        assert asyncio.run(c.distill_logits(MODEL, sdb_server.bundles.x[:2])).shape == (2, 10)
    asyncio.run(c.aclose())


def test_a_client_pickles_for_spawned_workers(sdb_server):
    """A spawn DataLoader pickles its dataset, teacher and client: that raised TypeError (a lock, a socket)."""
    import pickle

    with Client(sdb_server.url, sdb_server.distill_key, batch_size=7, max_retries=1) as c:
        copy = pickle.loads(pickle.dumps(c.with_options(encoding="json")))
        assert (copy.base_url, copy.options) == (c.base_url, c.options.__class__.make(None, 1, 7, encoding="json"))
        assert copy.has_key and sdb_server.distill_key not in repr(copy)
        np.testing.assert_array_equal(copy.distill_logits(MODEL, sdb_server.bundles.x[:3]),
                                      c.distill_logits(MODEL, sdb_server.bundles.x[:3]))
        copy.close()


def test_a_folder_upload_follows_linked_class_folders(admin, sdb_server, tmp_path):
    """A class folder that is a symbolic link was left out of a folder upload, silently (rglob does not descend into
    one), where the local ImageFolder loader reads it; a link back to a folder above is refused, not followed."""
    x = sdb_server.bundles.x
    for i, cls in enumerate(("zero", "one", "elsewhere/two")):
        (tmp_path / cls).mkdir(parents=True)
        for j in range(3):
            write_png(tmp_path / cls / f"{j}.png", x[(3 * i + j) % len(x)])
    folder = tmp_path / "set"
    folder.mkdir()
    for cls in ("zero", "one"):
        (tmp_path / cls).rename(folder / cls)
    (folder / "two").symlink_to(tmp_path / "elsewhere" / "two", target_is_directory=True)
    info = admin.files.upload(folder, "dataset")["info"]
    assert info["classes"] == ["one", "two", "zero"] and info["images"] == 9
    (folder / "one" / "up").symlink_to(folder, target_is_directory=True)
    with pytest.raises(BadRequest, match="links back"):
        admin.files.upload(folder, "dataset")


def test_listing_every_page_stops_when_a_list_does_not_move_on():
    """A proxy or cache that answers every page alike (the same rows, the same next) kept all=True reading for ever."""
    from sdb_client import SDBError
    from sdb_client._base import Page, every

    pages = iter([Page([1, 2], "a"), Page([3], "b"), Page([4], "a")])
    with pytest.raises(SDBError, match="does not move on"):
        every(lambda before: next(pages))
    with pytest.raises(SDBError, match="with no rows"):
        every(lambda before: Page([], "z"))
    pages = iter([Page([1], "a"), Page([2], None)])
    assert list(every(lambda before: next(pages))) == [1, 2]

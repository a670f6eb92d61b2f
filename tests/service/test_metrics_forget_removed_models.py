"""A model name's Prometheus series go with the name's last version: every name ever deployed kept ~90 series (600
names deployed and removed: /metrics from 1,147 series to 55,571, 3 s a scrape, the server 65 KB larger a name), and
the removed names stayed readable by anyone. A name still deployed keeps its own: one whose cache entry was unloaded,
one that lost one version of two.

The real app on a real store, in process (httpx over ASGI), the exposition read with an admin key and with none."""
from __future__ import annotations

import pytest
from starlette.concurrency import run_in_threadpool

from .conftest import make_settings, sdb_bytes, start_service

pytestmark = pytest.mark.anyio

PREDICT = "/v1/models/{name}/predict"
# Each series that names a model: requests, latency, errors, samples (by key id for an admin), batches.
FAMILIES = ("sdb_requests_total", "sdb_request_seconds_bucket", "sdb_errors_total", "sdb_samples_total",
            "sdb_batch_requests_bucket", "sdb_batch_samples_bucket")


@pytest.fixture
async def svc(tmp_path, bundles):
    """digits-a served, with a model cache that holds one version (using another unloads the rest), and no sync
    but the tests' own (a version registered in the store meanwhile is not loaded here)."""
    settings = make_settings(tmp_path / "data", bundles, register_demo=False, model_cache_mb=0.001, models_sync_s=3600)
    service, manager = await start_service(settings, bundles.a)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


async def deploy_as(svc, bundle, name: str) -> str:
    r = await svc.client.post("/v1/models", files={"file": ("m.sdb", sdb_bytes(bundle))}, data={"name": name},
                              headers=svc.admin)
    assert r.status_code == 201, r.text
    return r.json()["version"]


async def use(svc, name: str, x: list) -> None:
    """Requests that make each series naming ``name``: predicts (anonymous and by key), a distill, an error."""
    c = svc.client
    for headers in ({}, svc.admin):
        assert (await c.post(f"/v1/models/{name}/predict", json={"inputs": x}, headers=headers)).status_code == 200
    assert (await c.post(f"/v1/models/{name}/distill", json={"inputs": x}, headers=svc.admin)).status_code == 200
    r = await c.post(f"/v1/models/{name}/predict", json={"inputs": [[0.0]]})
    assert 400 <= r.status_code < 500, r.text


async def naming(svc, name: str) -> list[str]:
    """The exposition's series that name the model ``name``, read with the admin key (every registry) and with
    none (the sums over keys)."""
    found = []
    for headers in (svc.admin, {}):
        r = await svc.client.get("/metrics", headers=headers)
        assert r.status_code == 200, r.text
        found += [line for line in r.text.splitlines() if f'model="{name}"' in line]
    return found


def families(lines: list[str]) -> set[str]:
    return {line.split("{", 1)[0] for line in lines}


async def test_a_removed_name_leaves_no_series_and_names_still_deployed_keep_theirs(svc, bundles):
    x = bundles.x[:2].tolist()
    await deploy_as(svc, bundles.b, "fresh")
    assert await deploy_as(svc, bundles.a, "two") == "1"
    assert await deploy_as(svc, bundles.a2, "two") == "2"
    for name in ("digits-a", "fresh", "two"):
        await use(svc, name, x)
    assert families(await naming(svc, "fresh")) >= set(FAMILIES)
    host = svc.app.state.host
    assert host.loaded("digits-a") not in host.bundles  # unloaded by the cache: still deployed

    r = await svc.client.delete("/v1/models/fresh", headers=svc.admin)
    assert r.status_code == 200, r.text
    r = await svc.client.delete("/v1/models/two", params={"version": "1"}, headers=svc.admin)
    assert r.status_code == 200, r.text

    assert await naming(svc, "fresh") == []
    assert "fresh" not in host._loading  # its load gate (a deploy through the route loads on demand) went too
    for kept in ("digits-a", "two"):
        assert families(await naming(svc, kept)) >= set(FAMILIES), kept

    # What a request in flight as the name went reports late (its batch, its samples, its answer): not the name's
    metrics = svc.app.state.metrics
    metrics.observe_batch("fresh", 1, 2)
    metrics.count_samples("fresh", "predict", "anonymous", 2)
    metrics.observe_request(PREDICT, "POST", "fresh", 200, 0.01)
    assert await naming(svc, "fresh") == []

    # Deployed again: its series start from zero (nothing cached of the old ones is counted, unseen, instead)
    await deploy_as(svc, bundles.b, "fresh")
    await use(svc, "fresh", x)
    text = (await svc.client.get("/metrics")).text
    assert 'sdb_samples_total{kind="predict",model="fresh"} 4.0' in text
    assert f'sdb_requests_total{{method="POST",model="fresh",route="{PREDICT}",status="200"}} 2.0' in text


async def test_a_name_another_process_removed_goes_at_the_sync(svc, bundles):
    await deploy_as(svc, bundles.b, "fresh")
    for name in ("digits-a", "fresh"):
        await use(svc, name, bundles.x[:2].tolist())
    assert await naming(svc, "fresh")
    svc.app.state.store.remove_model("fresh")  # what `sdb models remove` writes
    await run_in_threadpool(svc.app.state.host.sync)
    assert await naming(svc, "fresh") == []
    assert families(await naming(svc, "digits-a")) >= set(FAMILIES)


async def test_a_name_whose_other_version_this_process_has_not_loaded_keeps_its_series(svc, bundles):
    await deploy_as(svc, bundles.a, "two")
    await use(svc, "two", bundles.x[:2].tolist())
    assert svc.app.state.store.add_model("two", "2", str(bundles.a2)) is not None  # another process's deploy
    r = await svc.client.delete("/v1/models/two", params={"version": "1"}, headers=svc.admin)
    assert r.status_code == 200, r.text
    assert "two" not in svc.app.state.host  # none of its versions served here, but the name is still deployed
    assert families(await naming(svc, "two")) >= set(FAMILIES)
    r = await svc.client.delete("/v1/models/two", params={"version": "2"}, headers=svc.admin)  # never loaded here
    assert r.status_code == 200, r.text
    assert await naming(svc, "two") == []

"""POST /v1/models against the callers that race it, each forced at the exact point between the deploy's steps (the
app's real host and store, one of their methods wrapped to let the other caller's real route go first): a removal
of the model between the version's registration and its install, one after the install, and the deploying key
revoked before the version is added. On SQLite and on PostgreSQL."""
from __future__ import annotations

import functools

import anyio
import pytest

from service.registry import ModelHost
from service.store import Store

from .conftest import deploy

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]


@pytest.fixture
def svc(bare_svc):
    return bare_svc


def routed(svc, method: str, url: str, headers: dict):
    """A request through the app's route, from the thread a deploy runs in (blocks it until answered)."""
    return anyio.from_thread.run(functools.partial(svc.client.request, method, url, headers=headers))


def around_serve(monkeypatch, host: ModelHost, *, before=None, after=None) -> None:
    """The host's next installs run ``before`` just before and ``after`` just after (the deploy's thread)."""
    def serve(row, bundle):
        if before is not None:
            before()
        model = ModelHost.serve(host, row, bundle)
        if after is not None:
            after()
        return model
    monkeypatch.setattr(host, "serve", serve)


async def test_a_version_removed_before_its_install_is_never_served(svc, bundles, monkeypatch):
    removals = []
    around_serve(monkeypatch, svc.app.state.host,
                 before=lambda: removals.append(routed(svc, "DELETE", "/v1/models/digits-a", svc.admin)))
    r = await deploy(svc.client, bundles.a, svc.admin)
    assert [x.status_code for x in removals] == [200]
    assert removals[0].json()["removed"] == [{"name": "digits-a", "version": "1"}]
    # what is true: version 1 was deployed and removed before it was served (it was a 201 and a zombie)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_removed", r.text
    assert "version '1'" in r.json()["error"]["message"]
    assert svc.app.state.host.loaded("digits-a") is None  # served until the next sync, as a removed version
    predict = await svc.client.post("/v1/models/digits-a/predict", params={"version": "1"},
                                    json={"inputs": bundles.x[:1].tolist()}, headers=svc.admin)
    assert predict.status_code == 404, predict.text
    assert (await svc.client.get("/v1/models/digits-a", headers=svc.admin)).status_code == 404
    again = await svc.client.delete("/v1/models/digits-a", headers=svc.admin)
    assert again.status_code == 404  # nothing left to remove: the first removal's answer stands
    monkeypatch.undo()  # the next deploy of the name serves its next version
    r = await deploy(svc.client, bundles.a, svc.admin)
    assert r.status_code == 201 and r.json()["version"] == "2", r.text


async def test_a_deploy_removed_after_its_install_answers_the_version_it_deployed(svc, bundles, monkeypatch):
    removals = []
    around_serve(monkeypatch, svc.app.state.host,
                 after=lambda: removals.append(routed(svc, "DELETE", "/v1/models/digits-a", svc.admin)))
    r = await deploy(svc.client, bundles.a, svc.admin)
    assert [x.status_code for x in removals] == [200]
    # the deploy succeeded (the removal took what it deployed): described from what it installed, not a 404
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "digits-a" and r.json()["version"] == "1" and r.json()["distillable"] is True
    assert svc.app.state.host.loaded("digits-a") is None  # and the removal stands


async def test_a_key_revoked_during_its_deploy_answers_401_as_every_route_does(svc, bundles, monkeypatch):
    store: Store = svc.app.state.store
    token = svc.key(("deploy",))
    key_id = token.split("_")[1]
    revocations = []

    def add_version(*args, **kw):  # the admin's revocation, through its route, just before the version is added
        revocations.append(routed(svc, "DELETE", f"/v1/keys/{key_id}", svc.admin))
        return Store.add_version(store, *args, **kw)

    monkeypatch.setattr(store, "add_version", add_version)
    r = await deploy(svc.client, bundles.a, svc.auth(token))
    assert [x.status_code for x in revocations] == [200]
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_invalid", r.text  # was a 403
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert store.get_model("digits-a", None) is None
    assert list((svc.settings.bundles_dir / "digits-a").glob("*")) == []  # its copy went with the refusal
    # the key's next request: the 401 of a revoked key (the deploy said the same)
    assert (await deploy(svc.client, bundles.a, svc.auth(token))).status_code == 401

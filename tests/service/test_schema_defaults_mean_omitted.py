"""A client generated from ``/openapi.json`` (or the console's form built from a job kind's params schema) sends every
field's schema default, so a schema default must mean what leaving the field out means (as for deploy and predict:
tests/security/test_schema_defaults_never_widen_the_served_policy.py).

It did not for two more fields. An ``audit`` job's ``policy`` defaulted to ``probs`` while an omitted one is the
policy the model is served with: such a client's audit of a label-served model was a 422 for a non-admin key, and an
admin's audited probs. A style request's ``"alpha": null`` (its schema default) overrode ``?alpha=``, which was then
silently ignored."""
from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import anyio
import numpy as np
import pytest
from PIL import Image

from service.jobs.worker import run_worker

from .conftest import make_settings, sdb_bytes, start_service

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------------------------------------- audit jobs
@pytest.fixture
async def svc(tmp_path, bundles):
    """digits-a served under the label policy, digits-b under top_k with k = 2 (both deployed by an admin)."""
    service, manager = await start_service(make_settings(tmp_path / "data", bundles))
    for bundle, policy in ((bundles.a, {"policy": "label"}), (bundles.b, {"policy": "top_k", "top_k": "2"})):
        r = await service.client.post("/v1/models", data=policy, headers=service.admin,
                                      files={"file": (f"{bundle.name}.sdb", sdb_bytes(bundle))})
        assert r.status_code == 201, r.text
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


async def audit_defaults(svc, headers: dict) -> dict:
    """Every audit param its schema (as GET /v1/job-kinds gives it) has a default for, with that default."""
    kinds = (await svc.client.get("/v1/job-kinds", headers=headers)).json()["kinds"]
    props = next(k for k in kinds if k["name"] == "audit")["params_schema"]["properties"]
    assert {"policy", "top_k"} <= props.keys()
    return {k: p["default"] for k, p in props.items() if "default" in p}


async def submit(svc, headers: dict, params: dict):
    return await svc.client.post("/v1/jobs", json={"kind": "audit", "params": params}, headers=headers)


async def audited_policy(svc, headers: dict, params: dict) -> tuple[str, int]:
    r = await submit(svc, headers, params)
    assert r.status_code == 202, r.text
    p = r.json()["params"]  # what the worker runs: the policy resolved at submission
    return p["policy"], p["top_k"]


async def test_an_audit_with_every_schema_default_runs_under_the_served_policy(svc):
    user, admin = svc.auth(svc.key(("jobs",))), svc.admin
    defaults = await audit_defaults(svc, user)
    on = {"a": {**defaults, "target": {"model": "digits-a"}, "data": "digits"},
          "b": {**defaults, "target": {"model": "digits-b"}, "data": "digits"}}
    for headers in (user, admin):  # an admin's left-out policy is the served one too
        assert (await audited_policy(svc, headers, on["a"]))[0] == "label"
        assert await audited_policy(svc, headers, on["b"]) == ("top_k", 2)
        nulls = {**on["b"], "policy": None, "top_k": None}  # null where a client sends one: not given
        assert await audited_policy(svc, headers, nulls) == ("top_k", 2)
    # a value given is kept: the served one for any key, another one for an admin's alone
    assert (await audited_policy(svc, user, {**on["a"], "policy": "label"}))[0] == "label"
    assert await audited_policy(svc, user, {**on["b"], "top_k": 2}) == ("top_k", 2)
    assert (await audited_policy(svc, admin, {**on["a"], "policy": "probs"}))[0] == "probs"
    assert await audited_policy(svc, admin, {**on["b"], "top_k": 4}) == ("top_k", 4)
    for other in ({**on["a"], "policy": "probs"}, {**on["b"], "top_k": 4}, {**on["b"], "policy": "label"}):
        r = await submit(svc, user, other)
        assert r.status_code == 422 and "served under" in r.json()["error"]["message"], r.text


async def test_the_worker_audits_the_served_policy(svc):
    user = svc.auth(svc.key(("jobs",)))
    # enough for digits-a's labels-only reference to learn (tests/service/test_jobs_audit.py's TINY says why)
    tiny = {"transfer": 200, "steps": 100, "keys": 1, "families": ["labels", "kd"], "seeds": [0]}
    params = {**await audit_defaults(svc, user), **tiny, "target": {"model": "digits-a"}, "data": "digits"}
    r = await submit(svc, user, params)
    assert r.status_code == 202, r.text
    await anyio.to_thread.run_sync(lambda: run_worker(svc.settings, once=True))
    job = (await svc.client.get(f"/v1/jobs/{r.json()['id']}", headers=user)).json()
    assert job["status"] == "succeeded", job
    assert job["result"]["policy"] == "label"


# ---------------------------------------------------------------------------------------------- style alpha
@pytest.fixture(scope="module")
def adain_bundle(tmp_path_factory):
    import torch

    from sdb_core.protect.key import load_or_create_master_key
    from sdb_core.style import adain
    from sdb_core.style.export import export_style_bundle
    from sdb_core.style.loss_net import LossNetConfig

    root = tmp_path_factory.mktemp("adain")
    load_or_create_master_key(root / "master.key")
    a = adain.train(adain.AdaINConfig(size=32, crop=32, epochs=1, samples=8, styles=("flower",),
                                      loss_net=LossNetConfig(width=0.125)))
    with torch.no_grad():  # two steps leave the decoder's output below 0, all black once clamped: centre it
        a.net.decoder.stages[-1][-1][-1].bias.fill_(0.5)
    a.net.cpu()
    return SimpleNamespace(master_key_file=root / "master.key",
                           path=export_style_bundle(a, root / "adain.sdb", name="anystyle", size=32))


@pytest.fixture
async def style_svc(tmp_path, adain_bundle):
    service, manager = await start_service(make_settings(tmp_path / "data", adain_bundle), adain_bundle.path)
    yield service
    await service.client.aclose()
    await manager.__aexit__(None, None, None)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


async def test_a_null_alpha_in_the_body_leaves_the_querys(style_svc):
    c = style_svc.client
    content, style = _png(1), _png(2)
    body = {"image": base64.b64encode(content).decode(), "style": base64.b64encode(style).decode()}
    images = {"file": ("c.png", content, "image/png"), "style": ("s.png", style, "image/png")}

    async def styled(query: str = "", **kw) -> bytes:
        r = await c.post(f"/v1/style/anystyle{query}", **kw)
        assert r.status_code == 200, r.text
        return r.content

    at_03, at_1 = await styled(json={**body, "alpha": 0.3}), await styled(json=body)
    assert at_03 != at_1  # alpha shows in the image
    assert await styled("?alpha=0.3", json={**body, "alpha": None}) == at_03
    assert await styled("?alpha=0.3", data={"alpha": ""}, files=images) == at_03  # an empty form field alike
    assert await styled("?alpha=0.3", json={**body, "alpha": 0.3}) == at_03  # the same in both: fine
    # two different values: a 422 naming both (the body's used to win silently)
    r = await c.post("/v1/style/anystyle?alpha=0.3", json={**body, "alpha": 0.5})
    assert r.status_code == 422 and r.json()["error"]["code"] == "conflicting_options", r.text
    r = await c.post("/v1/style/anystyle?alpha=0.3", data={"alpha": "0.5"}, files=images)
    assert r.status_code == 422 and r.json()["error"]["code"] == "conflicting_options", r.text

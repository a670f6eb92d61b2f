"""Hole 9: a model version's output policy is the server's, on every public route.

Before the fix every public route served every probability, unrounded: the leak audit's ``top_k``
and ``label`` policies were something no owner could deploy. Now a version is deployed with a policy
(``probs``, ``top_k`` with its k, ``label``) and a rounding, and v1 predict (JSON, a multipart image, a
raw image) and v2 infer let out exactly what it allows: ``top_k`` the k highest renormalised and no
other class at all, ``label`` the predicted label and no score. The keyed path is not subject to it.
The audit's policies and the server's are one meaning: :func:`service.inference.public_view` equals
``sdb_core.protect.attacks.apply_policy``. Against the real server: ``sdb serve`` on a loopback port,
SQLite store.
"""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from sdb_core.bundle import load_bundle
from service.tensors import image_to_input
from tests.service.conftest import Server, run_sdb, sdb_bytes, sdb_env
from tests.service.jobs_helpers import key, prepare

POLICIES = {  # name served → the deploy's form fields
    "pol-probs": {"policy": "probs", "decimals": "3"},
    "pol-topk": {"policy": "top_k", "top_k": "3", "decimals": "4"},
    "pol-label": {"policy": "label"},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    data_dir = tmp_path_factory.mktemp("policy-data")
    settings = prepare(data_dir, bundles)
    srv = Server(data_dir, bundles, {"SDB_REGISTER_DEMO": "false"})
    srv.settings = settings
    srv.admin = {"Authorization": f"Bearer {key(settings, ['admin'])}"}
    for name, fields in POLICIES.items():
        r = httpx.post(srv.url + "/v1/models", files={"file": ("a.sdb", sdb_bytes(bundles.a))},
                       data={"name": name, **fields}, headers=srv.admin, timeout=60)
        assert r.status_code == 201, r.text
    yield srv
    srv.stop()


def reference(bundles) -> np.ndarray:
    return load_bundle(bundles.a).predict(bundles.x)  # the public path's probabilities, unrounded


def png(x: np.ndarray, norm: dict) -> bytes:
    """One normalised digits input, (1, 8, 8), as an 8×8 greyscale PNG."""
    pixels = (x[0] * norm["std"][0] + norm["mean"][0]) * 255.0
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def decimals_of(values) -> int:
    """The most decimals any value needs (0.125 → 3)."""
    return max(len(repr(float(v)).split(".")[1].rstrip("0")) if "e" not in repr(float(v)) else 99 for v in values)


def check_v1(predictions: list[dict], ref: np.ndarray, policy: str) -> None:
    for p, row in zip(predictions, ref):
        order = np.argsort(-row, kind="stable")
        if policy == "pol-label":
            assert set(p) == {"labels", "indices"}, p  # no score at all
            assert p["indices"] == [int(order[0])] and p["labels"] == [str(order[0])]
        elif policy == "pol-topk":
            assert set(p) == {"labels", "indices", "scores"}
            assert p["indices"] == order[:3].tolist(), "at most the policy's k classes, whatever top_k asked"
            top = row[order[:3]] / row[order[:3]].sum()
            np.testing.assert_allclose(p["scores"], np.round(top, 4), atol=2e-4)
            assert decimals_of(p["scores"]) <= 4 and abs(sum(p["scores"]) - 1) < 1e-3
        else:
            assert p["indices"] == order[:10].tolist()
            np.testing.assert_allclose(p["scores"], np.round(row[order[:10]], 3), atol=2e-3)
            assert decimals_of(p["scores"]) <= 3


@pytest.mark.parametrize("name", list(POLICIES))
def test_v1_predict_json_and_images_serve_only_what_the_policy_allows(server, bundles, name):
    ref = reference(bundles)
    url = f"{server.url}/v1/models/{name}/predict"
    r = httpx.post(url, json={"inputs": bundles.x.tolist(), "top_k": 10})
    assert r.status_code == 200, r.text
    check_v1(r.json()["predictions"], ref, name)
    # an image, as a multipart upload and as the raw body: the same policy
    bundle = load_bundle(bundles.a)
    image = png(bundles.x[0], bundle.meta["normalize"])
    as_decoded = bundle.predict(image_to_input(image, [1, 8, 8], bundle.meta["normalize"])[None])
    multipart = httpx.post(url, files={"file": ("d.png", image, "image/png")}, data={"top_k": "10"})
    raw = httpx.post(url + "?top_k=10", content=image, headers={"content-type": "image/png"})
    for resp in (multipart, raw):
        assert resp.status_code == 200, resp.text
        check_v1(resp.json()["predictions"], as_decoded, name)


def v2(server, name: str, x: np.ndarray, *outputs: str, headers=None) -> httpx.Response:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    return httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, headers=headers or {})


def test_v2_infer_serves_only_what_the_policy_allows(server, bundles):
    ref = reference(bundles)
    order = np.argsort(-ref, axis=1, kind="stable")
    n = len(bundles.x)

    out = {o["name"]: o for o in v2(server, "pol-probs", bundles.x).json()["outputs"]}
    assert set(out) == {"probabilities"} and out["probabilities"]["shape"] == [n, 10]
    np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (n, 10)), np.round(ref, 3), atol=2e-3)
    assert decimals_of(out["probabilities"]["data"]) <= 3

    # top_k: [N, k] probabilities and their classes; the other classes are absent, not zero-filled
    out = {o["name"]: o for o in v2(server, "pol-topk", bundles.x).json()["outputs"]}
    assert set(out) == {"probabilities", "classes"}
    assert out["probabilities"]["shape"] == out["classes"]["shape"] == [n, 3]
    assert out["classes"]["datatype"] == "INT64"
    assert np.reshape(out["classes"]["data"], (n, 3)).tolist() == order[:, :3].tolist()
    top = np.take_along_axis(ref, order[:, :3], 1)
    np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (n, 3)),
                               np.round(top / top.sum(1, keepdims=True), 4), atol=2e-4)
    assert decimals_of(out["probabilities"]["data"]) <= 4

    # label: the class alone; asking for probabilities is refused, not answered
    out = {o["name"]: o for o in v2(server, "pol-label", bundles.x).json()["outputs"]}
    assert set(out) == {"classes"} and out["classes"]["shape"] == [n, 1]
    assert out["classes"]["data"] == order[:, 0].tolist()
    r = v2(server, "pol-label", bundles.x, "probabilities")
    assert r.status_code == 422 and "probabilities" in r.json()["error"], r.text  # v2: the message alone

    # the metadata says what each policy serves (and the keyed output, for a distill key)
    meta = {name: httpx.get(f"{server.url}/v2/models/{name}").json()["outputs"] for name in POLICIES}
    assert {name: [(o["name"], o["shape"]) for o in outs] for name, outs in meta.items()} == {
        "pol-probs": [("probabilities", [-1, 10]), ("distill_logits", [-1, 10])],
        "pol-topk": [("probabilities", [-1, 3]), ("classes", [-1, 3]), ("distill_logits", [-1, 10])],
        "pol-label": [("classes", [-1, 1]), ("distill_logits", [-1, 10])]}


def test_classification_ranks_no_more_than_the_policy_lets_out(server, bundles):
    # the classification extension (tritonclient's class_count) reads what the policy serves, never the rest
    ref, n = reference(bundles), len(bundles.x)
    order = np.argsort(-ref, axis=1, kind="stable")

    def ranked(name: str, output: str, k: int) -> httpx.Response:
        return httpx.post(f"{server.url}/v2/models/{name}/infer", json={
            "inputs": [{"name": "input", "shape": list(bundles.x.shape), "datatype": "FP32",
                        "data": bundles.x.ravel().tolist()}],
            "outputs": [{"name": output, "parameters": {"classification": k}}]})

    def parts(r: httpx.Response) -> tuple[list, np.ndarray, np.ndarray]:
        o = r.json()["outputs"][0]
        cells = [e.split(":") for e in o["data"]]
        return o["shape"], np.array([float(c[0]) for c in cells]), np.array([int(c[1]) for c in cells])

    # top_k (3): asking for all ten ranks the three it serves, renormalised and rounded as they are served
    shape, values, classes = parts(ranked("pol-topk", "probabilities", 10))
    top = np.take_along_axis(ref, order[:, :3], 1)
    assert shape == [n, 3] and classes.reshape(n, 3).tolist() == order[:, :3].tolist()
    np.testing.assert_allclose(values.reshape(n, 3), np.round(top / top.sum(1, keepdims=True), 4), atol=2e-4)
    assert decimals_of(values.tolist()) <= 4
    shape, values, _ = parts(ranked("pol-probs", "probabilities", 2))
    assert shape == [n, 2] and decimals_of(values.tolist()) <= 3
    # label: nothing to rank
    for output in ("classes", "probabilities"):
        r = ranked("pol-label", output, 1)
        assert r.status_code == 422 and "output" in r.json()["error"], r.text


def test_the_keyed_path_and_the_model_description(server, bundles):
    distiller = {"Authorization": f"Bearer {key(server.settings, ['distill'])}"}
    ref = load_bundle(bundles.a, server.settings.master_key).distill_logits(bundles.x)
    r = httpx.post(f"{server.url}/v1/models/pol-label/distill", json={"inputs": bundles.x.tolist()}, headers=distiller)
    assert r.status_code == 200, r.text  # the keyed path answers logits: the policy is the public path's
    np.testing.assert_allclose(r.json()["logits"], ref, rtol=1e-4, atol=1e-4)
    r = v2(server, "pol-label", bundles.x, "distill_logits", headers=distiller)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [len(bundles.x), 10]
    shown = {name: httpx.get(f"{server.url}/v1/models/{name}").json()["output_policy"] for name in POLICIES}
    assert shown == {"pol-probs": {"policy": "probs", "top_k": None, "decimals": 3},
                     "pol-topk": {"policy": "top_k", "top_k": 3, "decimals": 4},
                     "pol-label": {"policy": "label", "top_k": None, "decimals": None}}


@pytest.mark.parametrize(("fields", "needle"), [
    ({"policy": "everything"}, "policy"),
    ({"policy": "label", "top_k": "2"}, "top_k"),
    ({"policy": "label", "decimals": "3"}, "decimals"),
    ({"policy": "top_k", "top_k": "0"}, "top_k"),
    ({"decimals": "20"}, "decimals"),
    ({"policy": "top_k", "top_k": "10"}, "not fewer than the model's 10 classes"),  # every class: probs renamed
])
def test_a_bad_policy_is_refused_at_registration(server, bundles, fields, needle):
    r = httpx.post(server.url + "/v1/models", files={"file": ("a.sdb", sdb_bytes(bundles.a))},
                   data={"name": "pol-bad", **fields}, headers=server.admin, timeout=60)
    assert r.status_code == 422 and needle in r.json()["error"]["message"], r.text
    assert httpx.get(f"{server.url}/v1/models/pol-bad").status_code == 404


def test_sdb_models_add_sets_the_policy(server, bundles):
    env = sdb_env(server.settings.data_dir, bundles)
    r = run_sdb("models", "add", str(bundles.b), "--policy", "top_k", "--top-k", "2", "--decimals", "2", env=env)
    assert r.returncode == 0 and "top_k=2/2dp" in r.stdout, r.stderr
    out = httpx.post(f"{server.url}/v1/models/digits-b/predict", json={"inputs": bundles.x[:2].tolist()}).json()
    assert all(len(p["scores"]) == 2 and decimals_of(p["scores"]) <= 2 for p in out["predictions"])
    bad = run_sdb("models", "add", str(bundles.a2), "--policy", "label", "--top-k", "2", env=env)
    assert bad.returncode == 2 and "top_k" in bad.stderr


def test_a_bundle_is_served_with_its_own_policy_unless_the_deploy_names_one(server, bundles, tmp_path):
    """A box wrapped with ``--policy`` carries it in meta.json: a deploy that names none serves with it."""
    import torch

    from sdb_core.bundle import export_bundle

    plain = export_bundle(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), tmp_path / "own.sdb",
                          name="pol-own", in_shape=(1, 8, 8), mean=(0.0,), std=(1.0,),
                          extra={"output_policy": {"policy": "top_k", "top_k": 2}})
    served = {}
    for name, fields in (("pol-own", {}), ("pol-own-probs", {"policy": "probs"})):
        r = httpx.post(server.url + "/v1/models", files={"file": ("own.sdb", plain.read_bytes())},
                       data={"name": name, **fields}, headers=server.admin, timeout=60)
        assert r.status_code == 201, r.text
        served[name] = r.json()["output_policy"]
    assert served == {"pol-own": {"policy": "top_k", "top_k": 2, "decimals": None},
                      "pol-own-probs": {"policy": "probs", "top_k": None, "decimals": None}}
    out = httpx.post(f"{server.url}/v1/models/pol-own/predict", json={"inputs": bundles.x[:2].tolist()}).json()
    # a bundle exported without labels names its classes by index (it answered empty lists before)
    assert all(len(p["scores"]) == 2 and p["labels"] == [str(i) for i in p["indices"]] for p in out["predictions"]), out


@pytest.mark.parametrize("fields", [{"policy": "probs"}, {"policy": "top_k", "top_k": 1}, {"policy": "top_k"},
                                    {"policy": "top_k", "top_k": 10}, {"policy": "label"}])
def test_the_server_and_the_audit_mean_the_same_policy(fields):
    import torch

    from sdb_core.protect.attacks import apply_policy
    from service.inference import public_view
    from service.schemas import OutputPolicy

    policy = OutputPolicy(**fields)

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.3), size=64).astype(np.float32)
    audit = apply_policy(torch.from_numpy(probs), policy.policy, policy.top_k or 3).numpy()
    np.testing.assert_allclose(public_view(probs, policy), audit, rtol=1e-5, atol=1e-6)


def test_an_audit_job_runs_under_the_policy_the_model_is_served_with(server):
    """What callers of a `label` model get is all an attacker gets: a jobs key cannot audit (train
    students on) its full probabilities; an admin may, to see what a policy change would leak."""
    user = {"Authorization": f"Bearer {key(server.settings, ['jobs'])}"}
    audit = {"target": {"model": "pol-label"}, "data": "digits", "transfer": 60, "steps": 30, "keys": 0}

    def submit(params, headers):
        return httpx.post(f"{server.url}/v1/jobs", json={"kind": "audit", "params": params}, headers=headers)

    r = submit(audit, user)
    assert r.status_code == 202 and r.json()["params"]["policy"] == "label", r.text
    r = submit({**audit, "target": {"model": "pol-topk"}}, user)
    assert r.status_code == 202 and (r.json()["params"]["policy"], r.json()["params"]["top_k"]) == ("top_k", 3)
    r = submit({**audit, "policy": "probs"}, user)
    assert r.status_code == 422 and "served under the 'label' policy" in r.text, r.text
    r = submit({**audit, "policy": "probs"}, server.admin)
    assert r.status_code == 202 and r.json()["params"]["policy"] == "probs", r.text

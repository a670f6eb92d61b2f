"""The OpenAPI schema is the contract: schemathesis drives the real app from it, in process.

Every operation is fuzzed twice, with an admin key and with none (so the 401s are exercised too),
from the schema alone: positive and negative cases, bounded and derandomized so CI is deterministic
(``SDB_CONTRACT_EXAMPLES`` raises the bound for a longer local run). Every answer must be no 5xx, a
documented status, the documented content type and a body that matches its documented schema.
A plain walk over ``app.openapi()`` checks what the fuzzing cannot: that every operation documents
its errors and an example, and that every ``$ref`` resolves.
"""
from __future__ import annotations

import copy
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from sdb_core.bundle import export_bundle
from sdb_core.distill.okdhp import OKDHPConfig, PoseDataConfig, export_pose_bundle, okdhp, pose_train_config
from sdb_core.protect import Thresholds
from service.app import build_app
from service.auth import create_key
from service.errors import is_v2
from service.settings import Settings

from .conftest import make_settings, sdb_bytes

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# The v1 inference routes take .npy bodies (service/npy.py): fuzzed as the raw bytes they are.
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")
EXAMPLES = int(os.environ.get("SDB_CONTRACT_EXAMPLES", "20"))
MODEL = "mnist-demo"  # the name the schema's examples use: the fuzzer's examples reach a served model
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


@dataclass
class Live:
    app: object
    client: object  # a requests session whose transport is the app, in process
    admin: dict


# The schema the app serves at /openapi.json, taken from an app that is never started (its routes are
# the live one's, test_the_schema_is_the_one_served): pytest needs the operations at collection.
OPENAPI = build_app(Settings(data_dir=Path("never-created"))).openapi()
schema = schemathesis.openapi.from_dict(copy.deepcopy(OPENAPI))


@pytest.fixture(scope="module")
def live(tmp_path_factory, bundles):
    # Rate limits out of the way: a 429 would hide what the route itself answers (429 is checked below).
    s = make_settings(tmp_path_factory.mktemp("contract") / "data", bundles, rate_limit_key_per_s=1e6,
                      rate_limit_key_burst=10**6, rate_limit_address_per_s=1e6, rate_limit_address_burst=10**6)
    app = build_app(s)
    try:
        with asgi.get_client(app) as client:  # starts the app's lifespan
            token, _ = create_key(app.state.store, s.pepper, scopes=["admin"])
            admin = {"Authorization": f"Bearer {token}"}
            for bundle in (bundles.a, bundles.a2):  # versions 1 and 2 of the examples' model
                r = client.post("/v1/models", files={"file": ("m.sdb", sdb_bytes(bundle))}, data={"name": MODEL},
                                headers=admin)
                assert r.status_code == 201, r.text
            yield Live(app, client, admin)
    finally:
        asgi.shutdown_lifespans()  # schemathesis keeps an app it started alive until asked


def call(case, live: Live, headers: dict | None = None):
    return case.call_and_validate(session=live.client, base_url=live.client.base_url, headers=headers,
                                  checks=CHECKS)


# Excluded with an admin key: DELETE /v1/models/{name} would stop serving the example model that every
# other case needs (it is fuzzed without a key below, and its admin answers are checked in
# test_model_deploy_and_removal_conform).
@schema.exclude(method="DELETE", path="/v1/models/{name}").parametrize()
@FUZZ
def test_fuzz_with_an_admin_key(case, live):
    call(case, live, live.admin)


@schema.parametrize()
@FUZZ
def test_fuzz_without_a_key(case, live):
    call(case, live)


# ---------------------------------------------------------------- the schema itself
OPERATIONS = [(path, method, op) for path, ops in OPENAPI["paths"].items() for method, op in ops.items()]

ANY_KEY = {("get", "/v1/keys/me")}  # any valid key may call these: there is no scope to lack, no 403


def resolve(ref: str) -> dict:
    assert ref.startswith("#/"), ref
    node = OPENAPI
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if isinstance(node.get("$ref"), str) else [r for v in node.values() for r in refs(v)]
    return [r for v in node for r in refs(v)] if isinstance(node, list) else []


def test_the_schema_is_the_one_served(live):
    assert live.client.get("/openapi.json").json() == OPENAPI


def test_the_document_is_valid_openapi_3_1():
    """What strict validators and client generators read first: a Media Type Object with a description (the
    .npy bodies' had one) made the whole document invalid."""
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in OpenAPIV31SpecValidator(OPENAPI).iter_errors()]
    assert not errors, errors[:5]


def test_every_ref_resolves():
    missing = sorted({r for r in refs(OPENAPI) if not _resolves(r)})
    assert not missing, f"dangling $ref: {missing}"
    for path, method, op in OPERATIONS:  # a body schema stands alone: no pydantic "#/$defs/..." left in it
        assert "$defs" not in str(op.get("requestBody", {})), (method, path)


def _resolves(ref: str) -> bool:
    try:
        resolve(ref)
    except (KeyError, AssertionError):
        return False
    return True


def _has_example(media: dict) -> bool:
    schema = media.get("schema", {})
    schema = resolve(schema["$ref"]) if "$ref" in schema else schema
    return any(k in media for k in ("example", "examples")) or "examples" in schema


@pytest.mark.parametrize("path,method,op", OPERATIONS, ids=[f"{m.upper()} {p}" for p, m, _ in OPERATIONS])
def test_every_operation_documents_its_errors_and_an_example(path, method, op):
    responses = op["responses"]
    statuses = {int(s) for s in responses}
    assert 401 in statuses, (method, path)  # a key in the URL is a 401 on every route (service/middleware.py)
    if "security" in op:  # it reads a key: a bad one, a missing scope, a bad request and the rate all answer
        needed = {401, 422, 429} | (set() if (method, path) in ANY_KEY else {403})
        assert needed <= statuses, (method, path, sorted(statuses))
    error_model = "#/components/schemas/" + ("V2Error" if path.startswith("/v2") else "ErrorBody")
    for status in statuses - {s for s in statuses if s < 400}:
        content = responses[str(status)].get("content", {})
        assert list(content) == ["application/json"], (method, path, status, list(content))
        assert content["application/json"]["schema"] == {"$ref": error_model}, (method, path, status)
    success = [responses[str(s)] for s in statuses if s < 300]
    assert len(success) == 1, (method, path)
    body = op.get("requestBody", {}).get("content", {})
    if "application/json" in body:
        assert _has_example(body["application/json"]), f"{method} {path}: no request example"
    documented = [m for m in success[0]["content"].values() if _has_example(m)]
    binary = all(m.get("schema", {}).get("format") == "binary" for m in success[0]["content"].values())
    assert documented or (binary and body), f"{method} {path}: no example of its answer"


# ---------------------------------------------------------------- answers the fuzzer rarely reaches
def check(live: Live, path: str, method: str, status: int, headers: dict | None = None, **case):
    """One request built from the schema's own operation, its answer held to the same checks."""
    r = call(schema[path][method].Case(**case), live, headers)
    assert r.status_code == status, (method, path, r.status_code, r.text[:300])
    return r


def _png(side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "PNG")
    return buf.getvalue()


def test_success_answers_conform(live, bundles):
    x, admin, name = bundles.x[:2], live.admin, {"name": MODEL}
    json_body = {"media_type": "application/json"}
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v2", "/v2/health/live", "/v2/health/ready"):
        check(live, path, "GET", 200)
    check(live, "/metrics", "GET", 200, admin)
    check(live, "/v1/models/{name}", "GET", 200, path_parameters=name, query={"version": "1"})
    check(live, "/v1/models/{name}/predict", "POST", 200, path_parameters=name,
          body={"inputs": x.tolist(), "top_k": 3}, **json_body)
    check(live, "/v1/models/{name}/predict", "POST", 200, path_parameters=name, body={"file": [_png()]},
          media_type="multipart/form-data")
    check(live, "/v1/models/{name}/distill", "POST", 200, admin, path_parameters=name,
          body={"inputs": x.tolist(), "temperature": 2.0}, **json_body)
    npy_x = io.BytesIO()
    np.save(npy_x, x)
    for accept in ("application/x-npy", "application/json"):  # .npy in; .npy or JSON out
        r = check(live, "/v1/models/{name}/distill", "POST", 200, {**admin, "Accept": accept}, path_parameters=name,
                  query={"temperature": 2.0}, body=npy_x.getvalue(), media_type="application/x-npy")
        assert r.headers["content-type"] == [accept]  # schemathesis keeps every value of a header
    check(live, "/v1/models/{name}/predict", "POST", 200, path_parameters=name, query={"top_k": 2},
          body=npy_x.getvalue(), media_type="application/x-npy")
    v2 = {"id": "r1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                  "data": x.ravel().tolist()}]}
    check(live, "/v2/models/{name}/infer", "POST", 200, admin, path_parameters=name, **json_body,
          body={**v2, "outputs": [{"name": "probabilities"}, {"name": "distill_logits"}]})
    check(live, "/v2/models/{name}/versions/{version}/infer", "POST", 200, path_parameters={**name, "version": "1"},
          body=v2, **json_body)
    for path in ("/v2/models/{name}", "/v2/models/{name}/ready"):
        check(live, path, "GET", 200, path_parameters=name)
        check(live, path.replace("{name}", "{name}/versions/{version}"), "GET", 200,
              path_parameters={**name, "version": "2"})
    # a style route asked of a classifier: the documented 400 naming its route
    check(live, "/v1/style/{name}", "POST", 400, path_parameters=name, body={"file": _png()},
          media_type="multipart/form-data")


def test_keys_files_and_jobs_answers_conform(live):
    admin = live.admin
    created = check(live, "/v1/keys", "POST", 201, admin, body={"scopes": ["jobs"], "name": "contract"},
                    media_type="application/json").json()
    check(live, "/v1/keys", "GET", 200, admin)
    check(live, "/v1/keys/{key_id}", "DELETE", 200, admin, path_parameters={"key_id": created["id"]})

    f = check(live, "/v1/files", "POST", 201, admin, body={"file": _png(), "purpose": "image"},
              media_type="multipart/form-data").json()
    check(live, "/v1/files", "GET", 200, admin)
    check(live, "/v1/files/{file_id}", "GET", 200, admin, path_parameters={"file_id": f["id"]})
    check(live, "/v1/files/{file_id}", "DELETE", 200, admin, path_parameters={"file_id": f["id"]})
    check(live, "/v1/files/{file_id}", "DELETE", 404, admin, path_parameters={"file_id": f["id"]})

    # Queued only: the app in process starts no workers, so no job runs here.
    job = check(live, "/v1/jobs", "POST", 202, admin, media_type="application/json",
                body={"kind": "audit", "params": {"target": {"model": MODEL}, "data": "digits"}}).json()
    one = {"job_id": job["id"]}
    check(live, "/v1/jobs", "GET", 200, admin, query={"status": "queued"})
    check(live, "/v1/jobs/{job_id}", "GET", 200, admin, path_parameters=one)
    check(live, "/v1/jobs/{job_id}/logs", "GET", 200, admin, path_parameters=one)
    check(live, "/v1/jobs/{job_id}/artifacts", "GET", 200, admin, path_parameters=one)
    check(live, "/v1/jobs/{job_id}/artifacts/{name}", "GET", 404, admin,
          path_parameters={**one, "name": "report.json"})
    check(live, "/v1/jobs/{job_id}/cancel", "POST", 200, admin, path_parameters=one)


def test_model_deploy_and_removal_conform(live, bundles):
    """DELETE /v1/models/{name} with an admin key, left out of the fuzzing, on a model of its own."""
    admin, throwaway = live.admin, {"name": "contract-throwaway"}
    check(live, "/v1/models", "POST", 201, admin, body={"file": sdb_bytes(bundles.b), **throwaway},
          media_type="multipart/form-data")
    check(live, "/v1/models/{name}", "DELETE", 200, admin, path_parameters=throwaway)
    check(live, "/v1/models/{name}", "DELETE", 404, admin, path_parameters=throwaway)
    check(live, "/v1/models/{name}", "DELETE", 401, path_parameters={"name": MODEL})
    assert check(live, "/v1/models/{name}", "GET", 200, path_parameters={"name": MODEL}).json()["name"] == MODEL


# ---------------------------------------------------------------- every task's answer, every field named
def answer_schema(path: str, method: str, status: int = 200) -> dict:
    return OPENAPI["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]


def undeclared(body, schema: dict) -> list[str]:
    """Where ``body`` fails ``schema`` made strict: each object's keys among the properties its schema declares.
    A key the schema does not name lands untyped in a generated client (in additional_properties, or nowhere)."""
    validator = Draft202012Validator(_strict(schema))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(body)]


def _strict(node):
    if isinstance(node, dict):
        if "$ref" in node:
            return _strict(resolve(node["$ref"]))
        strict = {k: _strict(v) for k, v in node.items()}
        return {**strict, "additionalProperties": False} if "properties" in node else strict
    return [_strict(v) for v in node] if isinstance(node, list) else node


TAGS, POSE = "contract-tags", "contract-pose"


@pytest.fixture(scope="module")
def task_models(live, tmp_path_factory):
    """A multilabel model and a pose model served beside the examples' classifier (built as test_tasks.py and
    test_pose_api.py build theirs); the multilabel bundle carries a self-check's report, as a wrap's does."""
    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(0)
    check_report = {"passed": True, "mode": "sdb", "thresholds": asdict(Thresholds()), "val_size": 40,
                    "fit_size": 160, "chosen": {"lam": 0.3}, "attempts": [], "seconds": 1.0,
                    "figures": {"teacher_acc": 95.0, "public_acc": 94.5, "public_drop": 0.5}}
    tags = export_bundle(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)), root / "tags.sdb",
                         name=TAGS, in_shape=(1, 4, 4), mean=(0.0,), std=(1.0,), labels=["cat", "dog", "owl"],
                         task="multilabel", extra={"check": check_report})
    res = okdhp(OKDHPConfig(data=PoseDataConfig(root=str(root / "pose"), n_train=32, n_test=8, input_size=32),
                            width=8, branch_stacks=(1, 1), train=pose_train_config(epochs=1, batch_size=16, lr=2e-3)))
    pose = export_pose_bundle(res.target, res.data, root / "pose.sdb", name=POSE, metrics=res.metrics)
    for bundle in (tags, pose):
        r = live.client.post("/v1/models", files={"file": ("m.sdb", sdb_bytes(bundle))}, headers=live.admin)
        assert r.status_code == 201, r.text
    return {TAGS: (1, 4, 4), POSE: tuple(res.data.test.images.shape[1:])}


def test_every_tasks_predict_answer_is_the_schemas(live, task_models):
    """A pose answer (keypoints, no labels) failed the schema's Prediction: a generated client raised KeyError
    'labels' on a 200; a multilabel answer's task and present were named nowhere."""
    schema = answer_schema("/v1/models/{name}/predict", "post")
    rng = np.random.default_rng(0)
    answers = {}
    for name, shape in task_models.items():
        x = (rng.normal(size=(2, *shape)) * 3).tolist()
        answers[name] = check(live, "/v1/models/{name}/predict", "POST", 200, path_parameters={"name": name},
                              body={"inputs": x, "top_k": 2}, media_type="application/json").json()
    answers["pose image"] = check(live, "/v1/models/{name}/predict", "POST", 200, path_parameters={"name": POSE},
                                  body={"file": [_png(20)]}, media_type="multipart/form-data").json()
    assert answers[TAGS]["task"] == "multilabel" and "present" in answers[TAGS]["predictions"][0]
    assert answers[POSE]["task"] == "pose" and answers[POSE]["joints"]
    assert "image_keypoints" in answers["pose image"]["predictions"][0]
    for what, body in answers.items():
        assert not undeclared(body, schema), (what, undeclared(body, schema))


def test_a_models_description_names_every_field(live, task_models):
    """GET /v1/models/{name} answered input, normalize, task, protection, temperature, metrics and added_at, which
    ModelInfo did not declare: a generated client left them untyped."""
    schema = answer_schema("/v1/models/{name}", "get")
    for name in (MODEL, TAGS, POSE):
        body = check(live, "/v1/models/{name}", "GET", 200, path_parameters={"name": name}).json()
        assert not undeclared(body, schema), (name, undeclared(body, schema))
    tags = live.client.get(f"/v1/models/{TAGS}").json()
    assert tags["protection"]["passed"] and tags["protection"]["figures"]["public_drop"] == 0.5
    listing = check(live, "/v1/models", "GET", 200).json()
    assert {MODEL, TAGS, POSE} <= {m["name"] for m in listing["models"]}
    assert not undeclared(listing, answer_schema("/v1/models", "get"))


def test_a_v2_classification_answer_is_the_schemas(live):
    """The classification extension answers BYTES, strings, in a field the schema typed as numbers."""
    x = np.zeros((1, 1, 8, 8), np.float32)
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
    r = check(live, "/v2/models/{name}/infer", "POST", 200, path_parameters={"name": MODEL}, body=body,
              media_type="application/json")
    out = r.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and all(isinstance(v, str) for v in out["data"]), out
    assert "BYTES" in resolve("#/components/schemas/InferOutput")["properties"]["datatype"]["description"]


def test_several_files_are_one_request_as_the_schema_says(live):
    """Several `file` parts are several samples: the multipart body declares an array of files."""
    for path in ("/v1/models/{name}/predict", "/v1/models/{name}/inputs"):  # the routes that take images as samples
        media = OPENAPI["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        assert media["schema"]["properties"]["file"]["type"] == "array", path
    r = check(live, "/v1/models/{name}/predict", "POST", 200, path_parameters={"name": MODEL},
              body={"file": [_png(), _png(12)]}, media_type="multipart/form-data")
    assert len(r.json()["predictions"]) == 2


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready",
                                  "/v1/models"])
def test_a_key_in_the_url_is_the_declared_401(live, path):
    """The middleware refuses a key in the URL on every route, the health probes too: each route declares it."""
    r = check(live, path, "GET", 401, query={"api_key": "sdb_0a1b2c3d4e5f_" + "0" * 64})
    error = r.json()["error"]
    assert "never in the URL" in (error if path.startswith("/v2") else error["message"]), r.text


def test_an_artifact_is_offered_as_bytes_first():
    """A generated client reads an answer as the first media type its 200 lists: JSON first, it decoded every PNG
    plot and weights file as JSON."""
    content = OPENAPI["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]["200"]["content"]
    assert next(iter(content)) == "application/octet-stream", list(content)


# ---------------------------------------------------------------- the two error forms
def test_v2_errors_are_the_protocols_and_v1_errors_keep_their_code(live):
    c, settings = live.client, live.app.state.settings
    v2 = [c.get("/v2/models/nope"), c.get("/v2/models/nope/versions/1/ready"), c.get("/v2/nothing"),
          c.get(f"/v2/models/{MODEL}/infer"),  # 405
          c.post(f"/v2/models/{MODEL}/infer", data=b"{nope", headers={"content-type": "application/json"}),
          c.post(f"/v2/models/{MODEL}/infer", json={"inputs": []}),
          c.get(f"/v2/models/{MODEL}", headers={"Authorization": "Bearer sdb_bad"}),
          c.post(f"/v2/models/{MODEL}/infer", data=b" " * (settings.max_payload_bytes + 1))]  # the middleware's
    assert [r.status_code for r in v2] == [404, 404, 404, 405, 400, 422, 401, 413]
    for r in v2:
        assert r.headers["content-type"] == "application/json" and set(r.json()) == {"error"}, r.text
        assert isinstance(r.json()["error"], str) and r.json()["error"], r.text
    assert "nope" in v2[0].json()["error"] and v2[6].headers["www-authenticate"] == "Bearer"
    v1 = [c.get("/v1/models/nope"), c.get("/v1/nothing"), c.get("/v2x"),
          c.post(f"/v1/models/{MODEL}/predict", data=b" " * (settings.max_payload_bytes + 1))]
    assert [r.status_code for r in v1] == [404, 404, 404, 413]
    for r in v1:
        assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"code", "message"}, r.text
    assert v1[0].json()["error"]["code"] == "model_not_found"


def test_health_answers_as_the_protocol_says(live):
    c = live.client
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert c.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    live.app.state.ready = False  # as while shutting down: not ready, in the protocol's form
    try:
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"error": "the server is still starting"}
        assert c.get("/readyz").json()["error"]["code"] == "not_ready"
    finally:
        live.app.state.ready = True


def test_the_middlewares_429_takes_the_routes_form(tmp_path, bundles):
    app = build_app(make_settings(tmp_path / "data", bundles, rate_limit_address_burst=1,
                                  rate_limit_address_per_s=0.01))
    c = asgi.get_client(app)  # not entered: no lifespan, none needed (the middleware answers before any route)
    assert c.get("/v2").status_code == 200  # the one token of the burst (the health probes are never limited)
    v2, v1 = c.get("/v2"), c.get("/v1/models")
    assert v2.status_code == v1.status_code == 429 and "Retry-After" in v2.headers
    assert isinstance(v2.json()["error"], str) and v1.json()["error"]["code"] == "rate_limited"


def test_the_error_form_follows_the_path_under_a_root_path():
    scope = {"path": "/sdb/v2/models/x", "root_path": "/sdb"}
    assert is_v2(scope) and not is_v2({"path": "/sdb/v1/models", "root_path": "/sdb"})
    assert not is_v2({"path": "/v2x"}) and is_v2({"path": "/v2"})


# ---------------------------------------------------------------- a NUL byte (PostgreSQL text holds none)
NUL_REQUESTS = [("get", "/v1/models/a%00b"), ("get", "/v2/models/a%00b/ready"),
                ("get", "/v1/models/digits-a?version=%00"), ("post", "/v1/models/digits-a/predict?version=%00"),
                ("post", "/v1/models/digits-a/distill?version=%00"),
                ("delete", "/v1/models/a%00b"), ("delete", "/v1/keys/%00"), ("get", "/v1/files/file-%00"),
                ("get", "/v1/jobs/%00"), ("get", "/v1/jobs?kind=%00"), ("get", "/v1/jobs/x/artifacts/a%00b"),
                ("post", "/v1/style/a%00b"), ("get", "/v1/usage?key_id=%00"), ("get", "/v1/usage?model=%00"),
                ("post", "/v1/models/digits-a/inputs?version=%00")]


@pytest.mark.anyio
@pytest.mark.usefixtures("db_url")  # the 500 was PostgreSQL's: run on both stores
async def test_a_nul_byte_is_a_422_never_a_store_lookup(svc):
    """The previous review's one server error was a NUL byte reaching the store; on PostgreSQL a NUL in a
    name, an id or a filter was still a 500 (a text value cannot hold one). Each is a 422 that changes nothing."""
    c, admin = svc.client, svc.admin
    for method, url in NUL_REQUESTS:
        r = await c.request(method, url, headers=admin, json={"inputs": [[0.0] * 64]} if method == "post" else None)
        assert r.status_code == 422 and "NUL" in r.text, (method, url, r.status_code, r.text)
    r = await c.post("/v1/keys", json={"scopes": ["jobs"], "models": ["a\x00"], "name": "\x00"}, headers=admin)
    assert r.status_code == 422 and "NUL" in r.json()["error"]["message"], r.text
    assert len((await c.get("/v1/keys", headers=admin)).json()["keys"]) == 1  # the admin's alone: nothing was added

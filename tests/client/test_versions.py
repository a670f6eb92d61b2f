"""Pinning a model version from the SDK (``version=`` on ``model``, ``predict``, ``distill``, ``RemoteTeacher``) and
removing a model or one version (``remove_model``): the server took ``?version=`` all along, the SDK could not send it."""
from __future__ import annotations

from urllib.parse import parse_qs

import numpy as np
import pytest
from sdb_client import AsyncClient, BadRequest, Client, NotFound, RemoteTeacher

from .conftest import MODEL, Reply, write_png

KEY = "sdb_0123456789ab_" + "e" * 64
MODEL_INFO = {"name": "m", "version": "2", "input": {"shape": [2]}, "versions": ["1", "2"]}
PREDICTED = {"model": "m", "version": "1", "predictions": [{"labels": ["a"], "indices": [0], "scores": [1.0]}]}
DISTILLED = {"model": "m", "version": "1", "logits": [[1.0, 2.0]]}


def query(stub, method: str, path: str, i: int = -1) -> dict:
    return {k: v[0] for k, v in parse_qs(stub.seen[(method, path)][i][0][":query"]).items()}


def test_version_is_sent_as_the_query_of_every_model_route(stub, tmp_path):
    stub.on("GET", "/v1/models/m", Reply(200, MODEL_INFO))
    stub.on("POST", "/v1/models/m/predict", Reply(200, PREDICTED))
    stub.on("POST", "/v1/models/m/distill", Reply(200, DISTILLED))
    png = write_png(tmp_path / "x.png", np.zeros(64, np.float32))
    x = np.zeros((1, 2), np.float32)
    with Client(stub.url, KEY) as c:
        assert c.model("m", version="1") == MODEL_INFO
        assert query(stub, "GET", "/v1/models/m") == {"version": "1"}
        c.predict("m", x, top_k=1, version=1)  # .npy: top_k and version in the query
        assert query(stub, "POST", "/v1/models/m/predict") == {"top_k": "1", "version": "1"}
        c.predict("m", x, version="1", encoding="json")
        assert query(stub, "POST", "/v1/models/m/predict") == {"version": "1"}
        c.predict("m", image_path=png, version="1")
        assert query(stub, "POST", "/v1/models/m/predict") == {"version": "1"}
        assert c.distill("m", x, temperature=2.0, version=1).version == "1"
        assert query(stub, "POST", "/v1/models/m/distill") == {"temperature": "2.0", "version": "1"}
        c.distill_logits("m", x, version="1", encoding="json")
        assert query(stub, "POST", "/v1/models/m/distill") == {"version": "1"}
        c.predict("m", x)  # no version: none sent, the server answers with the highest
        assert query(stub, "POST", "/v1/models/m/predict") == {"top_k": "1"}
        with pytest.raises(BadRequest, match="version is empty"):
            c.predict("m", x, version=" ")
        with RemoteTeacher(c, "m", version=1) as t:
            t(x)
            assert query(stub, "POST", "/v1/models/m/distill") == {"version": "1"}
            assert "version='1'" in repr(t)


def test_a_long_input_asks_the_pinned_versions_shape(stub):
    stub.on("GET", "/v1/models/m", Reply(200, MODEL_INFO))
    stub.on("POST", "/v1/models/m/predict", Reply(200, PREDICTED))
    with Client(stub.url, KEY, batch_size=1) as c:
        c.predict("m", np.zeros((2, 2), np.float32), version="1", encoding="json")
    assert query(stub, "GET", "/v1/models/m") == {"version": "1"}


def test_remove_model_and_one_version(stub):
    stub.on("DELETE", "/v1/models/m", Reply(200, {"removed": [{"name": "m", "version": "2"}]}))
    with Client(stub.url, KEY) as c:
        assert c.remove_model("m", version=2) == [{"name": "m", "version": "2"}]
        assert query(stub, "DELETE", "/v1/models/m") == {"version": "2"}
        c.remove_model("m")
        assert query(stub, "DELETE", "/v1/models/m") == {}


@pytest.mark.anyio
async def test_async_version_and_remove_model(stub):
    stub.on("GET", "/v1/models/m", Reply(200, MODEL_INFO))
    stub.on("POST", "/v1/models/m/predict", Reply(200, PREDICTED))
    stub.on("POST", "/v1/models/m/distill", Reply(200, DISTILLED))
    stub.on("DELETE", "/v1/models/m", Reply(200, {"removed": [{"name": "m", "version": "1"}]}))
    x = np.zeros((1, 2), np.float32)
    async with AsyncClient(stub.url, KEY) as c:
        await c.model("m", version=1)
        assert query(stub, "GET", "/v1/models/m") == {"version": "1"}
        await c.predict("m", x, version=1)
        assert query(stub, "POST", "/v1/models/m/predict") == {"top_k": "1", "version": "1"}
        await c.distill_logits("m", x, version="1")
        assert query(stub, "POST", "/v1/models/m/distill") == {"version": "1"}
        assert await c.remove_model("m", version="1") == [{"name": "m", "version": "1"}]
        assert query(stub, "DELETE", "/v1/models/m") == {"version": "1"}


def test_pinned_versions_on_the_real_service(sdb_server):
    x = sdb_server.bundles.x[:3]
    with Client(sdb_server.url, sdb_server.distill_key) as c:
        version = c.model(MODEL)["version"]
        assert c.model(MODEL, version=version)["version"] == version
        assert [p["indices"] for p in c.predict(MODEL, x, version=version)] == [p["indices"] for p in c.predict(MODEL, x)]
        np.testing.assert_array_equal(c.distill_logits(MODEL, x, version=version), c.distill_logits(MODEL, x))
        with pytest.raises(NotFound, match="no version"):
            c.distill_logits(MODEL, x, version="999")
        with pytest.raises(NotFound, match="no version"):
            c.predict(MODEL, x, version="999", encoding="json")

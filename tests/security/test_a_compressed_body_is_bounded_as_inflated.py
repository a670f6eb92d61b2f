"""A compressed request body (``Content-Encoding: gzip`` or ``deflate``, which v2 infer and v1 predict and distill
take) is bounded by the payload limit as sent and once inflated: tens of kilobytes that inflate to four times
the limit are a 413, inflation stops at the limit (no more is held in memory), nothing is charged or run, and the
server answers the next request. Whoever may call the route may send one: anonymous callers (predict, v2 infer's
public outputs) and distill keys alike. A coding on a body read as it streams (``.npy``) is a 415. Against the
real app in process, on SQLite and PostgreSQL.
"""
from __future__ import annotations

import gzip
import zlib

import numpy as np
import orjson
import pytest

from service.npy import NPY, encode

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]


async def test_a_compressed_body_is_bounded_as_inflated_and_charges_nothing(svc, bundles):
    limit = svc.settings.max_payload_bytes
    token = svc.key(("distill",), quota=100)
    key = svc.auth(token)
    inflated = b'{"inputs": [' + b" " * (4 * limit) + b"[0]]}"
    bombs = {"gzip": gzip.compress(inflated), "deflate": zlib.compress(inflated, 9)}
    assert all(len(b) < limit // 100 for b in bombs.values())
    routes = (("/v2/models/digits-a/infer", {}), ("/v1/models/digits-a/predict", {}),
              ("/v1/models/digits-a/distill", key))
    for path, headers in routes:
        for coding, bomb in bombs.items():
            r = await svc.client.post(path, content=bomb, headers={**headers, "content-encoding": coding,
                                                                    "content-type": "application/json"})
            assert r.status_code == 413, (path, coding, r.status_code, r.text)
            assert "SDB_MAX_PAYLOAD_BYTES" in r.text
    r = await svc.client.post("/v1/models/digits-a/distill", content=gzip.compress(encode(bundles.x[:2])),
                              headers={**key, "content-type": NPY, "content-encoding": "gzip"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert svc.app.state.store.get_key(token.split("_")[1]).used == 0
    body = gzip.compress(orjson.dumps({"inputs": np.asarray(bundles.x[:2]).tolist()}))
    r = await svc.client.post("/v1/models/digits-a/distill", content=body,
                              headers={**key, "content-encoding": "gzip", "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert svc.app.state.store.get_key(token.split("_")[1]).used == 2

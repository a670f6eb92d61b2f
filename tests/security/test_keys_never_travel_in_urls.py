"""An API key goes in the Authorization header alone: one sent in a URL's query string (which proxies, servers
and browsers' histories keep) is refused on every route, never served, never counted, never echoed. SQLite and
PostgreSQL, the real app in process."""
from __future__ import annotations

import numpy as np
import pytest

from service.auth import parse_token

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("db_url")]

X = np.zeros((2, 1, 8, 8), np.float32)
V2 = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}],
      "outputs": [{"name": "probabilities"}, {"name": "distill_logits"}]}


async def test_a_key_in_the_url_is_refused_never_served_nor_echoed(svc):
    """`?api_key=sdb_...` was ignored: predict answered as anonymous (200, not counted against the key) and distill
    401 missing_key, while the URL carried the key into every log it passed."""
    token = svc.key(("distill",), quota=100)
    key_id, secret = parse_token(token)
    one = {"inputs": X[:1].tolist()}
    for route in ("predict", "distill"):
        for query in (f"api_key={token}", f"key={token}", f"token={token}", f"access_token={token}",
                      f"API_KEY={token}", f"top_k=1&auth={token}", "api_key="):
            r = await svc.client.post(f"/v1/models/digits-a/{route}?{query}", json=one)
            assert r.status_code == 401 and r.json()["error"]["code"] == "key_in_url", (route, query, r.text)
            assert "Authorization header" in r.json()["error"]["message"] and secret not in r.text
            assert r.headers["www-authenticate"] == "Bearer"
    # the same with the key in its header too, on v2 (the protocol's error form) and on a GET
    r = await svc.client.post(f"/v2/models/digits-a/infer?api_key={token}", json=V2, headers=svc.auth(token))
    assert r.status_code == 401 and "Authorization header" in r.json()["error"] and secret not in r.text
    r = await svc.client.get(f"/v1/keys/me?access_token={token}")
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_in_url"
    svc.app.state.keyring.flush()
    assert svc.app.state.store.get_key(key_id).used == 0 and svc.app.state.store.usage(key_id) == []
    # other query strings are served as before
    r = await svc.client.post("/v1/models/digits-a/predict?top_k=2", json=one)
    assert r.status_code == 200, r.text
    assert (await svc.client.get("/v1/usage?days=2", headers=svc.auth(token))).status_code == 200

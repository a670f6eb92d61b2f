"""``/v1/keys``: create, list and revoke API keys (admin scope). A key's secret is in the
create response only."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from ..auth import ApiKey, create_key, refuse_booleans
from ..bodies import JSON_ONLY, NOT_JSON
from ..deps import AdminKeyDep, KeyringDep, SettingsDep, StoreDep
from ..errors import invalid, not_found
from ..schemas import (
    AUTH,
    NO_NUL,
    Before,
    CreateKeyRequest,
    KeyCreated,
    KeyList,
    KeyPublic,
    json_response,
    ok,
    page,
    page_limit,
    page_start,
    responses,
)

router = APIRouter(prefix="/v1/keys", tags=["keys"])

_KEY = {"id": "0a1b2c3d4e5f", "name": "teacher-of-lab-7", "scopes": ["distill"], "models": ["mnist-demo"],
        "quota": 100000, "quota_window_s": 86400, "created_at": 1767225600.0, "expires_at": None, "revoked_at": None}
_ADMIN = {403: "not an admin key"}


def _numbers_as_sent(body: object) -> object:
    """The body's policy numbers, before pydantic reads a JSON true as 1 (a key that expired in a day)."""
    if isinstance(body, dict):
        try:
            refuse_booleans(body)
        except ValueError as e:
            raise PydanticCustomError("not_a_number", "{why}", {"why": str(e)}) from None
    return body


_CREATE_DOC = """A quota (`quota`, samples) meters what the key is served on the keyed path (`/distill`, v2
`distill_logits`, `distill` jobs), so it needs a key that may distill (`distill` or `admin`). With `quota_window_s`
it restarts in fixed windows aligned to the Unix epoch, not to the key's creation: a window starts at every multiple
of `quota_window_s` seconds since 1970-01-01 00:00 UTC (86400: at each 00:00 UTC; 3600: on the hour). So a key may
be served its whole quota just before a window ends and again just after, twice the quota within a second or two
(in any N × `quota_window_s` seconds, at most N + 1 quotas)."""


@router.post("", status_code=201, response_model=KeyCreated, summary="Create a key; its secret is shown once",
             description=_CREATE_DOC, dependencies=[JSON_ONLY],
             responses={**ok({**_KEY, "key": "sdb_0a1b2c3d4e5f_" + "0" * 64}, 201),
                        **responses(400, *AUTH, 413, 415, why={
                            **_ADMIN, 415: NOT_JSON, 422: "unknown scopes, a negative quota, a quota on a key without "
                                                          "distill, an allowlist of no model, ..."})})
def create(body: Annotated[CreateKeyRequest, BeforeValidator(_numbers_as_sent)], admin: AdminKeyDep, store: StoreDep,
           settings: SettingsDep) -> Response:
    try:
        token, key = create_key(store, settings.pepper, scopes=body.scopes, models=body.models, quota=body.quota,
                                quota_window_s=body.quota_window_s, expires_days=body.expires_days,
                                name=body.name, actor=admin.id)
    except ValueError as e:
        raise invalid(str(e), "invalid_request") from None
    return json_response({**key.public(), "key": token}, status=201)


@router.get("", response_model=KeyList, summary="Every key, without secrets, newest first, a page at a time",
            responses={**ok({"keys": [_KEY]}),
                       **responses(*AUTH, why={**_ADMIN, 422: "a limit out of range, or a before that is no next"})})
def list_keys(_: AdminKeyDep, store: StoreDep, before: Before = None, limit: int = page_limit(1000)) -> Response:
    rows = store.page_of_keys(before=page_start(before), limit=limit + 1)
    return json_response(page("keys", rows, limit, lambda r: ApiKey.from_row(r).public()))


@router.delete("/{key_id}", response_model=KeyPublic, summary="Revoke a key (at once on this server)",
               responses={**ok({**_KEY, "revoked_at": 1767312000.0}),
                          **responses(*AUTH, 404, why={**_ADMIN, 404: "no such key"})})
def revoke(key_id: Annotated[str, Path(description="the key's id: sdb_<id>_…", examples=["0a1b2c3d4e5f"],
                                       pattern=NO_NUL)],
           admin: AdminKeyDep, store: StoreDep, keyring: KeyringDep) -> Response:
    row = store.revoke_key(key_id)
    if row is None:
        raise not_found(f"no API key with id {key_id!r}", "key_not_found")
    keyring.invalidate(key_id)
    store.audit(admin.id, "key.revoke", key_id)
    return json_response(ApiKey.from_row(row).public())

"""``/v1/keys``: create, list and revoke API keys (admin scope). A key's secret is in the
create response only."""
from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from ..auth import ApiKey, create_key
from ..deps import AdminKeyDep, KeyringDep, SettingsDep, StoreDep
from ..errors import invalid, not_found
from ..schemas import CreateKeyRequest, KeyCreated, KeyList, KeyPublic, json_response

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201, response_model=KeyCreated, summary="Create a key; its secret is shown once")
def create(body: CreateKeyRequest, admin: AdminKeyDep, store: StoreDep, settings: SettingsDep) -> Response:
    try:
        token, key = create_key(store, settings.pepper, scopes=body.scopes, models=body.models, quota=body.quota,
                                quota_window_s=body.quota_window_s, expires_days=body.expires_days,
                                name=body.name, actor=admin.id)
    except ValueError as e:
        raise invalid(str(e), "invalid_request") from None
    return json_response({**key.public(), "key": token}, status=201)


@router.get("", response_model=KeyList, summary="Every key, without secrets")
def list_keys(_: AdminKeyDep, store: StoreDep) -> Response:
    return json_response({"keys": [ApiKey.from_row(r).public() for r in store.list_keys()]})


@router.delete("/{key_id}", response_model=KeyPublic, summary="Revoke a key (at once on this server)")
def revoke(key_id: str, admin: AdminKeyDep, store: StoreDep, keyring: KeyringDep) -> Response:
    row = store.revoke_key(key_id)
    if row is None:
        raise not_found(f"no API key with id {key_id!r}", "key_not_found")
    keyring.invalidate(key_id)
    store.audit(admin.id, "key.revoke", key_id)
    return json_response(ApiKey.from_row(row).public())

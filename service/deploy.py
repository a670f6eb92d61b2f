"""Deploying a bundle: the one way a key makes a model servable (``POST /v1/models``, and the ``wrap``
and ``style`` jobs with ``deploy: true``).

:func:`deploy_bundle` (a job's) and :func:`serve_bundle` (the route's, which then serves it in its own
process at once) copy the bundle into a new file beside the served ones (never over one), verify that copy
the way every server process will load it, and register it in one store transaction that checks the name's
owner and assigns the next version (:meth:`service.store.Store.add_version`). The job kinds' submission
checks ask the same rules (:func:`check_deploy_rights`: a name that can be served, on the key's allowlist,
not another key's) for an early answer; the deploy asks again, so a name taken between submission and
deploy fails the job. See docs/security.md, "Model ownership".
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from sdb_core.progress import Cancelled

from . import files
from .auth import check_allowed
from .copies import copy_new, discard
from .errors import ApiError, invalid, no_room
from .filechecks import read_bundle
from .jobs.kinds.base import NAME_PATTERN
from .registry import removed_meanwhile, verify_bundle
from .schemas import OutputPolicy
from .settings import Settings
from .store import DeployRefused, ModelRow, Store

if TYPE_CHECKING:
    from sdb_core.bundle import Bundle

    from .auth import ApiKey
    from .registry import HostedModel, ModelHost

POLICY_TASKS = ("classification", "multilabel")  # tasks whose outputs are class scores: the policies apply
# key_invalid: the deploying key revoked or expired since the request's own check: the 401 every route answers it
_STATUS = {"model_not_owned": 403, "key_invalid": 401, "model_exists": 409, "model_in_use": 409}
_JOB_REFUSALS = ("job_lost", "job_cancelled")  # a job's deploy its worker may no longer make: the job stops


def refused(e: DeployRefused) -> ApiError:
    status = _STATUS.get(e.code, 403)
    return ApiError(status, e.code, e.message, {"WWW-Authenticate": "Bearer"} if status == 401 else None)


def check_deploy_rights(store: Store, name: str, key: ApiKey) -> None:
    """Refused unless ``key`` may deploy a version of ``name``: 422 for a name that cannot be served
    (:func:`check_served_name`), 403 ``model_not_allowed`` for one outside the key's model allowlist (which
    bounds what a key deploys as it bounds what it predicts with: else a key made for one model claimed any
    name), 403 ``model_not_owned`` unless the key owns the name, nobody does yet, or the key is an admin (the
    rule the deploy transaction applies again)."""
    check_served_name(name)
    check_allowed(key, name, f": it deploys only under the names on its allowlist ({', '.join(sorted(key.models or ()))});"
                  " give one of those, or use a key that allows this one")
    refusal = store.deploy_refusal(name, key.id)
    if refusal is not None:
        raise refused(refusal)


def check_policy(policy: OutputPolicy | dict | None, meta: dict) -> OutputPolicy:
    """The output policy a bundle is deployed with: the one given, else the bundle's own (meta.json's
    ``output_policy``, chosen when it was wrapped), else ``probs``; 422 when it does not fit its task."""
    try:
        policy = OutputPolicy.model_validate(policy or meta.get("output_policy") or {})
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'output_policy'}: {err['msg']}" for err in e.errors()[:5])
        raise invalid(msg, "invalid_request") from None
    task = meta.get("task", "classification")
    if task not in POLICY_TASKS and policy != OutputPolicy():
        raise invalid(f"a {task} model serves no class scores: an output policy is for "
                      f"{' and '.join(POLICY_TASKS)} models", "invalid_request")
    classes = len(meta.get("labels") or [])
    if policy.policy == "top_k" and classes and (policy.top_k or 0) >= classes:
        # every class "renormalised" is probs under another name: the owner meant fewer
        raise invalid(f"top_k {policy.top_k} is not fewer than the model's {classes} classes: give a k below "
                      f"{classes}, or the probs policy for every class", "invalid_request")
    return policy


def _release(store: Store, reservation: str | None) -> None:
    """Give back the bytes a deploy that did not happen held (a version added took them over)."""
    if reservation is not None:
        store.release_file_bytes(reservation)


def _discard_unless_served(store: Store, copy: Path) -> None:
    """Delete a failed deploy's copy unless a version is served from it: a commit whose answer was lost (the
    connection cut during COMMIT) registered the version all the same, and deleting the copy left it with no file.
    When the store cannot say, the copy stays: one no version names is set aside at the next start
    (:func:`service.copies.sweep_leftovers`), and a served one deleted is lost."""
    try:
        served = store.names_path(str(copy.resolve()))
    except Exception:  # noqa: BLE001 - the store away: see above
        served = True
    if not served:
        discard(copy)


# Names a route takes for itself: GET /v2/models/stats is the statistics of every model (the Open Inference
# Protocol's statistics extension, which Triton's clients call), so a model of that name had no v2 metadata.
RESERVED_NAMES = {"stats": "GET /v2/models/stats is the statistics of every model (the Open Inference Protocol's "
                           "statistics extension), not a model's metadata"}


def check_served_name(name: str, version: str | None = None) -> None:
    """422 unless ``name`` (and ``version``, where the bundle's own is kept: ``sdb models add``) is one the
    routes can name and the store can keep: letters, digits, ``.``, ``_``, ``-``, at most 100 characters,
    and none of :data:`RESERVED_NAMES`."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise invalid(f"the bundle's name {name[:100]!r} cannot be served: give a name that matches {NAME_PATTERN}",
                      "invalid_request")
    if name in RESERVED_NAMES:
        raise invalid(f"a model cannot be served as {name!r}: {RESERVED_NAMES[name]}; give another name",
                      "invalid_request")
    # an all-digit version is also a number the store compares (a 64-bit integer)
    if version is not None and (not re.fullmatch(NAME_PATTERN, version) or (version.isdigit() and len(version) > 18)):
        raise invalid(f"the bundle's version {version[:100]!r} cannot be served: set meta.json's version to one "
                      f"that matches {NAME_PATTERN} (a number: at most 18 digits)", "invalid_request")


def serve_bundle(host: ModelHost, src: str | Path, *, key: ApiKey, actor: str, **kw) -> HostedModel:
    """Blocking: :func:`deploy_bundle` (``kw``: its options) through this server, which serves the version at
    once: the model it installed, for the route to describe (a lookup after the deploy answered 404 when a
    removal came in between, for a version that was deployed). 409 ``model_removed`` when a removal of the
    model came between the version's registration and its install: the version is not served, as the removal
    answered."""
    row, bundle = _register(host.settings, host.store, src, key=key, actor=actor, load=host.load, **kw)
    model = host.serve(row, bundle)
    if model is None:
        raise removed_meanwhile(row)
    return model


def deploy_bundle(settings: Settings, store: Store, src: str | Path, *, key: ApiKey, actor: str,
                  **kw) -> ModelRow:
    """Blocking: register the ``.sdb`` at ``src`` as the next version of its name, served by every server process
    from its first request for it (a job's deploy; :func:`serve_bundle` through a server). See :func:`_register`."""
    return _register(settings, store, src, key=key, actor=actor,
                     load=lambda path: verify_bundle(path, settings.master_key), **kw)[0]


def _register(settings: Settings, store: Store, src: str | Path, *, key: ApiKey, actor: str,
              load: Callable[[Path], Bundle], name: str | None = None, policy: OutputPolicy | dict | None = None,
              shown: str = "bundle", job: tuple[str, str] | None = None, tenant: bool = False,
              capped: bool = False) -> tuple[ModelRow, Bundle]:
    """Blocking: register the ``.sdb`` at ``src`` as the next version of ``name`` (default the bundle's own),
    for ``key`` (the deployer; ``actor`` goes to the audit log): the row, and its copy's bundle as ``load``
    verified it.

    ApiError when refused, and then nothing stays: 400 ``bundle_refused`` (verification), 422 (the name or
    the policy), 403 ``model_not_allowed`` (a name outside the key's allowlist) or ``model_not_owned`` (checked
    again in the transaction that adds the version), 401 ``key_invalid`` (the key revoked or expired meanwhile),
    507 ``insufficient_storage`` (the copy did not fit on the disk: :func:`service.copies.copy_new`). ``shown``
    stands for the bundle in messages: a server path is never in one.

    ``tenant``: a graph a non-admin key wrote, which may use the standard ONNX operators only
    (:func:`service.filechecks.read_bundle`'s ``standard_ops``). ``capped``: the copy counts against the
    deployer's storage cap (a non-admin key's), with its files: 413 ``storage_exceeded`` when it does not fit.

    ``job`` (id, worker): a job's deploy (``service.jobs.kinds.wrap.deploy``), made only while that worker
    still holds the job, checked in the transaction that adds the version; otherwise nothing stays and
    :class:`Cancelled` stops the job.
    """
    limits = files.limits(settings)
    try:
        try:
            # archive limits, file hashes and a tenant's operators, before any copy
            meta = read_bundle(Path(src), limits, shown, standard_ops=tenant)
        except ApiError as e:
            raise ApiError(400, "bundle_refused", f"bundle refused: {e.message}") from None
        name = name or str(meta["name"])
        check_deploy_rights(store, name, key)  # early: no copy and no model time for a refused deploy
        policy = check_policy(policy, meta)
        size = Path(src).stat().st_size
        # the copy counts against the deploying key's storage cap, held before it is made
        reservation = files.reserve(store, settings, key.id, size, f"this {size}-byte bundle") if capped else None
    except ApiError as e:
        store.audit(actor, "model.refused", name or shown, e.message)
        raise
    try:
        target = copy_new(Path(src), settings.bundles_dir / name)
    except ApiError as e:  # no room for the copy (507)
        _release(store, reservation)
        store.audit(actor, "model.refused", name, e.message)
        raise
    except BaseException:
        _release(store, reservation)
        raise
    try:
        try:  # what is served is the copy: verified again, whole
            copied = read_bundle(target, limits, shown)
            bundle = load(target)
            digest = bundle.meta_sha256  # every later load of the version must find this meta.json
        except ApiError as e:
            raise ApiError(400, "bundle_refused", f"bundle refused: {e.message}") from None
        except (ValueError, OSError) as e:
            raise no_room(e, "the bundle") or ApiError(
                400, "bundle_refused", f"bundle refused: {str(e).replace(str(target), shown)}") from None
        if copied["files"] != meta["files"]:
            raise ApiError(400, "bundle_refused", "bundle refused: it changed while it was being deployed")
        try:
            row = store.add_version(name, str(target.resolve()), deployer=key.id, job=job, size=size,
                                    reservation=reservation, meta_sha256=digest, **policy.model_dump())
        except DeployRefused as e:
            if e.code in _JOB_REFUSALS:
                raise Cancelled(e.message) from None
            raise refused(e) from None
    except ApiError as e:
        discard(target)
        _release(store, reservation)
        store.audit(actor, "model.refused", name, e.message)
        raise
    except BaseException:
        _discard_unless_served(store, target)
        _release(store, reservation)
        raise
    store.audit(actor, "model.add", f"{row.name}@{row.version}", str(target))
    return row, bundle

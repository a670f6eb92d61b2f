"""An audit that would score no attack is refused before any training, never answered ``protected``.

It was: families ("labels",) or ("labels", "keys") on a model with no keyed path (or keys 0) trained the labels-only
reference alone and answered ``protected`` (worst "attack" labels_ls0.1, +0.00) for a plain teacher that the full
audit finds leaking by +3.7 points; through the service, an audit job with ``"families": ["labels"]`` succeeded so.
"""
from __future__ import annotations

import re

import pytest
import torch

from sdb_core.protect import SafeDistillationBox, generate_key
from sdb_core.protect.attacks import PublicAPI
from sdb_core.protect.audit import AuditConfig, audit, score, verdict_of
from tests.core.conftest import serving_plain_digits

NO_ATTACK = re.escape("score no attack: only the labels-only reference ('labels') would run")


def untouched(calls: list, lam: float | None = None) -> PublicAPI:
    """A target that records every query: a refused audit asks it nothing (no student is trained)."""
    return PublicAPI(lambda x: (calls.append(len(x)), torch.full((len(x), 10), 0.1))[1], lam=lam, name="target")


def test_an_audit_of_the_labels_family_alone_is_refused(digits):
    with pytest.raises(ValueError, match=r"families \['labels'\] " + NO_ATTACK):
        AuditConfig(families=("labels",))
    calls = []
    cfg = AuditConfig()
    cfg.families = ("labels",)  # past the config's own check: audit() refuses it too, before any query
    with pytest.raises(ValueError, match=r"target: families \['labels'\] " + NO_ATTACK):
        audit(untouched(calls), digits, cfg)
    assert calls == []


def test_keys_alone_on_a_model_without_a_keyed_path_is_refused(digits, digits_teacher):
    cfg = AuditConfig(families=("labels", "keys"), keys=2)  # a keyed box would be attacked: the config is fine
    calls = []
    with pytest.raises(ValueError, match=r"'keys' attacks a keyed path, and it has none\): only the labels-only"):
        audit(untouched(calls), digits, cfg)
    assert calls == []
    with pytest.raises(ValueError, match="it has none"):  # a plain network: no keyed path either
        audit(digits_teacher, digits, cfg)
    # on a box with a keyed path the same families run the keyed attacks (and nothing is refused)
    box = SafeDistillationBox(digits_teacher, generate_key(digits.in_shape, digits.mean, digits.std), lam=0.5)
    tiny = AuditConfig(families=("labels", "keys"), keys=1, transfer_n=40, steps=20, label_smoothings=(0.0,))
    report = audit(box, digits, tiny)
    assert set(report.advantages) == {"key_mean", "key_ensemble"} and report.worst_attack in report.advantages


def test_keys_zero_with_the_keys_family_alone_is_refused(digits):
    with pytest.raises(ValueError, match=r"\('keys' with keys 0 blends in no key\): only the labels-only.*keys >= 1"):
        AuditConfig(families=("labels", "keys"), keys=0)
    AuditConfig(families=("labels", "kd", "keys"), keys=0)  # kd is an attack: fine


def test_settings_that_leave_only_labels_only_students_are_refused(digits):
    # topk with k = 1 alone is KD from the top-1: labels-only, no attack
    with pytest.raises(ValueError, match=r"score no attack with these settings .*topk1"):
        audit(untouched([]), digits, AuditConfig(families=("labels", "topk"), sparse_k=(1,)))


def test_the_verdict_is_never_protected_without_an_attack():
    only_labels = score({"labels_ls0": [80.0], "labels_ls0.1": [81.0]}, {"labels_ls0": "labels",
                                                                         "labels_ls0.1": "labels"})
    with pytest.raises(ValueError, match="no attack was run"):
        verdict_of(only_labels)


# --------------------------------------------------------------------------------------------- the audit job
@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def jobs_app(tmp_path, digits):
    """The real app on a real store, serving ``plain-digits``: a plain model (no keyed path)."""
    from sdb_core.models import create_model

    untrained = create_model("cnn", num_classes=10, in_shape=digits.in_shape).eval()
    async with serving_plain_digits(tmp_path, digits, untrained) as service:
        yield service


@pytest.mark.anyio
async def test_an_audit_job_that_attacks_nothing_is_a_422_and_queues_nothing(jobs_app, tmp_path, digits):
    from sdb_core.models import create_model
    from sdb_core.weights import save_weights
    from tests.service.jobs_helpers import upload_asgi

    svc = jobs_app
    token = svc.key(("jobs",))
    tiny = {"target": {"model": "plain-digits"}, "data": "digits", "transfer": 20, "steps": 10, "seeds": [0]}
    weights = save_weights(create_model("cnn", num_classes=10, in_shape=digits.in_shape), tmp_path / "w.safetensors")
    uploaded = {"file": await upload_asgi(svc, token, weights), "arch": "cnn"}

    async def submit(**params):
        return await svc.client.post("/v1/jobs", json={"kind": "audit", "params": {**tiny, **params}},
                                     headers=svc.auth(token))

    refused = [
        ({"families": ["labels"]}, "families ['labels'] score no attack: only the labels-only reference"),
        ({"families": ["labels", "keys"], "keys": 0}, "('keys' with keys 0 blends in no key)"),
        # the target's keyed path, known at submission: a hosted plain model, uploaded weights
        ({"families": ["labels", "keys"]}, ("model plain-digits version 1: families ['labels', 'keys'] score no "
                                            "attack on this target ('keys' attacks a keyed path, and it has none)")),
        ({"families": ["labels", "keys"], "target": uploaded}, "('keys' attacks a keyed path, and it has none)"),
    ]
    for params, words in refused:
        r = await submit(**params)
        assert r.status_code == 422, (params, r.text)
        message = r.json()["error"]["message"]
        assert words in message and "add an attack family: kd, topk" in message, message
    assert (await svc.client.get("/v1/jobs", headers=svc.auth(token))).json()["jobs"] == []
    r = await submit(families=["labels", "kd"], keys=0)  # an attack: accepted
    assert r.status_code == 202, r.text

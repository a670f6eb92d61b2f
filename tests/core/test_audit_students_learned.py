"""An audit whose students learned nothing has no verdict: it is refused in words, never answered ``protected``.

It was: a plain CNN teacher (public top-1 98.3 %) audited at steps 10 (the job schema's minimum) with LeNet students
answered ``protected``: every student, the labels-only reference and the attacks alike, sat at chance (10.0 %), so
every advantage was ~0; the same audit at 1,000 steps says ``leaks`` (+1.4).
"""
from __future__ import annotations

import pytest
import torch

from sdb_cli.main import main
from sdb_core.protect.audit import AuditConfig, audit, unlearned
from sdb_core.train import TrainConfig, chance_of
from sdb_core.weights import save_weights
from tests.core.conftest import serving_plain_digits

AT_CHANCE = "students stayed at chance and learned nothing"
# One seed of the explorer's job (transfer 300, steps 10, a LeNet student) with one KD attack: the old code said
# 'protected' of the plain digits teacher (largest advantage +0.00, every student at 10.0 %).
STUCK = {"transfer_n": 300, "steps": 10, "student": "lenet", "families": ("labels", "kd"), "temperatures": (4.0,),
         "alphas": (0.9,), "label_smoothings": (0.0,)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_audit_whose_students_stayed_at_chance_is_refused_not_protected(digits, digits_teacher):
    seen = []
    with pytest.raises(ValueError, match=AT_CHANCE) as e:
        audit(digits_teacher, digits, AuditConfig(**STUCK, seeds=(0, 1)), progress=seen.append)
    message = str(e.value)
    assert message.startswith("SmallCNN: seed 0: the labels-only reference scores 10.0% on the test split")
    assert "chance 10.2% (the target's public top-1 93.3%)" in message
    for advice in ("more steps (steps 10)", "more transfer images (transfer 300)", "pick another student"):
        assert advice in message, message
    # the first seed's reference decides: the second seed's students are never trained
    assert seen[-1].step == 2 and seen[-1].steps == 4


def test_the_same_audit_whose_students_learn_still_gives_its_verdict(digits, digits_teacher):
    # the plain teacher leaks by KD (+3.0 to +4.3 on seeds 0-4 at 300 steps, tests/core/test_audit.py)
    cfg = AuditConfig(**{**STUCK, "student": "mlp", "transfer_n": 100, "steps": 300}, seeds=(0,))
    report = audit(digits_teacher, digits, cfg)
    assert report.verdict == "leaks" and report.worst_attack == "kd_T4_a0.9"
    assert report.attacks[report.reference]["acc"] > 80.0


def test_learned_is_a_share_of_what_the_target_scores_over_chance():
    cfg = AuditConfig()
    assert unlearned(84.0, 96.6, 10.0, cfg) is None  # mnist-5k at N = 300 (benchmarks/results/audit.json)
    assert unlearned(63.0, 85.1, 10.0, cfg) is None  # the lowest share measured there: a ViT teacher on textures
    assert unlearned(19.0, 98.3, 10.0, cfg) is None  # 9 of 88.3 points over chance: it learned something
    assert AT_CHANCE in unlearned(18.0, 98.3, 10.0, cfg)
    assert AT_CHANCE in unlearned(10.03, 98.3, 10.03, cfg)
    # chance is the best constant answer: on a set of 98 % sevens, a student answering 'seven' learned nothing
    skewed = torch.tensor([7] * 98 + [1, 2])
    assert chance_of(skewed) == pytest.approx(98.0)
    assert AT_CHANCE in unlearned(98.0, 99.5, chance_of(skewed), cfg)
    assert "more epochs (7)" in unlearned(10.0, 90.0, 10.0, AuditConfig(steps=None, train=TrainConfig(epochs=7)))


def test_the_cli_says_why_and_exits_2(digits_teacher, tmp_path, capsys):
    weights = save_weights(digits_teacher, tmp_path / "t.safetensors")
    rc = main(["audit", "--teacher", str(weights), "--arch", "cnn", "--data", "digits", "--student", "lenet",
               "--steps", "10", "--transfer", "300", "--seeds", "0", "--threads", "1", "--out", str(tmp_path / "a")])
    assert rc == 2
    assert AT_CHANCE in capsys.readouterr().err
    assert not (tmp_path / "a" / "report.json").exists()  # no report, so no verdict to read


# --------------------------------------------------------------------------------------------- the audit job
@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def served(tmp_path, digits, digits_teacher):
    """The real app on a real store, serving ``plain-digits``: the plain digits teacher (public top-1 93.3 %)."""
    async with serving_plain_digits(tmp_path, digits, digits_teacher) as service:
        yield service


@pytest.mark.anyio
async def test_an_audit_job_whose_students_stayed_at_chance_fails_saying_so(served):
    from service.jobs.queue import JobQueue
    from service.jobs.runner import execute

    svc = served
    token = svc.key(("jobs",))
    params = {"target": {"model": "plain-digits"}, "data": "digits", "transfer": 300, "steps": 10,
              "student": "lenet", "seeds": [0], "families": ["labels", "kd"]}
    r = await svc.client.post("/v1/jobs", json={"kind": "audit", "params": params}, headers=svc.auth(token))
    assert r.status_code == 202, r.text
    queue = JobQueue(svc.app.state.store)
    job = queue.claim("w", job_id=r.json()["id"])
    assert execute(svc.settings, queue, job, "w") == "failed"  # the worker's run, here in process
    got = (await svc.client.get(f"/v1/jobs/{job.id}", headers=svc.auth(token))).json()
    assert got["status"] == "failed" and "verdict" not in (got["result"] or {}), got
    assert AT_CHANCE in got["error"] and "more steps (steps 10)" in got["error"], got["error"]

"""The audit's attack families: one torch-free list of names, one registered function per name."""
import subprocess
import sys

from sdb_core.protect.attacks import ATTACK_FAMILIES, PublicAPI
from sdb_core.protect.audit import AuditConfig, attack_plan
from sdb_core.protect.config import FAMILIES


def test_the_torch_free_names_are_the_registered_families():
    assert len(set(FAMILIES)) == len(FAMILIES)
    assert sorted(FAMILIES) == ATTACK_FAMILIES.names()


def test_the_plan_runs_the_families_in_order_and_always_the_labels_only_reference():
    keyed = PublicAPI(lambda x: x, lam=0.5)
    cfg = AuditConfig(temperatures=(0.25, 4.0), alphas=(0.9,), keys=3, smooth_taus=(2.0,), smooth_eps=(0.0, 0.1))
    plan = attack_plan(cfg, keyed)
    assert [a.name for a in plan] == ["labels_ls0", "labels_ls0.1", "labels_ls0.2", "kd_T0.25_a0.9", "kd_T4_a0.9",
                                      "topk1", "topk3", "smooth", "skeptical", "key_mean", "key_ensemble"]
    assert [a.family for a in plan] == ["labels"] * 3 + ["kd"] * 2 + ["topk"] * 2 + ["smooth", "skeptical"] + ["keys"] * 2
    assert sum(a.students for a in plan) == 3 + 2 + 2 + (2 + 1) + 1 + (3 + 1)
    # The families' order, not the config's; labels even when left out; no keys without a keyed path.
    plan = attack_plan(AuditConfig(families=("keys", "kd"), temperatures=(1.0,), alphas=(0.5,)),
                       PublicAPI(lambda x: x))
    assert [a.name for a in plan] == ["labels_ls0", "labels_ls0.1", "labels_ls0.2", "kd_T1_a0.5"]


def test_the_names_and_the_audit_job_import_no_torch():
    code = ("import sys\nimport sdb_core.protect.config, service.jobs.kinds.audit\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

"""A teacher (distill) or target (audit) that answers another number of classes than its data set has is refused in
words, right after it is loaded and before any training: an ONNX graph is not told a ``num_classes``, so the check is
of what it answers (the wrap's teacher check), not of what the reference declares."""
from __future__ import annotations

import numpy as np
import pytest

from sdb_core.progress import Hooks
from sdb_core.protect.config import AuditConfig
from sdb_core.tasks import ModelRef
from sdb_core.tasks import audit as audit_task
from sdb_core.tasks import distill as distill_task
from sdb_core.tasks.audit import AuditTask
from sdb_core.tasks.distill import DistillTask
from tests.onnx_graphs import ViewNet, onnx_bytes

CLASSES = 8


@pytest.fixture
def npz8(tmp_path):
    """``npz:`` data of 8 classes, 8x8 one-channel images (10 of each)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "eight.npz"
    np.savez_compressed(path, x=rng.random((10 * CLASSES, 8, 8), np.float32), y=np.arange(10 * CLASSES) % CLASSES)
    return f"npz:{path}"


def teacher_file(tmp_path, classes: int) -> str:
    path = tmp_path / f"teacher{classes}.onnx"
    path.write_bytes(onnx_bytes(ViewNet(classes), (1, 8, 8)))
    return str(path)


def watched() -> tuple[Hooks, list[str]]:
    """Hooks that record every phase a task starts and every line it logs: a training starts a phase."""
    seen: list[str] = []
    return Hooks(phase=lambda name: seen.append(f"phase {name}"), log=seen.append), seen


@pytest.mark.parametrize("declared", [None, CLASSES], ids=["undeclared", "num_classes-8"])
def test_distill_refuses_a_teacher_of_other_classes_before_training(tmp_path, npz8, declared):
    ref = ModelRef(weights=teacher_file(tmp_path, 10), num_classes=declared)
    hooks, seen = watched()
    out = tmp_path / "student.safetensors"
    with pytest.raises(ValueError, match=r"the teacher, ONNX model .*answers shape \(2, 10\).*the data has 8 classes"):
        distill_task.run(DistillTask.from_options("mlp", npz8, teacher=ref, epochs=1), out, hooks)
    assert seen == [] and not out.exists()


@pytest.mark.parametrize("declared", [None, CLASSES], ids=["undeclared", "num_classes-8"])
def test_audit_refuses_a_target_of_other_classes_before_training(tmp_path, npz8, declared):
    ref = ModelRef(weights=teacher_file(tmp_path, 10), num_classes=declared)
    hooks, seen = watched()
    cfg = AuditConfig(transfer_n=40, steps=10, seeds=(0,), families=("labels", "kd"))
    with pytest.raises(ValueError, match=r"the target, ONNX model .*answers shape \(2, 10\).*the data has 8 classes"):
        audit_task.run(AuditTask(npz8, ref, cfg), tmp_path / "audit", hooks)
    assert seen == []


def test_a_declared_count_is_still_checked_against_the_data_first(tmp_path, npz8):
    ref = ModelRef(weights=teacher_file(tmp_path, 10), num_classes=10)
    with pytest.raises(ValueError, match="answers 10 classes .* the data set has 8"):
        distill_task.run(DistillTask.from_options("mlp", npz8, teacher=ref, epochs=1), tmp_path / "s.safetensors")


def test_a_teacher_of_the_data_classes_still_distils(tmp_path, npz8):
    ref = ModelRef(weights=teacher_file(tmp_path, CLASSES))
    out = distill_task.run(DistillTask.from_options("mlp", npz8, teacher=ref, epochs=1), tmp_path / "s.safetensors")
    assert out.transfer_size > 0 and (tmp_path / "s.safetensors").exists()

"""An AFK student scored on test composites holding no positive of its tasks (a small ``eval_n``) is kept and its
mAP reported as undefined (None, JSON null), as ``eval_n: 0`` reports it: mean_average_precision raised, after
training, and the job failed with the student discarded. A task without a positive has AP None, not NaN."""
from __future__ import annotations

import json

import torch

from sdb_core.amalgamate.afk import afk
from sdb_core.amalgamate.config import AFKConfig, TeacherSpec
from sdb_core.amalgamate.multilabel import MultiLabelNet
from sdb_core.data.composites import make_composites
from sdb_core.train import TrainConfig

TINY = TrainConfig(optimizer="adam", lr=5e-3, weight_decay=0.0, batch_size=16, epochs=1, seed=0)


def _teachers() -> list[TeacherSpec]:
    torch.manual_seed(0)
    return [TeacherSpec(name, MultiLabelNet(1, 5, (4, 4, 4)).eval(), labels)
            for name, labels in (("low", [0, 1, 2, 3, 4]), ("high", [5, 6, 7, 8, 9]))]


def _afk(tasks: list[int]):
    images, _ = make_composites(32, seed=12)
    _, labels = make_composites(1, split="test", seed=0)
    assert labels[0].nonzero()[0].tolist() == [1, 4]  # the one test composite scored: digits 1 and 4
    cfg = AFKConfig(tasks=tasks, layer_epochs=1, finetune_epochs=1, eval_n=1, data_seed=0, train=TINY)
    return afk(cfg, _teachers(), torch.from_numpy(images))


def test_no_positive_of_any_task_keeps_the_student_and_reports_no_map():
    res = _afk([2, 7])
    assert res.student is not None and res.map is None and res.teacher_map is None
    assert res.ap == {2: None, 7: None} and res.teacher_ap == {2: None, 7: None}
    json.dumps(res.report(), allow_nan=False)  # strict JSON


def test_a_task_without_a_positive_has_no_ap_and_is_left_out_of_the_map():
    res = _afk([1, 7])
    assert res.ap[7] is None and isinstance(res.ap[1], float) and res.map == res.ap[1]
    json.dumps(res.report(), allow_nan=False)

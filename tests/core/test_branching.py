"""Task branching on tiny scenes: the recipe end to end, the branch-point search, the frozen teachers,
a third task, and the student's bundle."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdb_core.amalgamate.branching import (
    BranchedStudent,
    BranchingConfig,
    branching,
    evaluate,
    export_student,
    miou,
    output_layout,
    prediction_figure,
    train_teacher,
)
from sdb_core.data.scenes import make_scenes
from sdb_core.models.encdec import EncDec, count_params
from sdb_core.train import device_of

TINY = {"size": 32, "num_classes": 2, "n_train": 160, "n_test": 60, "widths": (8, 16, 16),
        "teacher_widths": (8, 16, 16), "teacher_epochs": 5, "epochs": 5, "batch_size": 8, "lr": 1e-2,
        "scratch": False}


@pytest.fixture(scope="module")
def run():
    """Teachers trained on labelled scenes; the student then sees the same images with their
    labels scrambled: were they used anywhere on its path, it could not learn the tasks."""
    cfg = BranchingConfig(**TINY, seed=0)
    train = make_scenes(cfg.n_train, size=cfg.size, num_classes=cfg.num_classes, seed=1000)
    test = make_scenes(cfg.n_test, size=cfg.size, num_classes=cfg.num_classes, seed=2000)
    teachers = {t: train_teacher(t, train, cfg) for t in cfg.tasks}
    before = {t: {k: v.clone() for k, v in net.state_dict().items()} for t, net in teachers.items()}
    rng = np.random.default_rng(0)
    scrambled = dataclasses.replace(train, seg=rng.integers(0, cfg.num_classes + 1, train.seg.shape),
                                    depth=rng.uniform(0, 1, train.depth.shape).astype(np.float32))
    res = branching(cfg, teachers=teachers, train=scrambled, test=test, log=lambda m: None)
    return cfg, train, test, teachers, before, res


def test_student_beats_an_untrained_one_by_a_margin(run):
    cfg, _, test, teachers, _, res = run
    torch.manual_seed(123)
    untrained = BranchedStudent(EncDec(3, 1, cfg.widths, cfg.convs), teachers, list(res.branch_points.values()))
    untrained.settle(res.branch_points)
    untrained.to(device_of(res.student_model))  # its trunk is new (on the CPU), its frozen stages the teachers'
    base = evaluate(untrained, test, cfg.num_classes)
    teacher_rmse = res.teachers["depth"]["rmse"]
    # Margins checked on seeds 0-2 of these settings; the tiny teachers themselves vary most.
    assert res.teachers["seg"]["miou"] > base["miou"] + 20.0 and teacher_rmse < 0.9 * base["rmse"]
    assert res.student["miou"] > base["miou"] + 20.0, (res.student, base)
    assert res.student["miou"] > res.teachers["seg"]["miou"] - 15.0, (res.student, res.teachers)
    # Depth: at least half of the way from the untrained student's error to the teacher's.
    assert res.student["rmse"] < base["rmse"] - 0.5 * (base["rmse"] - teacher_rmse), (res.student, base)


def test_branch_points_are_the_lowest_search_loss_and_the_student_is_pruned(run):
    _, _, _, _, _, res = run
    for task, point in res.branch_points.items():
        losses = res.search_losses[task]
        assert set(losses) == {"enc3", "dec2", "dec1"}  # default candidates: bottleneck to last decoder stage
        assert all(np.isfinite(v) for v in losses.values())
        assert point == min(losses, key=losses.get)
    student = res.student_model
    names = ["enc1", "enc2", "enc3", "dec2", "dec1"]
    deepest = max(names.index(p) for p in res.branch_points.values())
    assert student.trunk.stage_names == names[:deepest + 1]
    assert sorted(student.adaptors.keys()) == sorted(f"{t}@{p}" for t, p in res.branch_points.items())
    # Its parameters: shared stages, adaptors and each teacher's rest past its branch point only.
    rests = sum(count_params(s) for t, p in res.branch_points.items()
                for s in list(res.teacher_models[t].stages.values())[names.index(p) + 1:])
    expected = count_params(student.trunk) + count_params(student.adaptors) + rests
    assert res.student["params"] == count_params(student) == expected < res.teacher_params
    assert set(res.history) == {"search", "finetune"} and res.history["finetune"]


def test_teachers_stay_frozen(run):
    _, _, _, teachers, before, res = run
    for t, net in teachers.items():
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[t][k]), f"teacher {t} changed {k}"
    assert all(not p.requires_grad for p in res.student_model.teachers.parameters())
    res.student_model.train()
    assert all(not m.training for f in res.student_model.teachers.values() for m in f.modules())


def test_bundle_matches_the_student_and_the_figure_is_written(run, tmp_path):
    from sdb_core.bundle import load_bundle

    cfg, _, test, teachers, _, res = run
    student = res.student_model
    path = export_student(student, tmp_path / "student.sdb", name="t", size=cfg.size,
                          num_classes=cfg.num_classes, class_names=test.class_names)
    bundle = load_bundle(path)
    assert bundle.meta["task"] == "segmentation-depth" and bundle.meta["mode"] == "plain"
    assert bundle.meta["outputs"] == output_layout(cfg.tasks, cfg.num_classes) == {"seg": [0, 3], "depth": [3, 4]}
    assert bundle.meta["branch_points"] == res.branch_points
    x = test.images[:3]
    with torch.no_grad():
        ref = student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bundle.public_logits(x), ref, atol=1e-4)
    png = prediction_figure(student, teachers, test, tmp_path / "pred.png", n=2)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_three_tasks_with_an_edge_teacher():
    cfg = BranchingConfig(**{**TINY, "n_train": 64, "n_test": 20, "teacher_epochs": 1, "epochs": 2},
                          tasks=("seg", "depth", "edges"), candidates=("dec2", "dec1"))
    res = branching(cfg, log=lambda m: None)
    assert set(res.branch_points) == {"seg", "depth", "edges"}
    assert set(res.branch_points.values()) <= {"dec2", "dec1"}
    assert {"miou", "rmse", "abs_rel", "edge_f1"} <= set(res.student)
    out = res.student_model(torch.zeros(2, 3, 32, 32, device=device_of(res.student_model)))
    assert out.shape == (2, 3 + 1 + 1, 32, 32)


def test_miou_on_a_hand_made_case():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    # class 0: inter 1, union 2; class 1: inter 2, union 3
    assert miou(pred, target, 1) == pytest.approx(100 * (0.5 + 2 / 3) / 2)


@pytest.mark.parametrize("bad", [{"tasks": ("seg", "normals")}, {"tasks": ("seg", "seg")}, {"epochs": 1},
                                 {"candidates": ("head",)}, {"candidates": ("nope",)}, {"size": 30},
                                 {"widths": (8, 16)}, {"search_fraction": 1.0}])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        BranchingConfig(**bad)

"""AFK and the multi-label family: mAP on hand-computed cases, block-wise forward, the recipe end to end."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sdb_core.amalgamate.afk import (
    AFKConfig,
    FilteredStudent,
    TeacherSpec,
    afk,
    default_student_widths,
    untrained_map,
)
from sdb_core.amalgamate.multilabel import (
    MultiLabelNet,
    average_precision,
    mean_average_precision,
    predict_probs,
    train_multilabel,
)
from sdb_core.data.composites import make_composites
from sdb_core.train import TrainConfig, device_of

TINY_TRAIN = TrainConfig(optimizer="adam", lr=5e-3, weight_decay=0.0, batch_size=32, seed=0)


# ---- mAP ----------------------------------------------------------------------------------------

def test_average_precision_by_hand():
    # Ranking 1 0 1 0: precision 1/1 at the first positive, 2/3 at the second.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    # A tie between a positive and a negative is one threshold: precision 1/2 there.
    assert average_precision(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0])) == pytest.approx(0.5)
    assert average_precision(np.array([0.2, 0.9]), np.array([1, 0])) == pytest.approx(0.5)


def test_map_matches_scikit_learn_and_skips_labels_without_positives():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    y = (rng.random((80, 4)) < 0.3).astype(np.float32)
    y[:, 3] = 0  # no positive: undefined AP, left out of the mean
    s = np.round(rng.random((80, 4)), 1) + 0.3 * y
    expected = np.mean([average_precision_score(y[:, j], s[:, j]) for j in range(3)]) * 100
    assert mean_average_precision(s, y) == pytest.approx(expected)
    assert mean_average_precision(y[:, :3], y[:, :3]) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        mean_average_precision(s[:, 3:], y[:, 3:])


# ---- the network family -------------------------------------------------------------------------

def test_multilabel_net_runs_block_by_block():
    torch.manual_seed(0)
    net = MultiLabelNet(1, 5, (8, 12, 16)).eval()
    x = torch.rand(3, 1, 56, 56)
    feats = net.features(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 14, 14), (12, 7, 7), (16, 3, 3)]
    out = net(x)
    assert out.shape == (3, 5)
    for i, f in enumerate(feats):
        assert torch.allclose(net.forward_from(f, i + 1), out, atol=1e-6)


def test_filtered_student_heads_follow_the_gates():
    torch.manual_seed(0)
    s = FilteredStudent(1, [7, 2, 4], (8, 8, 8)).eval()
    x = torch.rand(4, 1, 56, 56)
    assert s(x).shape == (4, 3) and s.tasks == [7, 2, 4]
    before = s(x)
    with torch.no_grad():
        s.gate_logits[-1][1].fill_(-30.0)  # close every channel of task 2: its logit is the bias alone
    after = s(x)
    assert torch.allclose(after[:, 1], s.head.fc.bias[1].expand(4), atol=1e-5)
    assert torch.allclose(after[:, [0, 2]], before[:, [0, 2]])


# ---- the recipe ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teachers() -> list[TeacherSpec]:
    """Two small teachers trained with labels on their own label sets (0-4 and 5-9)."""
    x, y = make_composites(1000, seed=11)
    out = []
    for name, labels in (("low", [0, 1, 2, 3, 4]), ("high", [5, 6, 7, 8, 9])):
        torch.manual_seed(0)
        net = MultiLabelNet(1, len(labels), (12, 16, 24))
        train_multilabel(net, x, y[:, labels], replace(TINY_TRAIN, lr=1e-2, epochs=6))
        out.append(TeacherSpec(name, net.eval(), labels))
    return out


def test_afk_student_learns_the_requested_tasks_without_labels(teachers):
    tasks = [1, 3, 6, 8]  # two from each teacher
    images, _ = make_composites(1000, seed=12)  # the recipe gets images only: there are no labels to use
    cfg = AFKConfig(tasks=tasks, layer_epochs=1, finetune_epochs=4, eval_n=400, data_seed=5, train=TINY_TRAIN)
    floor = untrained_map(cfg, teachers)
    res = afk(cfg, teachers, torch.from_numpy(images))
    # The heads cover exactly the requested tasks, in the requested order.
    on = device_of(res.student)  # where the recipe trained (cfg.train.device: CUDA when there is one)
    assert res.student.tasks == tasks and res.student(torch.rand(2, 1, 56, 56, device=on)).shape == (2, 4)
    assert sorted(res.ap) == sorted(tasks) and set(res.active_channels) == set(tasks)
    assert list(res.history) == ["block0", "block1", "block2", "finetune"]
    print(f"untrained {floor:.1f} teachers {res.teacher_map:.1f} student {res.map:.1f}")
    assert res.teacher_map > floor + 30  # the teachers are worth learning from
    assert res.map > floor + 25, (res.map, floor, res.teacher_map)
    # Fewer parameters than the two teachers together.
    assert res.params < sum(res.teacher_params.values())
    # The student's probabilities follow the teachers' on the requested tasks.
    xt, yt = make_composites(200, split="test", seed=6)
    s = predict_probs(res.student, torch.from_numpy(xt)).numpy()
    assert mean_average_precision(s, yt[:, tasks]) > floor + 25


def test_a_subset_student_is_smaller(teachers):
    full = default_student_widths(teachers, list(range(10)), 0.85)
    subset = default_student_widths(teachers, [1, 6], 0.85)
    assert all(a <= b for a, b in zip(subset, full)) and subset != full


def test_recipe_and_config_reject_tasks_no_teacher_knows(teachers):
    with pytest.raises(ValueError, match="not taught"):
        afk(AFKConfig(tasks=[1, 12]), teachers)  # checked before any training
    with pytest.raises(ValueError, match="distinct"):
        AFKConfig(tasks=[1, 1])
    with pytest.raises(ValueError, match="outputs"):
        TeacherSpec("bad", teachers[0].model, [0, 1])

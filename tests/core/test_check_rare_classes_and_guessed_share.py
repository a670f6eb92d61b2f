"""The self-check on a rare class (its class-balanced figure) and the guessed-key share's range."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sdb_core.protect import CheckConfig, SDBConfig, Thresholds, WrapRefused, train_box, wrap
from sdb_core.protect.check import holdout, teacher_data
from sdb_core.protect.key import random_keys
from sdb_core.protect.sdb import guessed_key_share
from sdb_core.train import TrainConfig, predict_logits, seed_everything, train_classifier


def _seven_vs_rest(digits, sevens: int = 25, seed: int = 0):
    """Digits as "7 vs rest", the sevens of the training split cut to ``sevens`` (98/2 at 25)."""
    x, y = digits.train.tensors
    seven = (y == 7).nonzero().flatten()
    seven = seven[torch.randperm(len(seven), generator=torch.Generator().manual_seed(seed))[:sevens]]
    keep = torch.cat([(y != 7).nonzero().flatten(), seven])
    xt, yt = digits.test.tensors
    return replace(digits, train=TensorDataset(x[keep], (y[keep] == 7).long()),
                   test=TensorDataset(xt, (yt == 7).long()), num_classes=2, labels=["other", "seven"])


def _mlp(data, train, epochs: int, seed: int = 0) -> nn.Module:
    seed_everything(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, data.num_classes))
    train_classifier(net, train, TrainConfig(epochs=epochs, lr=0.05, seed=seed))
    return net.eval()


def _balanced_drop(teacher, path, held_out) -> float:
    """The teacher's mean per-class recall on ``held_out`` less ``path``'s, in points."""
    x, y = held_out.tensors
    recall = lambda fn: torch.stack([(predict_logits(fn, x).argmax(1)[y == c] == c).float().mean()
                                     for c in y.unique()]).mean().item()
    return 100 * (recall(teacher) - recall(path))


def test_a_box_that_never_answers_the_rare_class_is_not_passed(digits):
    """7 vs rest at 98/2: the held-out part has 4 sevens, so a path that never answers "seven" loses 2.1 points of
    top-1, within an owner's 2.5, and was passed; its class-balanced top-1 (mean per-class recall) lost ~50. The
    check judges that figure too: it refuses, naming it, or ships a box whose class-balanced drops are within."""
    data = _seven_vs_rest(digits)
    check = CheckConfig(thresholds=Thresholds(max_accuracy_drop=2.5, max_keyed_drop=2.5), max_attempts=2,
                        leak_check=False, teacher_apart=True)
    teacher = _mlp(data, teacher_data(data, check).train, epochs=30)
    held_out = holdout(data, check.val_fraction, check.seed)[1]
    assert int(held_out.tensors[1].sum()) == 4
    cfg = SDBConfig(train=replace(SDBConfig().train, epochs=4))
    try:
        # a seeded key: the product draws it from the OS, and which path misses by how much depends on it
        key = random_keys(1, data.in_shape, data.mean, data.std, generator=torch.Generator().manual_seed(7))[0]
        box = wrap(teacher, data, cfg, check=check, key=key).box
    except WrapRefused as refused:
        assert "class-balanced" in str(refused) and "public_balanced by" in str(refused), str(refused)
        figures = refused.report["figures"]
        assert figures["keyed_balanced_drop"] > 2.5 and figures["keyed_drop"] <= 2.5, figures
        assert figures["teacher_balanced_acc"] - figures["keyed_balanced_acc"] == pytest.approx(
            figures["keyed_balanced_drop"], abs=1e-2)
        json.dumps(refused.report)
        return
    for path in (box.public_logits, box.distill_logits):
        assert _balanced_drop(teacher, path, held_out) <= 2.5


def test_balanced_classes_read_the_balanced_figure_as_the_top_1(digits):
    """On classes of equal size the class-balanced figures are the top-1's: nothing balanced is judged stricter."""
    from sdb_core.protect.sdb import public_report

    x, y = digits.train.tensors
    per_class = torch.cat([(y == c).nonzero().flatten()[:20] for c in range(10)])
    held_out = TensorDataset(x[per_class], y[per_class])
    teacher = _mlp(digits, digits.train, epochs=3)
    box = train_box(teacher, digits, SDBConfig(train=replace(SDBConfig().train, epochs=1))).box
    r = public_report(teacher, box, held_out)
    for path in ("teacher", "public", "keyed"):
        assert r[f"{path}_balanced_acc"] == pytest.approx(r[f"{path}_acc"], abs=1e-4)
    # its error is read within each class (a stratified estimate): no wider than the top-1's where recalls differ
    assert 0 <= r["public_balanced_drop_se"] <= r["public_drop_se"] * 1.05, r


def test_the_guessed_key_share_is_bounded_or_unmeasured(digits):
    """A teacher with tiny logits (its last layer x0.01) and a box of one epoch: the keyed path is no nearer the
    teacher than the confusion target, and the share's scale (that gap) had no length: 4,528 was read (39,029 and
    16 million in wraps). Unmeasured (None) there, within [-1, 10] elsewhere; an unmeasured share passes no bound
    above its floor, and the refusal says why."""
    fit, _ = holdout(digits, 0.15, 0)
    teacher = _mlp(digits, fit.train, epochs=15)
    with torch.no_grad():
        teacher[-1].weight.mul_(0.01)
        teacher[-1].bias.mul_(0.01)
    cfg = SDBConfig(train=replace(SDBConfig().train, epochs=1))
    share = guessed_key_share(train_box(teacher, fit, cfg).box, teacher, fit, cfg)
    assert share is None or -1.0 <= share <= 10.0, share

    lax = {"max_accuracy_drop": 100.0, "max_keyed_drop": 100.0, "min_leak_margin": -100.0}
    check = CheckConfig(thresholds=Thresholds(**lax), max_attempts=1, leak_check=False)
    try:
        result = wrap(teacher, digits, cfg, check=check)
    except WrapRefused as refused:
        assert refused.report["figures"]["guessed_key_share"] is None
        assert "share unmeasured" in str(refused) and "missed guessed by 1.10" in str(refused), str(refused)
    else:
        share = result.report["check"]["figures"]["guessed_key_share"]
        assert share is not None and 0.1 <= share <= 10.0, share
    # No bound (at or below the floor): an unmeasured share misses nothing, and the report says None.
    free = replace(check, thresholds=Thresholds(**lax, min_guessed_key_share=-1.0))
    figures = wrap(teacher, digits, cfg, check=free).report["check"]["figures"]
    assert figures["guessed_key_share"] is None or -1.0 <= figures["guessed_key_share"] <= 10.0
    json.dumps(figures)


def test_the_next_attempt_moves_as_after_its_paths_own_miss():
    """A class-balanced miss is its path's for ``adapt``; an unmeasured guessed-key share is a keyed miss (the keyed
    path is far from the teacher: more of the image, not less key), a measured one stays a guessed-key miss."""
    from sdb_core.protect.check import _by_path

    misses = Thresholds().misses({"public_drop": 0.5, "public_balanced_drop": 3.0, "keyed_drop": 2.0,
                                  "keyed_balanced_drop": 1.0, "guessed_key_share": None})
    assert misses == {"public_balanced": 2.0, "keyed": 0.5, "guessed": 1.1}
    assert _by_path(misses, {"guessed_key_share": None}) == {"public": 2.0, "keyed": 1.1}
    assert _by_path({"guessed": 0.05}, {"guessed_key_share": 0.05}) == {"guessed": 0.05}
    assert Thresholds(min_guessed_key_share=-1.0).misses({"public_drop": 0.0, "guessed_key_share": None}) == {}

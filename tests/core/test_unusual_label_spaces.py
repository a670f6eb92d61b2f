"""Label spaces and data a real owner brings, not the 10-class benchmarks: labels that are not 0..K-1, one class,
rare classes, many classes, inputs that are not normalised, training that overflows. Each is handled or refused
in words, never a silent bad box."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sdb_core.data import DatasetError, load_dataset, stratified_split
from sdb_core.data.base import DataSplits
from sdb_core.protect import CheckConfig, SDBConfig, Thresholds, WrapRefused, train_box, wrap, wrap_nasty
from sdb_core.train import TrainConfig, seed_everything, train_classifier

from ..signals import FeatureNet, _splits, feature_splits

FAST = SDBConfig(train=TrainConfig(epochs=1, lr=0.01, batch_size=64, grad_clip=5.0))
TINY_CHECK = CheckConfig(thresholds=Thresholds(100.0, 100.0, -100.0, -10.0), max_attempts=1, transfer_n=100,
                         student_train=TrainConfig(epochs=1, lr=0.01, batch_size=64), student_seeds=1)


def _npz(tmp_path, y, **more):
    path = tmp_path / "set.npz"
    x = np.random.default_rng(0).integers(0, 256, (len(y), 8, 8), dtype=np.uint8)
    np.savez(path, x=x, y=np.asarray(y), **more)
    return f"npz:{path}"


# ----------------------------------------------------------------------------- labels that are not 0..K-1
@pytest.mark.parametrize("y, words", [
    (np.arange(40) % 10 + 1, r"10 distinct values \(1, 2, 3, 4, 5, ..., 10\).* 1 have no sample \(e.g. 0\)"),
    (np.array([0, 3, 7, 20] * 10), r"of the indices 0..20, 17 have no sample \(e.g. 1, 2, 4, 5, 6\)"),
    (np.array([0, 10**9] * 20, np.int64), r"2 distinct values \(0, 1000000000\)"),
    (np.arange(40, dtype=np.int16) % 4 + 2, "have no sample"),
    (np.zeros(40, np.uint8), "one class"),
])
def test_labels_that_are_not_class_indices_are_refused_not_turned_into_empty_classes(tmp_path, y, words):
    with pytest.raises(DatasetError, match=words):  # was: 11, 21, 10**9 + 1 classes, or one
        load_dataset(_npz(tmp_path, y))


def test_labels_with_class_names_may_leave_declared_classes_empty_and_small_int_dtypes_load(tmp_path):
    y = np.arange(40) % 10 + 1  # the teacher answers 11 classes, index 0 unused: the owner says so
    data = load_dataset(_npz(tmp_path, y, labels=np.array([f"c{i}" for i in range(11)])))
    assert data.num_classes == 11 and int(data.train.tensors[1].min()) == 1
    for dtype in (np.uint8, np.int16, np.uint64):
        data = load_dataset(_npz(tmp_path, (np.arange(40) % 4).astype(dtype)))
        assert data.num_classes == 4 and data.train.tensors[1].dtype == torch.int64


@pytest.mark.parametrize("x", [np.arange(40 * 64, dtype=np.float32).reshape(40, 8, 8) % 256,
                               np.random.default_rng(0).normal(size=(40, 8, 8))])
def test_float_pixels_outside_0_1_are_refused(tmp_path, x):
    """0..255 floats (or standardised ones) were normalised by their own statistics: the bundle then served
    images as (pixel / 255 - 127) / 74, and a key was a near-constant image. The advice is the format's depth, not
    255 (scikit-learn's digits, 0..16, divided by 255 are dark images in [0, 0.063])."""
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(40) % 4)
    with pytest.raises(DatasetError, match=r"float pixels from .* are in \[0, 1\]: give x / DEPTH .*16 for"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")


# ----------------------------------------------------------------------------- rare classes
def test_a_rare_class_gets_a_held_out_input_and_the_split_is_unchanged_where_every_quota_is_one():
    y = np.repeat(np.arange(6), [157, 158, 168, 156, 2, 3])
    _, test = stratified_split(y, 97, seed=0)
    assert len(test) == 97 and np.bincount(y[test], minlength=6).tolist()[4:] == [1, 1]  # was [0, 0]
    y = np.repeat(np.arange(3), [50, 30, 1])  # a singleton keeps its input for training
    assert np.bincount(y[stratified_split(y, 20, seed=3)[1]], minlength=3).tolist() == [12, 8, 0]
    y = np.repeat(np.arange(10), 40)
    assert np.bincount(y[stratified_split(y, 60, seed=0)[1]]).tolist() == [6] * 10


def _checked_wrap_report(name: str, y: np.ndarray, classes: int) -> tuple[dict, list[str]]:
    """The check's report and log of a wrap of a feature teacher on ``y`` (its first 40 the test split)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (len(y), 16)) + rng.normal(0, 1.5, (classes, 16))[y]
    data = _splits(name, x, y, 40, classes)
    seed_everything(0)
    teacher = FeatureNet(features=16, classes=classes)
    train_classifier(teacher, data.train, TrainConfig(epochs=3, lr=0.05))
    logged: list[str] = []
    try:
        return wrap(teacher.eval(), data, FAST, check=TINY_CHECK, log=logged.append).report["check"], logged
    except WrapRefused as e:
        return e.report, logged


def test_the_check_reports_the_classes_its_held_out_split_cannot_measure():
    # class 3's one training input stays in the fit split
    report, logged = _checked_wrap_report(
        "rare", np.concatenate([np.arange(40) % 3, np.repeat(np.arange(4), [120, 120, 120, 1])]), 4)
    assert report["unvalidated_classes"] == {"count": 1, "first": [3]}
    assert any("1 of 4 classes have no held-out input" in line for line in logged)
    assert "untrained_classes" not in report


def test_a_class_the_train_split_lacks_is_said_not_silently_wrapped():
    """A class only the test split has (an export that dropped it from training): the wrap went ahead saying only
    that it had no held-out input."""
    report, logged = _checked_wrap_report(  # class 4 in the test split alone
        "untrained", np.concatenate([np.arange(40) % 5, np.repeat(np.arange(4), 90)]), 5)
    assert report["untrained_classes"] == {"count": 1, "first": [4]}
    assert any("1 of 5 classes have no training input" in line for line in logged), logged


def test_a_leak_miss_no_box_could_avoid_says_so():
    from sdb_core.protect.check import _unmeasurable_leak

    th = Thresholds()
    starved = {"misses": {"leak": 0.49}, "figures": {"labels_only": 1.73}}
    assert "cannot show that margin here" in _unmeasurable_leak(starved, 1000, 1000, th)
    assert "1.0 per class" in _unmeasurable_leak(starved, 1000, 1000, th)
    assert _unmeasurable_leak({"misses": {"leak": 1.0}, "figures": {"labels_only": 90.0}}, 10, 1000, th) == ""
    # A task the labels alone solve: nothing left to leak beyond them, said so, with the threshold that accepts it.
    solved = _unmeasurable_leak({"misses": {"leak": 2.0}, "figures": {"labels_only": 100.0}}, 4, 1000, th)
    assert "labels alone teach this task" in solved and "--min-leak-margin 0" in solved


# ----------------------------------------------------------------------------- scale, constants, overflow
def _raw_digits(scale: float = 255.0):
    """digits as an owner might hand it over: pixel values 0..255, declared normalised (mean 0, std 1)."""
    d = load_dataset("digits")
    raw = lambda t: (t * d.std[0] + d.mean[0]) * scale
    return DataSplits("raw", TensorDataset(raw(d.train.tensors[0]), d.train.tensors[1]),
                      TensorDataset(raw(d.test.tensors[0]), d.test.tensors[1]), 10, d.in_shape, (0.0,), (1.0,),
                      d.labels)


def test_inputs_that_are_not_normalised_are_refused_before_a_key_hides_under_them():
    """Raw pixels declared normalised: the key was 1/300 of the input, and five random keys opened the keyed
    path as well as the key did (89.5-89.7% vs 89.5%), with the self-check none the wiser."""
    data = _raw_digits()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    for run in (lambda: train_box(teacher, data, FAST), lambda: wrap(teacher, data, FAST, check=TINY_CHECK)):
        with pytest.raises(ValueError, match=r"inputs spread \d+x as wide as a key .* not normalised"):
            run()
    train_box(teacher, _raw_digits(1.0), replace(FAST, train=replace(FAST.train, epochs=1)))  # [0, 1] pixels: fine


def test_a_constant_channel_declared_with_std_0_is_refused_in_words():
    """std 0 made the key Inf, the first loss NaN, and the check blamed the learning rate."""
    d = feature_splits(n=200, n_test=50)
    x = d.train.tensors[0].view(-1, 2, 16)
    data = DataSplits("c", TensorDataset(x, d.train.tensors[1]),
                      TensorDataset(d.test.tensors[0].view(-1, 2, 16), d.test.tensors[1]), 4, (2, 16), (0.0, 0.5),
                      (1.0, 0.0), d.labels)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(32, 4))
    for run in (data.checked, lambda: train_box(teacher, data, FAST), lambda: wrap(teacher, data, FAST),
                lambda: wrap_nasty(teacher, data, check=None)):
        with pytest.raises(DatasetError, match=r"channel 1 has std 0.0"):
            run()


class _Overflows(nn.Module):
    """A linear teacher whose logits are Inf on inputs with a 6th feature over 4 (finite on the first two)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(32, 4)

    def forward(self, x):
        z = self.linear(x)
        return torch.where(x[:, 5:6] > 4.0, torch.full_like(z, float("inf")), z)


@pytest.mark.parametrize("cached", [True, False], ids=["logits cached", "logits per batch"])
def test_a_teacher_whose_logits_overflow_on_training_inputs_is_refused_not_retried_as_a_divergence(monkeypatch, cached):
    """Its first loss was NaN: the check took it for a divergence, halved the learning rate and refused, blaming it.
    (Per batch, the count stays on the device until the loss goes NaN or the run ends: no read-back a step.)"""
    from sdb_core.protect import sdb

    if not cached:  # a training split too large to hold its teacher logits
        monkeypatch.setattr(sdb, "CACHED_LOGITS_MAX", 0)
    data = feature_splits(n=400, n_test=100)
    x = data.train.tensors[0].clone()
    x[7::10, 5] = 5.0
    data = replace(data, train=TensorDataset(x, data.train.tensors[1]))
    teacher = _Overflows().eval()
    for run in (lambda: train_box(teacher, data, FAST), lambda: wrap(teacher, data, FAST, check=TINY_CHECK),
                lambda: wrap_nasty(teacher, data, check=None)):
        with pytest.raises(ValueError, match=r"teacher's logits are NaN or Inf on \d+ of \d+"):
            run()


def test_weights_that_overflow_in_the_last_step_make_no_box():
    """fit checks each loss before its update; one update of 1e38 left Inf logits, and the box was made (and
    export said the ONNX graph computed something else)."""
    d = load_dataset("digits")
    data = replace(d, train=TensorDataset(d.train.tensors[0][:64], d.train.tensors[1][:64]))
    seed_everything(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    train_classifier(teacher, d.train, TrainConfig(epochs=1, lr=0.05))
    wild = SDBConfig(calibrate_keyed=False, train=TrainConfig(epochs=1, lr=1e38, batch_size=64, grad_clip=None))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        train_box(teacher.eval(), data, wild)
    with pytest.raises(WrapRefused, match="every attempt of the sdb recipe diverged"):
        wrap(teacher, data, wild, check=replace(TINY_CHECK, max_attempts=2))

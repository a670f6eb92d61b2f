"""Splits a user builds by hand from their own tensors (``DataSplits(...)``): numpy's habits are taken
(float64 inputs, int32 labels); what no recipe can use is refused before any training, in the owner's
terms, by every wrap entry point."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sdb_core.data import DatasetError
from sdb_core.protect import CheckConfig, SDBConfig, train_box, wrap, wrap_nasty
from sdb_core.train import TrainConfig, device_of

from ..signals import FeatureNet, feature_splits


def _with(data, split: str = "train", *, x=None, y=None):
    xs, ys = getattr(data, split).tensors
    return replace(data, **{split: TensorDataset(xs if x is None else x(xs), ys if y is None else y(ys))})


def test_numpy_habits_are_converted_and_nothing_else_is_copied():
    data = feature_splits(n=200, n_test=50)
    same = data.checked()
    assert same.train.tensors[0] is data.train.tensors[0] and same.test.tensors[1] is data.test.tensors[1]
    loose = _with(_with(data, x=lambda x: x.double(), y=lambda y: y.int()[:, None]), "test", y=lambda y: y.float())
    fixed = loose.checked()
    for split in ("train", "test"):
        x, y = getattr(fixed, split).tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, getattr(data, split).tensors[0]) and torch.equal(y, getattr(data, split).tensors[1])
    assert loose.train.tensors[0].dtype == torch.float64  # the user's splits are left as they were


def test_splits_built_on_the_runs_device_come_back_on_the_cpu():
    """On a GPU (benchmarks/gpu.py runs this suite there), splits a user built with .cuda() failed in the check's
    numpy stratification (``y.numpy()`` of a CUDA tensor); the recipes move each batch themselves."""
    from sdb_core.data import transfer_split
    from sdb_core.protect.check import holdout
    from sdb_core.train import pick_device

    data = feature_splits(n=200, n_test=50)
    device = pick_device("auto")
    on = replace(data, train=TensorDataset(*(t.to(device) for t in data.train.tensors)),
                 test=TensorDataset(*(t.to(device) for t in data.test.tensors)))
    checked = on.checked()
    assert {t.device.type for split in (checked.train, checked.test) for t in split.tensors} == {"cpu"}
    fit, val = holdout(checked, 0.15, 0)
    assert len(val) >= data.num_classes and len(fit.train) + len(val) == len(data.train)
    assert len(transfer_split(checked, 40, 0)) == 40


@pytest.mark.parametrize("broken, message", [
    (lambda d: _with(d, x=lambda x: (x * 10).long()), r"inputs are torch.int64: .*real-valued"),
    (lambda d: _with(d, x=lambda x: x.index_fill(0, torch.tensor([7]), float("nan"))),
     r"1 input\(s\) with NaN or Inf values \(the first at index 7\)"),
    (lambda d: _with(d, "test", x=lambda x: x.index_fill(0, torch.tensor([2]), float("inf"))), r"data.test has 1 input"),
    (lambda d: _with(d, y=lambda y: y + 1), r"label\(s\) outside \[0, 4\)"),
    (lambda d: _with(d, y=lambda y: y - 1), r"label\(s\) outside \[0, 4\) \(e.g. -1"),
    (lambda d: _with(d, y=lambda y: y.float() + 0.5), "fractional"),
    (lambda d: _with(d, y=lambda y: torch.nn.functional.one_hot(y, 4)), r"labels have shape \(150, 4\)"),
    (lambda d: _with(d, x=lambda x: x[:, :16]), r"inputs have shape \(150, 16\); in_shape is \(32,\)"),
    (lambda d: _with(d, x=lambda x: x[:0], y=lambda y: y[:0]), "data.train is empty"),
    (lambda d: _with(d, "test", x=lambda x: x[:0], y=lambda y: y[:0]), "data.test is empty: the box is measured on it"),
    (lambda d: replace(d, num_classes=1), "at least 2 classes"),
    # refused by the bundle only, after training
    (lambda d: replace(d, labels=["a", "b"]), r"data.labels has 2 names for num_classes=4: one name per class"),
])
def test_splits_no_recipe_can_use_are_refused_by_every_wrap_before_any_training(broken, message):
    data = broken(feature_splits(n=200, n_test=50))
    teacher = FeatureNet()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    fast = SDBConfig(train=TrainConfig(epochs=1))
    for run in (lambda: data.checked(), lambda: wrap(teacher, data, fast), lambda: train_box(teacher, data, fast),
                lambda: wrap_nasty(teacher, data, check=None)):
        with pytest.raises(DatasetError, match=message):
            run()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_a_user_s_float64_splits_wrap_like_float32_ones():
    data = feature_splits(n=400, n_test=100)
    teacher = nn.Sequential(nn.Linear(32, 4))
    loose = _with(_with(data, x=lambda x: x.double(), y=lambda y: y.int()), "test", x=lambda x: x.double())
    r = train_box(teacher, loose, SDBConfig(train=TrainConfig(epochs=1, seed=0)))
    net = r.box.model
    assert net(torch.zeros(1, 32, device=device_of(net))).dtype == torch.float32 and 0 <= r.report["public_acc"] <= 100


def test_the_self_check_s_held_out_part_counts_the_classes_that_have_inputs():
    """A 1000-output teacher wrapped on data of 4 of its classes held out max(1000, 15%) of the training inputs:
    all but one per class, so the box was fitted on a handful."""
    from sdb_core.protect.check import holdout

    data = feature_splits(n=200, n_test=50)
    wide = replace(data, num_classes=1000, labels=[f"c{i}" for i in range(1000)])
    fit, val = holdout(wide, 0.15, 0)
    assert (len(val), len(fit.train)) == (round(0.15 * 150), 150 - round(0.15 * 150))
    assert sorted(set(val.tensors[1].tolist())) == [0, 1, 2, 3]  # still one or more of each class present


def test_a_set_with_one_training_input_per_class_is_refused_in_words():
    """It passed the upload, then failed every wrap, after training its teacher, as "data.test is empty: the box is
    measured on it" (the held-out part was empty, not the test split)."""
    from sdb_core.protect.check import holdout

    data = feature_splits(n=200, n_test=50)
    first = [int((data.train.tensors[1] == c).nonzero()[0]) for c in range(4)]
    tiny = _with(data, x=lambda x: x[first], y=lambda y: y[first])
    message = r"too few training inputs per class for the self-check's held-out part: 4 training input\(s\) in 4"
    check = CheckConfig()
    for run in (lambda: holdout(tiny, 0.15, 0), lambda: wrap_nasty(FeatureNet(), tiny, check=check),
                lambda: wrap(FeatureNet(), tiny, SDBConfig(train=TrainConfig(epochs=1)), check=check)):
        with pytest.raises(DatasetError, match=message):
            run()
    fit, val = holdout(_with(data, x=lambda x: x[first + first[:1]], y=lambda y: y[first + first[:1]]), 0.15, 0)
    assert len(val) == 1 and len(fit.train) == 4  # one class with two: it gives one


def test_one_mean_and_std_for_every_channel_may_be_plain_numbers():
    """``DataSplits(..., mean=0.5, std=0.2)`` failed every wrap with "'float' object is not iterable"."""
    import numpy as np

    data = feature_splits(n=200, n_test=50)
    for mean, std in ((0.0, 1.0), (np.float32(0.0), torch.tensor(1.0))):
        plain = replace(data, mean=mean, std=std)
        assert (plain.mean, plain.std) == ((0.0,), (1.0,)) and plain.checked().mean == (0.0,)
    r = train_box(nn.Sequential(nn.Linear(32, 4)), plain, SDBConfig(train=TrainConfig(epochs=1)))
    assert r.box.reveal_key().shape == (32,)
    with pytest.raises(DatasetError, match=r"one finite value, or one per channel \(32\), as a tuple"):
        replace(data, mean=(0.0, 1.0)).checked()
    assert replace(data, labels=None).checked().labels == []  # no names: numbered classes

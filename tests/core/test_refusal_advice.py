"""What a refused wrap and a misfit of weights advise: the cause they measured, in every caller's words."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sdb_core.data import load_dataset
from sdb_core.models import create_model
from sdb_core.protect import CheckConfig, SDBConfig, Thresholds, WrapRefused, random_keys, wrap
from sdb_core.protect.check import _balanced_missed, _unmeasurable_leak, teacher_data
from sdb_core.tasks.refs import ModelRef
from sdb_core.train import TrainConfig, seed_everything, train_classifier
from sdb_core.weights import WeightsError, save_weights

RARE = "a rare class's few inputs"


def _wrapped_at_lr_10(digits, attempts: int) -> pytest.ExceptionInfo[WrapRefused]:
    """A small MLP teacher of digits wrapped at lr 10 (one epoch an attempt): refused, the box collapsed."""
    check = CheckConfig(max_attempts=attempts, leak_check=False, teacher_apart=True)
    seed_everything(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train_classifier(teacher, teacher_data(digits, check).train, TrainConfig(epochs=10, lr=0.05, seed=0))
    key = random_keys(1, digits.in_shape, digits.mean, digits.std, generator=torch.Generator().manual_seed(7))[0]
    cfg = SDBConfig(train=replace(SDBConfig().train, epochs=1, lr=10.0))
    with pytest.raises(WrapRefused) as refused:
        wrap(teacher.eval(), digits, cfg, check=check, key=key)
    return refused


def test_a_collapsed_box_is_told_to_lower_its_learning_rate_not_to_feed_a_rare_class(digits):
    """A wrap at lr 10 on digits (balanced classes) collapses: each path answers one class or a few, ~10%. Its
    class-balanced miss is its top-1 miss, so the refusal gave the rare-class advice (more inputs, more epochs) and
    never named the learning rate; it says the box collapsed and names the rate as a flag and as a job's param."""
    refused = _wrapped_at_lr_10(digits, attempts=1)
    message, figures = str(refused.value), refused.value.report["figures"]
    assert figures["public_drop"] > 50 and figures["public_balanced_drop"] == pytest.approx(
        figures["public_drop"], abs=1.0), figures
    assert RARE not in message, message
    assert "The box collapsed" in message and "lower the learning rate, 10 in attempt 1" in message, message
    assert "sdb wrap --lr, a job's lr; SDBConfig.train.lr in Python" in message, message


def test_after_a_collapse_the_next_attempt_halves_the_learning_rate(digits):
    """The self-check lowered the rate only after a NaN: a box collapsed by lr 10 was retried at lr 10 (its other
    settings moved, which mend no rate too high) in every attempt. The attempt after a collapse halves it."""
    refused = _wrapped_at_lr_10(digits, attempts=2)
    first, second = refused.value.report["attempts"]
    assert first["settings"]["lr"] == 10.0 and first["figures"]["public_drop"] > 50, first
    assert second["settings"]["lr"] == 5.0, second
    assert second["settings"]["epochs"] == first["settings"]["epochs"], second  # the rate alone moved


def test_the_rare_class_advice_is_for_a_class_level_miss_in_both_callers_words():
    """The advice follows the figures: a class-balanced drop far past the top-1's (7 vs rest at 98/2) is a rare
    class's, with the epochs as a flag and a job's param; one no worse than the top-1's is every class's."""
    th = Thresholds(max_accuracy_drop=2.5, max_keyed_drop=2.5)
    fig = {"teacher_balanced_acc": 99.0, "public_drop": 2.1, "public_balanced_drop": 50.0, "public_balanced_acc": 49.0,
           "public_balanced_drop_se": 12.0}
    rare = _balanced_missed(fig, {"public_balanced": 47.5}, th)
    assert RARE in rare and "sdb wrap --epochs, a job's epochs; SDBConfig.train.epochs in Python" in rare, rare
    alike = _balanced_missed({**fig, "public_drop": 49.8}, {"public": 47.3, "public_balanced": 47.5}, th)
    assert RARE not in alike and "every class missed alike" in alike, alike
    nasty = _balanced_missed(fig, {"public_balanced": 47.5}, th, "NastyConfig")
    assert "NastyConfig.train.epochs" in nasty and "SDBConfig" not in nasty, nasty
    # the leak margin, too, is named as a flag and as a job's param
    solved = _unmeasurable_leak({"misses": {"leak": 2.0}, "figures": {"labels_only": 99.5}}, 4, 200, Thresholds())
    assert "--min-leak-margin 0, a job's min_leak_margin 0" in solved, solved


def _image_folder(root, side: int = 8, per_class: int = 5):
    """Two classes of small grayscale PNGs: an image folder as an owner zips one."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), "L").save(root / c / f"{i}.png")
    return root


def test_weights_that_misfit_an_image_folder_name_the_size_it_was_read_at(tmp_path):
    """Weights of the zoo cnn trained on 8x8 images and an image folder of 8x8 images: the folder is read at 32 px,
    the network built for (1, 32, 32) takes 1,024 features where the file has 256, and the misfit said only "were
    they saved ... for this number of classes and input channels?". It names the shape the data was read at, and
    how to give it at the weights' size; a file that cannot be read at all says nothing of inputs."""
    data = load_dataset(f"imagefolder:{_image_folder(tmp_path / 'images')}")
    assert data.in_shape == (1, 32, 32)
    weights = tmp_path / "cnn8.safetensors"
    save_weights(create_model("cnn", num_classes=2, in_shape=(1, 8, 8)), weights)
    with pytest.raises(WeightsError, match="do not fit") as misfit:
        ModelRef(arch="cnn", weights=str(weights)).classifier(data, "teacher")
    message = str(misfit.value)
    assert "The data's inputs are (1, 32, 32)" in message and "image folder is read at 32 px" in message, message
    assert ".npz at that size" in message, message
    with pytest.raises(WeightsError) as missing:
        ModelRef(arch="cnn", weights=str(tmp_path / "absent.safetensors")).classifier(data, "teacher")
    assert "inputs are" not in str(missing.value)

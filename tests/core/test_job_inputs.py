"""Unusual inputs a job's owner sends by mistake, refused in words before anything trains (or handled):
an ``.npz`` with NaN pixels, plain teacher or target weights whose ``num_classes`` is not the data set's,
a style image that is its own content image."""
from __future__ import annotations

import numpy as np
import pytest

from sdb_core.data.base import DatasetError
from sdb_core.data.npz import describe_npz


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_npz_with_nan_or_inf_pixels_is_refused_saying_where(tmp_path, bad):
    x = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    x[7, 3, 3] = bad
    np.savez(tmp_path / "set.npz", x=x, y=np.arange(20) % 2)
    with pytest.raises(DatasetError, match=r"x has 1 image\(s\) with NaN or Inf pixels \(the first at index 7\)"):
        describe_npz(tmp_path / "set.npz")
    x[7, 3, 3] = 0.5  # and in the test split
    x_test = x[:4].copy()
    x_test[2, 0, 0] = bad
    np.savez(tmp_path / "set.npz", x=x, y=np.arange(20) % 2, x_test=x_test, y_test=np.arange(4) % 2)
    with pytest.raises(DatasetError, match="x_test has 1 image"):
        describe_npz(tmp_path / "set.npz")


def test_weights_with_other_classes_than_the_data_are_refused_before_training(tmp_path):
    from sdb_core.data import load_dataset
    from sdb_core.models import create_model
    from sdb_core.tasks import ModelRef
    from sdb_core.tasks.audit import load_target
    from sdb_core.tasks.distill import DistillTask, teacher_of
    from sdb_core.weights import save_weights

    data = load_dataset("digits")
    weights = save_weights(create_model("cnn", num_classes=4, in_shape=(1, 8, 8)), tmp_path / "t.safetensors")
    ref = ModelRef(arch="cnn", weights=str(weights), num_classes=4)
    with pytest.raises(ValueError, match="the teacher answers 4 classes .* the data set has 10"):
        teacher_of(DistillTask("mlp", "digits", teacher=ref), data)
    with pytest.raises(ValueError, match="the target answers 4 classes .* the data set has 10"):
        load_target(ref, data)


def test_the_style_image_as_its_own_content_reports_no_cut_instead_of_crashing():
    from sdb_core.style.images import fit_square, load_image
    from sdb_core.style.loss_net import LossNetConfig, build_loss_net
    from sdb_core.style.losses import result_losses

    net = build_loss_net(LossNetConfig(width=0.125))
    image = fit_square(load_image("flower"), 32)
    out = result_losses(net, image, image, image)  # the old code divided by the content's style loss, 0 here
    assert out["style_loss_content"] == pytest.approx(0.0, abs=1e-6) and out["style_loss_cut"] == 0.0


def test_a_transfer_set_larger_than_the_train_split_is_refused_naming_the_param(tmp_path):
    from sdb_core.tasks import distill
    from sdb_core.tasks.distill import DistillTask

    charged = []
    with pytest.raises(ValueError, match=r"transfer asks for 100000 images; the train split of digits has \d+"):
        distill.run(DistillTask("mlp", "digits", transfer=100_000), tmp_path / "s.safetensors", charge=charged.append)
    assert charged == []  # nothing charged

"""Classifiers of inputs that are not images (1-D signals (C, L), feature vectors (D,)), from outside the zoo:
they wrap, check themselves, export and answer through ONNX Runtime like an image classifier."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sdb_core.bundle import export_bundle, load_bundle
from sdb_core.models import create_model
from sdb_core.protect import CheckConfig, SDBConfig, Thresholds, random_keys, train_box, wrap
from sdb_core.protect.key import generate_key, new_master_key
from sdb_core.train import TrainConfig, predict_logits

from ..signals import signal_splits, trained

# The keyed path has to see through a key at the inputs' own scale: on these noisy tones it needs more of the
# input (λ) and more steps than the image default (the self-check moves there by itself on a keyed miss).
SETTINGS = {"signals": SDBConfig(lam=0.5, train=replace(SDBConfig().train, epochs=35)), "features": SDBConfig()}


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def wrapped(request):
    data, teacher = trained(request.param)
    key = random_keys(1, data.in_shape, data.mean, data.std, generator=torch.Generator().manual_seed(3))[0]
    return request.param, data, teacher, train_box(teacher, data, SETTINGS[request.param], key=key)


def test_image_families_refuse_other_shapes_and_the_mlp_takes_any():
    for shape in [(2, 64), (32,)]:
        assert create_model("mlp", num_classes=4, in_shape=shape)(torch.zeros(3, *shape)).shape == (3, 4)
        with pytest.raises(ValueError, match=r"takes images.*mlp"):
            create_model("lenet", num_classes=4, in_shape=shape)
    with pytest.raises(ValueError, match="positive ints"):
        create_model("mlp", in_shape=(2, 0))


def test_keys_of_other_inputs_are_noise_at_the_inputs_scale_and_image_keys_are_noise_images():
    signals = signal_splits()
    k = random_keys(500, signals.in_shape, signals.mean, signals.std, generator=torch.Generator().manual_seed(0))
    assert abs(k.mean().item()) < 0.02 and abs(k.var().item() - 1.0) < 0.02, (k.mean(), k.var())
    assert generate_key(signals.in_shape, signals.mean, signals.std).shape == (2, 64)
    # An image key is pixel noise normalised per channel: its extremes are those of the pixels 0 and 255.
    mean, std = (0.2, 0.5), (0.3, 0.25)
    k = random_keys(200, (2, 8, 8), mean, std, generator=torch.Generator().manual_seed(0))
    for c in range(2):
        lo, hi = (0 - mean[c]) / std[c], (1 - mean[c]) / std[c]
        assert k[:, c].min().item() == pytest.approx(lo, abs=1e-5) and k[:, c].max().item() == pytest.approx(hi, abs=1e-5)
    with pytest.raises(ValueError, match="one value per channel"):
        random_keys(1, (2, 8, 8), (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))


def test_the_box_keeps_the_top1_and_the_keyed_path_the_teachers_accuracy(wrapped):
    _, data, _, result = wrapped
    r = result.report
    assert r["teacher_acc"] > 75, r
    assert r["public_acc"] >= r["teacher_acc"] - 3.0, r
    assert r["keyed_acc"] >= r["teacher_acc"] - 4.0, r
    # The public answer is a form row: the label 0, partners -gap, the rest -floor.
    z = result.box.public_logits(data.test.tensors[0][:50])
    assert set(np.unique(z.numpy()).tolist()) <= {0.0, -1.0, -8.0}


def test_the_bundle_answers_what_the_box_answers(tmp_path, wrapped):
    kind, data, _, result = wrapped
    master = new_master_key()
    path = export_bundle(result.box, tmp_path / kind, name=kind, in_shape=data.in_shape, mean=data.mean,
                         std=data.std, labels=data.labels, master_key=master)
    b = load_bundle(path, master)
    assert b.meta["input"]["shape"] == list(data.in_shape)
    # What the bundle says its inputs are, (value / scale - mean) / std, is what the box was trained on: raw values
    # standardised in their own units (scale 255 turned a tabular user's inputs into garbage).
    norm, raw = b.meta["normalize"], torch.rand(3, *data.in_shape) * 7
    mean, std = (np.array(norm[k]).reshape(-1, *[1] * (len(data.in_shape) - 1)) for k in ("mean", "std"))
    np.testing.assert_allclose((raw.numpy() / norm["scale"] - mean) / std, data.normalize(raw).numpy(), rtol=1e-5,
                               atol=1e-5)
    x = data.test.tensors[0][:40]
    assert np.array_equal(b.public_logits(x.numpy()), result.box.public_logits(x).numpy())
    assert np.abs(b.distill_logits(x.numpy()) - result.box.distill_logits(x).numpy()).max() <= 1e-4


def test_data_splits_normalise_raw_signals_like_their_inputs():
    data = signal_splits()
    raw = torch.rand(3, *data.in_shape)
    mean, std = torch.tensor(data.mean).view(-1, 1), torch.tensor(data.std).view(-1, 1)
    assert torch.allclose(data.normalize(raw), (raw - mean) / std)
    assert data.normalize(raw[0].numpy()).shape == data.in_shape
    for wrong in [torch.rand(3, 3, 64), torch.rand(3, 2, 64, 1)]:  # three channels; an input of another rank
        with pytest.raises(ValueError, match="C=2"):
            data.normalize(wrong)


def test_the_self_check_measures_a_signal_box_and_its_public_answer_teaches_less_than_labels():
    data, teacher = trained("signals")
    lax = Thresholds(max_accuracy_drop=100.0, max_keyed_drop=100.0, min_leak_margin=-100.0, min_guessed_key_share=-1e12)
    check = CheckConfig(thresholds=lax, max_attempts=1, student_seeds=1,
                        student_train=TrainConfig(epochs=15, lr=0.01, batch_size=64))
    result = wrap(teacher, data, SDBConfig(train=replace(SDBConfig().train, epochs=5)), check=check)
    f = result.report["check"]["figures"]
    assert result.report["check"]["passed"] and result.report["check"]["val_size"] == 180  # 15% of 1,200
    # The public answer carries the top-1 and nothing else: a student learns less from it than from labels (by
    # 5.0-9.5 points over 20 keys, labels 37.0: a margin of 5 failed at the low end; the key is random).
    assert f["kd_public"] < f["labels_only"] - 3.0, f


def test_the_keyed_scale_is_the_factor_that_brings_soft_labels_to_the_teachers():
    from sdb_core.protect.sdb import keyed_scale

    teacher = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)) * 2.0
    for factor in (0.5, 1.0, 2.5):  # keyed logits a factor too flat or too sharp: the scale undoes it
        assert keyed_scale(teacher / factor, teacher, 4.0) == pytest.approx(factor, rel=0.02)


def test_a_calibrated_keyed_path_teaches_soft_labels_closer_to_the_teachers(tmp_path, wrapped):
    """On the noisy tones the key hides much of the input and the keyed logits come out flatter than the
    teacher's; one factor on the keyed path's logits, fitted on training inputs, brings its soft labels at T
    closer to the teacher's on test inputs. The network is untouched (its ONNX layers keep their names) and so
    is every top-1; the bundle carries the factor and its keyed path answers with it."""
    from sdb_core.distill.losses import soft_kl

    kind, data, teacher, result = wrapped
    box, x = result.box, data.test.tensors[0]
    scale = result.report["keyed_scale"]
    assert box.keyed_scale == scale and (scale == 1.0 or abs(scale - 1.0) > 0.05), scale
    if kind == "signals":  # the tones' keyed logits are far flatter than the teacher's (1.36 when written)
        assert scale > 1.15, scale
    elif scale == 1.0:  # the features' keyed path is near the teacher's scale (1.07 when written)
        return
    as_trained = box.with_key(box.reveal_key())
    as_trained.keyed_scale = 1.0
    with torch.no_grad():
        a = predict_logits(teacher, x)
        kl = {name: soft_kl(b.distill_logits(x), a, 4.0).item() for name, b in
              (("calibrated", box), ("as trained", as_trained))}
        assert torch.equal(box.distill_logits(x).argmax(1), as_trained.distill_logits(x).argmax(1))
    assert kl["calibrated"] < kl["as trained"] - 0.01, kl
    master = new_master_key()
    b = load_bundle(export_bundle(box, tmp_path / kind, name=kind, in_shape=data.in_shape, mean=data.mean,
                                  std=data.std, labels=data.labels, master_key=master), master)
    assert b.meta["keyed_scale"] == scale
    assert np.abs(b.distill_logits(x[:40].numpy()) - box.distill_logits(x[:40]).numpy()).max() <= 1e-4

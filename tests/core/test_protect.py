"""The recipes on digits with tiny settings: the direction of each effect, with margins."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from sdb_core.bundle import PublicForm, public_form_table
from sdb_core.distill import DistillConfig, distill
from sdb_core.models import create_model
from sdb_core.protect import (
    NastyConfig,
    NoKeyError,
    SafeDistillationBox,
    SDBConfig,
    confusion_targets,
    random_keys,
    train_box,
    wrap_nasty,
)
from sdb_core.protect.measure import (
    STUDENT_WAYS,
    MeasureConfig,
    format_table,
    label_teacher,
    measure_students,
    public_teacher,
    summarize,
)
from sdb_core.protect.sdb import confusion_partners, confusion_rows, public_form
from sdb_core.train import TrainConfig, accuracy, predict_logits, seed_everything

from .conftest import OutsideNet


def _soft_kl_to(teacher, fn, x, T=4.0):
    """Mean KL(p_teacher^T ‖ p_fn^T) per sample: how far a path's soft labels moved."""
    pt = F.log_softmax(predict_logits(teacher, x) / T, 1)
    pf = F.log_softmax(predict_logits(fn, x) / T, 1)
    return F.kl_div(pf, pt, reduction="batchmean", log_target=True).item()


def _seeded_key(digits):
    # A key from a seeded generator keeps the test deterministic; the product draws it from the OS.
    return random_keys(1, digits.in_shape, digits.mean, digits.std, generator=torch.Generator().manual_seed(7))[0]


@pytest.fixture(scope="module")
def sdb_result(digits, digits_teacher):
    return train_box(digits_teacher, digits, SDBConfig(train=TrainConfig(epochs=6, lr=0.01)), key=_seeded_key(digits))


def test_sdb_keeps_accuracy_and_disturbs_only_the_public_path(digits, digits_teacher, sdb_result):
    r, box = sdb_result.report, sdb_result.box
    assert r["teacher_acc"] > 90
    assert r["public_acc"] >= r["teacher_acc"] - 4.0
    assert r["keyed_acc"] >= r["teacher_acc"] - 4.0
    x = digits.test.tensors[0]
    public_kl = _soft_kl_to(digits_teacher, box.public_logits, x)
    keyed_kl = _soft_kl_to(digits_teacher, box.distill_logits, x)
    assert public_kl > 0.2, public_kl
    assert keyed_kl < public_kl / 3, (keyed_kl, public_kl)
    # The network itself, on plain inputs, is disturbed too (what the public form is made from).
    network_kl = _soft_kl_to(digits_teacher, box.model, x)
    assert network_kl > 0.2 and keyed_kl < network_kl / 3, (keyed_kl, network_kl)


def test_the_public_answer_is_the_form_row_of_the_networks_top1(digits, sdb_result):
    box, x = sdb_result.box, digits.test.tensors[0]
    top1 = predict_logits(box.model, x).argmax(1)
    public = box.public_logits(x)
    assert torch.equal(public.argmax(1), top1)
    table = torch.from_numpy(public_form_table(box.public_form))
    assert torch.equal(public, table[top1])  # nothing of the input but its top-1
    cfg = SDBConfig()
    partners = (confusion_targets(digits.num_classes, cfg, seed=0) - cfg.partner_prob).abs() < 1e-6
    assert torch.equal(table == -cfg.public_gap, partners) and (table.diag() == 0).all()
    assert set(table.unique().tolist()) == {0.0, -cfg.public_gap, -cfg.public_floor}
    keyed = box.distill_logits(x)
    assert not torch.equal(keyed, table[keyed.argmax(1)])
    assert box.with_key(_seeded_key(digits)).public_form == box.public_form


def test_a_student_learns_less_from_the_public_answer_than_from_labels(digits, sdb_result):
    """On a 600-image transfer set, LeNet students (convolutional: the ones a class-level confusion target alone
    did not fool, 1-2 points), two seeds: labels alone against KD (T = 4, α = 0.9) from the public probabilities."""
    transfer = TensorDataset(*(t[:600] for t in digits.train.tensors))
    public = public_teacher(sdb_result.box.predict)  # KD from the probabilities, as anyone can
    gaps = []
    for seed in (0, 1):
        accs = []
        for teacher in (None, public):
            seed_everything(seed)
            student = create_model("lenet", num_classes=digits.num_classes, in_shape=digits.in_shape)
            distill(student, transfer, teacher, DistillConfig(train=TrainConfig(epochs=20, lr=0.01, seed=seed)))
            accs.append(accuracy(student, digits.test))
        gaps.append(accs[0] - accs[1])
    assert min(gaps) > 6.0, gaps


def test_the_label_student_is_taught_the_public_top1_and_nothing_else(digits, digits_teacher, sdb_result):
    """kd_label, the reference a key's gain is read against: the public top-1 through the KD loss. Its targets at T
    rank no class below the top-1 above another (a one-hot, smoothed evenly), and the benchmarks' table shows it."""
    x = digits.test.tensors[0][:64]
    logits = label_teacher(sdb_result.box.predict)(x)
    top1 = sdb_result.box.predict(x).argmax(1)
    assert torch.equal(logits.argmax(1), top1)
    soft = F.softmax(logits / 4.0, 1)
    rest = soft[F.one_hot(top1, soft.shape[1]) == 0].reshape(len(x), -1)
    assert torch.allclose(rest, rest[:, :1].expand_as(rest), atol=1e-7)  # every other class alike: no dark knowledge
    assert (soft.max(1).values > 0.9).all()
    tiny = MeasureConfig(transfer_n=200, wrong_keys=1, train=TrainConfig(epochs=1, lr=0.01, batch_size=64))
    students = measure_students(digits_teacher, sdb_result.box, digits, tiny, seed=0)
    assert set(students) == set(STUDENT_WAYS) and "kd_label" in students
    assert all(0.0 <= v <= 100.0 for v in students.values())
    run = {"seed": 0, "teacher_acc": 90.0, "public_acc": 90.0, "keyed_acc": 90.0, "agreement": 100.0,
           "students": students, "teacher_step": 1.0, "wrap_step": 1.0, "wrap_total": 1.0}
    assert "student: KD from the public top-1" in format_table(summarize("digits", [run]))


def test_sdb_public_soft_labels_follow_the_confusion_target(digits, sdb_result):
    q = confusion_targets(digits.num_classes, SDBConfig(), seed=0)
    p = F.softmax(predict_logits(sdb_result.box.public_logits, digits.test.tensors[0]) / 4.0, 1)
    y = digits.test.tensors[1]
    # The probability mass on each label's two fixed partners is far above the uniform share.
    partners = (q[y] - SDBConfig().partner_prob).abs() < 1e-4
    partner_mass = (p * partners).sum(1)
    assert partners.sum(1).eq(2).all()
    assert partner_mass.mean().item() > 0.3  # uniform share of two classes of ten: 0.2


def test_wrong_key_does_not_unlock(digits, digits_teacher, sdb_result):
    """Keys an attacker could draw (the key's own distribution) and near-misses of the real one.

    Measured on this fixture (KL to the teacher, true key 0.04): own-distribution keys 0.72-0.92;
    the key plus noise at half its spread 0.20; the key with its top two rows (of 8) replaced 0.34.
    Closer still (noise at a tenth of its spread) does unlock, as any continuous key must: the
    protection is that a 64-pixel key of 256 levels is not guessed that close.
    """
    box = sdb_result.box
    x = digits.test.tensors[0]
    true_kl = _soft_kl_to(digits_teacher, box.distill_logits, x)
    drawn = random_keys(5, digits.in_shape, digits.mean, digits.std, generator=torch.Generator().manual_seed(99))
    for k in drawn:
        assert _soft_kl_to(digits_teacher, box.with_key(k).distill_logits, x) > 5 * true_kl
    key = _seeded_key(digits)
    noisy = key + 0.5 * key.std() * torch.randn(key.shape, generator=torch.Generator().manual_seed(1))
    patched = key.clone()
    patched[:, :2, :] = drawn[0][:, :2, :]
    for near in (noisy, patched):
        assert _soft_kl_to(digits_teacher, box.with_key(near).distill_logits, x) > 2 * true_kl


def test_nasty_keeps_accuracy_and_disturbs_soft_labels(digits, digits_teacher):
    res = wrap_nasty(digits_teacher, digits, NastyConfig(omega=0.05, train=TrainConfig(epochs=6, lr=0.02,
                                                                                       grad_clip=5.0)))
    assert res.report["public_acc"] >= res.report["teacher_acc"] - 4.0
    assert _soft_kl_to(digits_teacher, res.box.public_logits, digits.test.tensors[0]) > 0.2
    assert not res.box.has_key
    with pytest.raises(NoKeyError):
        res.box.distill_logits(digits.test.tensors[0][:2])


def test_every_recipe_accepts_a_model_outside_the_zoo(digits):
    seed_everything(0)
    net = OutsideNet(in_features=64, classes=digits.num_classes)
    distill(net, digits.train, None, DistillConfig(train=TrainConfig(epochs=3, lr=0.05)))
    assert accuracy(net, digits.test) > 80
    box = train_box(net, digits, SDBConfig(train=TrainConfig(epochs=1))).box
    assert box.predict(digits.test.tensors[0][:3]).shape == (3, 10)
    assert wrap_nasty(net, digits, NastyConfig(train=TrainConfig(epochs=1))).box.predict(
        digits.test.tensors[0][:3]).shape == (3, 10)
    student = OutsideNet(64, digits.num_classes)
    distill(student, digits.train, box.distill_logits, DistillConfig(train=TrainConfig(epochs=1)))


def test_the_key_is_hidden(digits, sdb_result):
    box = sdb_result.box
    key = box.reveal_key()
    assert "tensor" not in repr(box).lower() and "hidden" in repr(box)
    for v in box.model.state_dict().values():
        assert v.shape != key.shape or not torch.equal(v, key)
    assert not any(isinstance(v, torch.Tensor) and v.shape == key.shape for v in vars(box).values())
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(box)


def test_box_validation():
    with pytest.raises(ValueError, match="needs a key"):
        SafeDistillationBox(torch.nn.Linear(2, 2), None, mode="sdb")
    with pytest.raises(ValueError, match="lam"):
        SDBConfig(lam=1.5)
    with pytest.raises(ValueError, match="argmax"):
        SDBConfig(target_prob=0.2, partner_prob=0.3)
    with pytest.raises(ValueError, match="public_gap"):
        SDBConfig(public_gap=9.0)
    good = {"partners": [[1], [0]], "gap": 1.0, "floor": 8.0}
    for bad in ({**good, "partners": [[0], [0]]}, {**good, "partners": [[1]]}, {**good, "partners": [[1, 1], [0]]},
                {**good, "gap": 9.0}, {**good, "gap": float("nan")}, {**good, "extra": 1}, [[0.0, -1.0], [-1.0, 0.0]]):
        with pytest.raises(ValueError, match="public form"):
            SafeDistillationBox(torch.nn.Linear(2, 2), torch.zeros(2), public_form=bad)


def test_confusion_targets_rows():
    q = confusion_targets(10, SDBConfig(), seed=1)
    assert torch.allclose(q.sum(1), torch.ones(10))
    assert torch.equal(q.argmax(1), torch.arange(10))
    assert (((q - 0.25).abs() < 1e-6).sum(1) == 2).all()
    assert torch.equal(q, confusion_targets(10, SDBConfig(), seed=1))
    two = confusion_targets(2, SDBConfig(), seed=0)  # fewer classes than partners: still a distribution
    assert torch.equal(two.argmax(1), torch.arange(2)) and torch.allclose(two.sum(1), torch.ones(2))
    # At most K - 2 partners: one class at least stays at the form's floor (three classes: one partner each).
    three = public_form_table(public_form(3, SDBConfig(), seed=0), 3)
    assert all(sorted(row.tolist()) == [-8.0, -1.0, 0.0] for row in three)
    assert [len(p) for p in confusion_partners(4, SDBConfig(), 0)] == [2] * 4


def test_many_classes_hold_no_class_by_class_table():
    """A head of 12,000 classes: its confusion rows and public answers are built per batch from the partners;
    the K × K tables they replace were 576 MB each (a 21k-class head: 1.9 GB, three times over)."""
    import tracemalloc

    k, cfg = 12_000, SDBConfig()
    form = public_form(k, cfg, seed=0)
    y = torch.tensor([0, 7, k - 1, 7])
    tracemalloc.start()
    answers = PublicForm(form, k).rows(y.numpy())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, f"{peak / 1e6:.0f} MB to check a public form and answer 4 inputs"
    assert answers.shape == (4, k) and answers.argmax(1).tolist() == y.tolist()
    for row, c in zip(answers, y.tolist()):  # 0 at the top-1, -gap at its two partners, -floor elsewhere
        assert sorted(np.flatnonzero(row == -cfg.public_gap).tolist()) == sorted(form["partners"][c])
        assert (row == -cfg.public_floor).sum() == k - 3
    q = confusion_rows(torch.tensor(form["partners"]), y, k, cfg)
    assert q.shape == (4, k) and torch.allclose(q.sum(1), torch.ones(4)) and q.argmax(1).tolist() == y.tolist()
    assert torch.equal(q[1], q[3]) and torch.allclose(q[1, form["partners"][7]], torch.tensor(cfg.partner_prob))


def test_confusion_rows_and_public_rows_match_the_whole_tables():
    cfg = SDBConfig()
    for k in (2, 3, 10):
        form, y = public_form(k, cfg, seed=3), torch.randint(0, k, (16,), generator=torch.Generator().manual_seed(k))
        assert torch.equal(confusion_rows(torch.tensor(form["partners"]), y, k, cfg),
                           confusion_targets(k, cfg, seed=3)[y])
        assert np.array_equal(PublicForm(form, k).rows(y.numpy()), public_form_table(form, k)[y.numpy()])
    ragged = {"partners": [[1, 2], [0], [1]], "gap": 1.0, "floor": 8.0}  # a form written by hand: fewer partners
    assert PublicForm(ragged).rows(np.array([1])).tolist() == [[-1.0, 0.0, -8.0]]


def test_teacher_logits_too_big_to_keep_are_computed_per_step(digits, digits_teacher, monkeypatch):
    """Past CACHED_LOGITS_MAX (N × K floats) train_box asks the frozen teacher each step instead of keeping
    its logits for the whole split: the same box either way."""
    from sdb_core.protect import sdb

    small = type(digits)(digits.name, TensorDataset(*(t[:300] for t in digits.train.tensors)), digits.test,
                         digits.num_classes, digits.in_shape, digits.mean, digits.std, digits.labels)
    cfg, key = SDBConfig(train=TrainConfig(epochs=1, lr=0.01)), _seeded_key(digits)
    monkeypatch.setattr(sdb, "CALIBRATION_INPUTS", 100)  # the keyed scale's sample: bounded, not the split
    kept = train_box(digits_teacher, small, cfg, key=key).box
    asked = []
    monkeypatch.setattr(sdb, "CACHED_LOGITS_MAX", 300 * digits.num_classes - 1)
    monkeypatch.setattr(sdb, "predict_logits", lambda fn, x, *a: asked.append(len(x)) or predict_logits(fn, x, *a))
    per_step = train_box(digits_teacher, small, cfg, key=key).box
    assert asked and 300 not in asked  # the training split's logits were never computed in one go
    x = digits.test.tensors[0]
    assert torch.allclose(predict_logits(kept.model, x), predict_logits(per_step.model, x), atol=1e-4)


@pytest.mark.parametrize("classes", [10, 1], ids=["a sigmoid per class", "one binary score"])
def test_a_sigmoid_teachers_logits_export_as_they_are_computed(classes):
    """Sigmoid scores are read for their logits, log(p / (1 - p)); the box exports that inversion, and ONNX
    Runtime's Sigmoid answers 0 below about -20 (and keeps too few digits past ±9) where torch's does not: the
    box's export check refused every wrap of such a teacher, at its end. Within ±9 both compute the same."""
    from sdb_core.bundle import export_onnx
    from sdb_core.protect.teacher import FromClassSigmoids, FromOneScore

    torch.manual_seed(0)
    scores = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes), torch.nn.Sigmoid()).eval()
    scores[1].weight.data.mul_(60)  # logits far past ±20
    net = FromClassSigmoids(scores) if classes > 1 else FromOneScore(scores, probability=True)
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        z = scores[1](x.flatten(1))
        assert z.min() < -20 and z.max() > 20
        logits = net(x)[:, -classes:]
    export_onnx(net, (1, 8, 8), samples=x)  # (checked against ONNX Runtime on x: no BundleError)
    torch.testing.assert_close(logits, z.clamp(-9, 9), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("outside", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_wrap_trains_under_a_callers_no_grad_or_inference_mode(digits, digits_teacher, outside):
    """A notebook's ``with torch.no_grad():`` around a wrap failed deep in training with "element 0 of tensors
    does not require grad"; under inference_mode the key and the box's copy were inference tensors."""
    from sdb_core.protect import wrap

    with outside():
        box = wrap(digits_teacher, digits, SDBConfig(train=TrainConfig(epochs=1)), check=None).box
        assert not torch.is_grad_enabled()  # the caller's mode, as it was
    x = digits.test.tensors[0][:50]
    assert accuracy(box.distill_logits, TensorDataset(x, digits.test.tensors[1][:50])) > 50


def test_a_float32_teacher_wraps_and_exports_under_a_float64_default(tmp_path, digits, digits_teacher):
    """``torch.set_default_dtype(torch.float64)`` in a notebook: the export probes (and the check's students)
    were made in float64, and the wrap was refused as "an operation the exporter cannot express"."""
    from sdb_core.bundle import export_bundle, load_bundle
    from sdb_core.protect import CheckConfig, wrap
    from sdb_core.protect.config import Thresholds
    from sdb_core.protect.key import new_master_key

    accept = Thresholds(max_accuracy_drop=100, max_keyed_drop=100, min_leak_margin=-100, min_guessed_key_share=-100)
    check = CheckConfig(thresholds=accept, max_attempts=1, transfer_n=200, student_seeds=1,
                        student_train=TrainConfig(epochs=1))
    master = new_master_key()
    torch.set_default_dtype(torch.float64)
    try:
        box = wrap(digits_teacher, digits, SDBConfig(train=TrainConfig(epochs=1)), check=check).box
        assert torch.get_default_dtype() == torch.float64  # the caller's default, as it was
        path = export_bundle(box, tmp_path / "b", name="d", in_shape=digits.in_shape, mean=digits.mean,
                             std=digits.std, labels=digits.labels, master_key=master)
        assert confusion_targets(10, SDBConfig(), seed=1).dtype == torch.float32
    finally:
        torch.set_default_dtype(torch.float32)
    x = digits.test.tensors[0][:20]
    b = load_bundle(path, master)
    assert np.abs(b.distill_logits(x.numpy()) - box.distill_logits(x).numpy()).max() <= 1e-4


def test_the_box_takes_float64_like_its_bundle_and_refuses_one_sample_in_words(digits, sdb_result):
    box, x = sdb_result.box, digits.test.tensors[0][:20]
    for path in (box.predict, box.distill_logits, box.public_logits):
        torch.testing.assert_close(path(x.double()), path(x))  # numpy's float64, cast as the bundle casts it
        with pytest.raises(ValueError, match=r"\(N, \*in_shape\) = \(N, 1, 8, 8\); got \(1, 8, 8\)"):
            path(x[0])
    assert box.predict(x[0][None]).shape == (1, 10)

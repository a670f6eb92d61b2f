"""The leak audit: every attack runs, the audit sees a plain teacher leak, the CLI writes its report."""
import json
import math

import pytest
import torch

from sdb_cli.main import main
from sdb_core.bundle import export_bundle
from sdb_core.protect import SafeDistillationBox, generate_key
from sdb_core.protect.attacks import RETRY_GRAD_CLIP, PublicAPI, apply_policy, public_api
from sdb_core.protect.audit import AuditConfig, audit, score, verdict_of
from sdb_core.protect.key import new_master_key
from sdb_core.train import TrainConfig
from sdb_core.weights import save_weights

TINY = {"transfer_n": 60, "steps": 20, "keys": 2, "smooth_taus": (2.0,), "smooth_eps": (0.0, 0.1),
        "train": TrainConfig(lr=0.01, batch_size=32)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def box(digits, digits_teacher):
    key = generate_key(digits.in_shape, digits.mean, digits.std)
    return SafeDistillationBox(digits_teacher, key, lam=0.5)


def test_policies():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(apply_policy(p, "probs"), p)
    assert torch.allclose(apply_policy(p, "top_k", 2), torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 3 / 7, 4 / 7]]))
    assert torch.equal(apply_policy(p, "label"), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    with pytest.raises(ValueError, match="policy"):
        AuditConfig(policy="logits")
    with pytest.raises(ValueError, match="transfer_n"):
        AuditConfig(transfer_n=1)


def test_public_api_adapts_every_target(digits, digits_teacher, box):
    x = digits.test.tensors[0][:5]
    for target, lam in ((digits_teacher, None), (box, 0.5)):
        api = public_api(target, "top_k", 3)
        out = api(x)
        assert isinstance(api, PublicAPI) and api.lam == lam
        assert out.shape == (5, 10) and ((out > 0).sum(1) <= 3).all()
        assert torch.allclose(out.sum(1), torch.ones(5))
    with pytest.raises(TypeError, match="cannot audit"):
        public_api(object())


def test_every_attack_runs_on_a_box(digits, box):
    seen = []
    report = audit(box, digits, AuditConfig(**TINY), progress=lambda p: seen.append(p.fraction))
    names = set(report.attacks)
    assert {"labels_ls0", "labels_ls0.1", "labels_ls0.2", "kd_T0.25_a0.9", "kd_T20_a0.5", "topk1", "topk3",
            "smooth", "skeptical", "key_mean", "key_ensemble"} <= names
    assert len([n for n in names if n.startswith("kd_")]) == 12
    assert all(math.isfinite(a["acc"]) for a in report.attacks.values())
    # The verdict follows from the figures: the reference is the best labels-only student, every
    # advantage is an attack's accuracy over it, and the worst attack decides against the threshold.
    ref = max((n for n, a in report.attacks.items() if a["label_only"]), key=lambda n: report.attacks[n]["acc"])
    assert report.reference == ref
    for a in report.attacks.values():
        if not a["label_only"]:
            assert a["advantage"] == pytest.approx(a["acc"] - report.attacks[ref]["acc"])
    assert report.max_advantage == max(report.advantages.values())
    assert report.advantages[report.worst_attack] == report.max_advantage
    assert report.verdict == ("leaks" if report.max_advantage > report.config["threshold"] else "protected")
    assert seen and seen[-1] == pytest.approx(1.0)
    assert len(report.attacks["key_mean"]["detail"][0]["per_key"]) == 2


def test_plain_teacher_leaks_on_digits(digits, digits_teacher):
    # KD at T=4 beat the best labels-only student by 3.0-4.3 points on seeds 0-4 with these
    # settings (measured); the assertion leaves a margin of 2 points for numerical drift.
    cfg = AuditConfig(transfer_n=100, steps=300, temperatures=(4.0,), alphas=(0.9,), families=("labels", "kd"),
                      seeds=(0, 1, 2))
    report = audit(digits_teacher, digits, cfg)
    assert report.verdict == "leaks" and report.worst_attack == "kd_T4_a0.9"
    assert min(report.attacks["kd_T4_a0.9"]["advantages"]) >= 1.0


def test_the_skeptical_student_stays_stable_on_wide_inputs():
    """On 3x32x32 images the skeptic's auxiliary head (on the first hidden layer) grew its logits on the labels and
    then blew up when a confident teacher's term started: unclipped, this seed ended at 10.4 % (chance; seeds 1-5:
    21, 10, 48, 21, 15 %, or a NaN loss that failed the audit), clipped 63-67 %, about the labels-only student."""
    from sdb_core.data import load_dataset, transfer_split
    from sdb_core.protect.attacks import _skeptical_accuracy

    data = load_dataset("mnist-textures")
    cfg = AuditConfig()
    x, y = transfer_split(data, cfg.transfer_n, 2).tensors
    answers = {row.numpy().tobytes(): label for row, label in zip(x, y.tolist(), strict=True)}

    def teacher(batch: torch.Tensor) -> torch.Tensor:  # certain of every transfer image's true class
        labels = torch.tensor([answers[row.numpy().tobytes()] for row in batch])
        return 18.0 * torch.nn.functional.one_hot(labels, data.num_classes).float()

    train = TrainConfig(epochs=cfg.epochs_for(len(x)), lr=cfg.train.lr, batch_size=cfg.train.batch_size)
    assert _skeptical_accuracy(cfg, data, torch.utils.data.TensorDataset(x, y), teacher, train, 2, None) > 50.0


def test_cli_audit_bundle_and_teacher(digits, digits_teacher, box, tmp_path, capsys):
    bundle = export_bundle(box, tmp_path / "b", name="digits-box", in_shape=digits.in_shape, mean=digits.mean,
                           std=digits.std, labels=digits.labels, master_key=new_master_key())
    tiny = ["--data", "digits", "--transfer", "40", "--steps", "10", "--keys", "2", "--threads", "1"]
    assert main(["audit", "--bundle", str(bundle), "--out", str(tmp_path / "a"), *tiny]) == 0
    out = capsys.readouterr().out
    assert "verdict:" in out and "key_ensemble" in out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert "key_mean" in report["attacks"]
    assert report["verdict"] == ("leaks" if report["max_advantage"] > report["config"]["threshold"] else "protected")
    assert (tmp_path / "a" / "advantages.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "a" / "table.txt").read_text().startswith("leak audit")

    weights = save_weights(digits_teacher, tmp_path / "t.safetensors")
    rc = main(["audit", "--teacher", str(weights), "--arch", "cnn", "--policy", "label",
               "--out", str(tmp_path / "t"), *tiny])
    assert rc == 0
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["policy"] == "label" and "key_mean" not in report["attacks"]
    assert main(["audit", "--teacher", str(weights), "--data", "digits"]) == 2  # no --arch


def test_under_the_label_policy_every_student_on_the_transfer_images_is_label_only():
    accs = {"labels_ls0.2": [85.0, 84.0], "kd_T10_a0.9": [86.0, 85.5], "key_mean": [80.0, 81.0]}
    families = {"labels_ls0.2": "labels", "kd_T10_a0.9": "kd", "key_mean": "keys"}
    # Under probs the tempered KD is knowledge of the model's outputs: an attack, and it leaks.
    assert verdict_of(score(accs, families, "probs"))[1:] == ("kd_T10_a0.9", pytest.approx(1.25))
    # Under label its teacher is a one-hot: it joins the reference; the keys stay attacks.
    attacks = score(accs, families, "label")
    assert attacks["kd_T10_a0.9"]["label_only"] and not attacks["key_mean"]["label_only"]
    assert verdict_of(attacks) == ("kd_T10_a0.9", "key_mean", pytest.approx(-5.25))


def test_a_diverged_student_is_trained_again_gentler_and_noted(digits, digits_teacher):
    # An attacker whose student blows up lowers the step and clips: the audit does the same once, instead of
    # failing the whole audit (a job's hours), and says so in the report. At lr 1000 every student's loss is NaN.
    lines = []
    cfg = AuditConfig(**{**TINY, "train": TrainConfig(lr=1000.0, batch_size=32)}, families=("kd",),
                      temperatures=(4.0,), alphas=(0.9,), seeds=(0,))
    # retried at lr 250 they finish, at chance: an audit of students that learned nothing has no verdict
    with pytest.raises(ValueError, match="stayed at chance"):
        audit(digits_teacher, digits, cfg, log=lines.append)
    for name in ("labels_ls0", "kd_T4_a0.9"):
        assert any(f"seed 0: a {name} student diverged (loss became nan" in line
                   and f"trained again at lr 250, gradient clipped at {RETRY_GRAD_CLIP:g}" in line for line in lines), lines


def test_a_student_that_diverges_twice_ends_the_audit_saying_both(digits, digits_teacher):
    cfg = AuditConfig(**{**TINY, "train": TrainConfig(lr=1e6, batch_size=32)}, families=("kd",), seeds=(0,))
    with pytest.raises(FloatingPointError, match=r"diverged \(loss became .*\) and again at lr 250000 "):
        audit(digits_teacher, digits, cfg)


def test_a_target_answering_nan_is_refused_as_such(digits):
    api = PublicAPI(lambda x: torch.full((len(x), 10), float("nan")), name="broken")
    with pytest.raises(ValueError, match="broken answers NaN or Inf"):
        audit(api, digits, AuditConfig(**TINY, families=("kd",), seeds=(0,)))


def test_a_bundle_meets_a_data_set_by_its_class_names_not_their_order(digits, box, tmp_path):
    # A set with the bundle's class names in another order was taught and audited as if the orders agreed: a
    # student at 0 %, a verdict against scrambled labels, and no error. It is read in the set's order now, and
    # a set of other names is refused in words.
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    from sdb_core.tasks import ModelRef
    from sdb_core.tasks.audit import load_target
    from sdb_core.tasks.distill import bundle_teacher

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    master_key = new_master_key()
    bundle = export_bundle(box, tmp_path / "b", name="named", in_shape=digits.in_shape, mean=digits.mean,
                           std=digits.std, labels=words, master_key=master_key)
    order = torch.tensor([9, 0, 8, 1, 7, 2, 6, 3, 5, 4])  # the set's class i is the bundle's order[i]
    where = torch.argsort(order)  # the bundle's class c is the set's where[c]

    def renamed(names, perm):
        split = lambda t: TensorDataset(t.tensors[0], perm[t.tensors[1]])
        return replace(digits, labels=names, train=split(digits.train), test=split(digits.test))

    shuffled = renamed([words[i] for i in order], where)
    x, y = shuffled.test.tensors
    for keyed in (False, True):
        as_is = bundle_teacher(bundle, master_key, keyed)(x)  # the bundle's order
        assert torch.allclose(bundle_teacher(bundle, master_key, keyed, shuffled)(x), as_is[:, order])
    target = load_target(ModelRef(bundle=str(bundle)), shuffled)
    top = public_api(target)(x).argmax(1)
    assert (top == y).float().mean() > 0.8  # scored against the set's own labels

    other = renamed([f"class {i}" for i in range(10)], torch.arange(10))
    for refuse in (lambda: bundle_teacher(bundle, None, False, other),
                   lambda: load_target(ModelRef(bundle=str(bundle)), other)):
        with pytest.raises(ValueError, match=r"answers the classes \['zero', 'one'.*use a data set of its own classes"):
            refuse()
    # a set that only numbers its classes tells nothing: taken as it is
    assert bundle_teacher(bundle, None, False, digits) is not None

"""Measure a box: does inference survive, and what does a student learn from each path?

One seed of the whole story: train a teacher, wrap it, then train the same student
architecture six ways on a transfer set drawn from the training split. ``sdb demo``
and ``benchmarks/protection.py`` both call :func:`run_protection`.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn
from torch.nn.functional import one_hot

from ..data import transfer_split
from ..distill import DistillConfig, distill, probs_to_logits
from ..models import create_model
from ..models.schedules import teacher_config, teacher_shift
from ..train import TrainConfig, accuracy, seed_everything, train_classifier
from .box import SafeDistillationBox
from .check import WrapRefused, teacher_data
from .config import CheckConfig, SDBConfig
from .key import random_keys
from .sdb import public_report, wrap

STUDENT_WAYS = ("labels_only", "kd_label", "kd_teacher", "kd_public", "kd_keyed", "kd_wrong_key")


@dataclass
class MeasureConfig:
    transfer_n: int = 1000
    student: str = "mlp"
    temperature: float = 4.0
    alpha: float = 0.9
    wrong_keys: int = 5
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.01, batch_size=64))


def student_accuracy(arch: str, data, transfer, teacher, dcfg: DistillConfig, seed: int, *,
                     evaluate_on=None, should_cancel: Callable[[], bool] | None = None) -> float:
    """Test accuracy (%) of a fresh ``arch`` student distilled on ``transfer`` from ``teacher``.

    The student's initialisation depends on ``seed`` only, so students compared at one seed
    differ by what they were taught and nothing else. ``teacher=None``: labels only.
    ``evaluate_on`` replaces ``data.test`` (e.g. a held-out split for model selection).
    """
    seed_everything(seed)
    student = create_model(arch, num_classes=data.num_classes, in_shape=data.in_shape)
    distill(student, transfer, teacher, replace(dcfg, train=replace(dcfg.train, seed=seed)),
            should_cancel=should_cancel)
    return accuracy(student, data.test if evaluate_on is None else evaluate_on)


def public_teacher(predict: Callable) -> Callable:
    """KD from a probability API: log-probabilities are logits up to a per-row constant."""
    return lambda x: probs_to_logits(predict(x))


def label_teacher(predict: Callable) -> Callable:
    """KD from a label API: the top-1 of ``predict`` as a one-hot, through the same loss. What any caller without a
    key can do. ``probs_to_logits`` makes the one-hot logits with a bounded margin (ln 1e8 = 18.42 between the top-1
    and the rest), so this is a bounded-margin label target through the KD loss, which lifts a student above plain
    cross-entropy on labels by more than tuning does (digits, 1,000 images: 97.3 vs 95.2; cross-entropy tuned over
    lr, Adam, epochs and label smoothing peaks at 96.75) and by how much the margin says (3: 93.0, 10: 97.0). No
    teacher knowledge beyond the top-1 is in it, so the key's gain is read against this as well (docs/audit.md counts
    it likewise)."""
    def teach(x):
        probs = predict(x)
        return probs_to_logits(one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype))
    return teach


def measure_students(teacher: nn.Module, box: SafeDistillationBox, data, cfg: MeasureConfig,
                     seed: int, log: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """Test accuracy (%) of a student trained each of the six ways, same seed for all."""
    transfer = transfer_split(data, cfg.transfer_n, seed)
    dcfg = DistillConfig(temperature=cfg.temperature, alpha=cfg.alpha,
                         train=replace(cfg.train, seed=seed))

    def student_from(teacher_fn) -> float:
        return student_accuracy(cfg.student, data, transfer, teacher_fn, dcfg, seed)

    out = {
        "labels_only": student_from(None),
        # What anyone can do with labels alone: the public top-1, taught through the KD loss.
        "kd_label": student_from(label_teacher(box.predict)),
        "kd_teacher": student_from(teacher),
        # What anyone can do: distill the public probabilities (log-probs are logits).
        "kd_public": student_from(public_teacher(box.predict)),
        "kd_keyed": student_from(box.distill_logits),
    }
    # A guessed key: noise from the key's own distribution, blended in by the attacker.
    guesses = random_keys(cfg.wrong_keys, data.in_shape, data.mean, data.std)
    out["kd_wrong_key"] = statistics.fmean(student_from(box.with_key(k).distill_logits) for k in guesses)
    log("  students: " + "  ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return out


def train_teacher(data, seed: int, *, arch: str = "cnn", cfg: TrainConfig | None = None,
                  log: Callable[[str], None] = lambda s: None, progress=None):
    """The owner's teacher of the benchmarks, trained at ``seed``: ``(teacher, history)``.

    No ``cfg``: ``arch``'s own teacher schedule (``models.schedules``), random shifts included.
    """
    shift = 0 if cfg is not None else teacher_shift(data.in_shape)
    cfg = replace(cfg or teacher_config(arch), seed=seed)
    seed_everything(seed)
    teacher = create_model(arch, num_classes=data.num_classes, in_shape=data.in_shape)
    t0 = time.perf_counter()
    history = train_classifier(teacher, data.train, cfg, shift=shift, progress=progress)
    log(f"seed {seed}: teacher {accuracy(teacher, data.test):.1f}% in {time.perf_counter() - t0:.0f}s")
    return teacher.eval(), history


def owner_teacher(data, seed: int, check: CheckConfig | None, **kwargs):
    """:func:`train_teacher` as a checked wrap's owner trains it: without the held-out part the ``check`` measures
    on (a checked wrap measures on held-out training data, which its teacher must not have seen)."""
    return train_teacher(teacher_data(data, check) if check else data, seed, **kwargs)


def train_and_wrap(data, seed: int, *, teacher_arch: str = "cnn", teacher_cfg: TrainConfig | None = None,
                   sdb_cfg: SDBConfig | None = None, check: CheckConfig | None = CheckConfig(),  # noqa: B008
                   keep_refused: bool = False, log: Callable[[str], None] = lambda s: None, progress=None,
                   via_onnx: bool = False):
    """Train the owner's teacher at ``seed`` and wrap it: ``(teacher, teacher history, WrapResult)``.
    ``via_onnx``: the wrap is given the teacher as an owner with an ``.onnx`` of it would
    (:func:`~sdb_core.onnx_torch.onnx_classifier` of its export); the returned teacher, which the students
    are measured against, is the torch network either way.

    The report's accuracies are on ``data.test`` (a checked wrap measured itself on held-out
    training data; those figures stay under ``report["check"]``), ``seconds`` is the whole wrap.
    ``keep_refused`` (benchmarks): a refused wrap returns its best attempt instead of raising.
    """
    check = check and replace(check, seed=seed, teacher_apart=True)
    teacher, th = owner_teacher(data, seed, check, arch=teacher_arch, cfg=teacher_cfg, log=log, progress=progress)
    sdb_cfg = sdb_cfg or SDBConfig()
    sdb_cfg = replace(sdb_cfg, train=replace(sdb_cfg.train, seed=seed))
    t0 = time.perf_counter()
    try:
        given = teacher
        if via_onnx:
            from ..bundle import export_onnx
            from ..onnx_torch import onnx_classifier

            given = onnx_classifier(export_onnx(teacher, data.in_shape), data.in_shape)
        result = wrap(given, data, sdb_cfg, check=check, progress=progress, log=log)
    except WrapRefused as e:
        if not keep_refused or e.best is None:
            raise
        log(f"seed {seed}: refused ({e}); measured all the same")
        result = e.best
    r = result.report
    r.update(public_report(teacher, result.box, data.test), seconds=time.perf_counter() - t0)
    log(f"seed {seed}: box public {r['public_acc']:.1f}% keyed {r['keyed_acc']:.1f}% "
        f"in {r['seconds']:.0f}s")
    return teacher, th, result


def run_protection(data, seed: int, *, teacher_arch: str = "cnn", teacher_cfg: TrainConfig | None = None,
                   sdb_cfg: SDBConfig | None = None, measure_cfg: MeasureConfig | None = None,
                   check: CheckConfig | None = CheckConfig(),  # noqa: B008 - frozen
                   keep_refused: bool = False, log: Callable[[str], None] = lambda s: None,
                   progress=None) -> dict:
    measure_cfg = measure_cfg or MeasureConfig()

    teacher, th, result = train_and_wrap(data, seed, teacher_arch=teacher_arch, teacher_cfg=teacher_cfg,
                                         sdb_cfg=sdb_cfg, check=check, keep_refused=keep_refused, log=log,
                                         progress=progress)
    r = result.report
    students = measure_students(teacher, result.box, data, measure_cfg, seed, log)
    return {"seed": seed, "teacher_acc": r["teacher_acc"], "public_acc": r["public_acc"],
            "keyed_acc": r["keyed_acc"], "agreement": r["agreement"], "students": students,
            "teacher_step": th.step_seconds, "wrap_step": r["step_seconds"], "wrap_total": r["seconds"],
            **({"check": r["check"]} if "check" in r else {}), "box": result.box, "teacher": teacher}


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def summarize(dataset: str, runs: list[dict]) -> dict:
    """The JSON of ``benchmarks/protection.py``: means (and stds) over seeds, accuracies in %."""
    mean = lambda k: statistics.fmean(r[k] for r in runs)
    return {
        "dataset": dataset,
        "seeds": [r["seed"] for r in runs],
        "teacher": {"acc": mean("teacher_acc")},
        "protected": {"public_acc": mean("public_acc"), "keyed_acc": mean("keyed_acc"),
                      "agreement": mean("agreement")},
        "students": {w: _stat([r["students"][w] for r in runs]) for w in STUDENT_WAYS},
        "seconds": {"teacher_step": mean("teacher_step"), "wrap_step": mean("wrap_step"),
                    "wrap_total": mean("wrap_total")},
    }


def targets(summary: dict) -> list[tuple[str, bool, str]]:
    """Each target of the SDB core issue: (name, met, the measured figures)."""
    t, p, s, sec = summary["teacher"]["acc"], summary["protected"], summary["students"], summary["seconds"]
    m = {k: v["mean"] for k, v in s.items()}
    ratio = sec["wrap_step"] / sec["teacher_step"]
    return [
        ("public_acc >= teacher - 1.0", p["public_acc"] >= t - 1.0, f"{p['public_acc']:.1f} vs {t:.1f}"),
        ("keyed_acc >= teacher - 1.5", p["keyed_acc"] >= t - 1.5, f"{p['keyed_acc']:.1f} vs {t:.1f}"),
        ("kd_public <= labels_only - 2.0", m["kd_public"] <= m["labels_only"] - 2.0,
         f"{m['kd_public']:.1f} vs {m['labels_only']:.1f}"),
        ("kd_wrong_key <= labels_only", m["kd_wrong_key"] <= m["labels_only"],
         f"{m['kd_wrong_key']:.1f} vs {m['labels_only']:.1f}"),
        ("kd_keyed >= kd_teacher - 0.5", m["kd_keyed"] >= m["kd_teacher"] - 0.5,
         f"{m['kd_keyed']:.1f} vs {m['kd_teacher']:.1f}"),
        ("kd_keyed >= labels_only + 0.5", m["kd_keyed"] >= m["labels_only"] + 0.5,
         f"{m['kd_keyed']:.1f} vs {m['labels_only']:.1f}"),
        ("wrap_step <= 4.0 x teacher_step", ratio <= 4.0, f"{ratio:.2f}x"),
    ]


def format_table(summary: dict) -> str:
    s = summary["students"]
    rows = [("teacher (unprotected)", f"{summary['teacher']['acc']:.1f}"),
            ("box, public path", f"{summary['protected']['public_acc']:.1f}"),
            ("box, keyed path", f"{summary['protected']['keyed_acc']:.1f}"),
            ("public top-1 = teacher top-1", f"{summary['protected']['agreement']:.1f}")]
    names = {"labels_only": "student: labels only", "kd_label": "student: KD from the public top-1",
             "kd_teacher": "student: KD from the plain teacher",
             "kd_public": "student: KD from the public outputs", "kd_keyed": "student: KD with the key",
             "kd_wrong_key": "student: KD with a guessed key"}
    rows += [(names[w], f"{s[w]['mean']:.1f} ± {s[w]['std']:.1f}") for w in STUDENT_WAYS if w in s]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  test acc %", "-" * (width + 16)]
    lines += [f"{a:{width}}  {b}" for a, b in rows]
    lines.append("")
    lines += [f"[{'ok' if ok else 'MISS'}] {name}: {fig}" for name, ok, fig in targets(summary)]
    return "\n".join(lines)

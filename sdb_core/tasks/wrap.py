"""The ``wrap`` task: a named data set and a teacher (given or trained) to a protected bundle (SDB or Nasty)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..progress import Hooks
from ..protect.config import CheckConfig, NastyConfig, SDBConfig, Thresholds
from .refs import ONNX_ARCH, ModelRef, image_size_for

MODES = ("sdb", "nasty")


@dataclass(frozen=True)
class WrapTask:
    """What to wrap and how. The recipes' defaults are their configs' (embedded, never copied)."""

    data: str
    teacher: ModelRef  # arch + weights, an ONNX model, or arch alone: a teacher is trained first on ``data``
    data_label: str | None = None  # how the bundle names the data (default ``data``; a service: the id it got)
    name: str | None = None  # default DATA-ARCH
    version: str = "1"
    mode: str = "sdb"  # sdb | nasty
    teacher_epochs: int | None = None  # a trained teacher: None is its architecture's schedule
    save_teacher: str | os.PathLike | None = None  # a trained teacher: keep its plain weights here
    sdb: SDBConfig = field(default_factory=SDBConfig)
    nasty: NastyConfig = field(default_factory=NastyConfig)
    check: CheckConfig = field(default_factory=CheckConfig)  # the wrap checks itself with this (either mode)
    seed: int = 0  # of the teacher's training, the recipe's and the check's split
    # What the public routes should return of it (``{"policy", "top_k", "decimals"}``), written to
    # meta.json as ``output_policy``: the default a deploy serves it with. The service validates it
    # (``service.schemas.OutputPolicy``) when it is deployed; None: every probability.
    output_policy: dict | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.teacher.kind not in ("weights", "untrained"):
            raise ValueError(f"wrap takes a zoo architecture (with or without weights) or an ONNX model, got "
                             f"{self.teacher.describe()}")
        if self.teacher.kind == "weights" and (self.teacher_epochs is not None or self.save_teacher is not None):
            # both were ignored in silence: the given teacher is not trained, so there are no new weights to keep
            raise ValueError("teacher epochs and saving the teacher are for a teacher the wrap trains "
                             "(--train-teacher), not a given one")
        # what a deploy can serve (service.deploy.check_served_name), said before any work
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.version) or (
                self.version.isdigit() and len(self.version) > 18):
            raise ValueError(f"version {self.version[:100]!r}: letters, digits, '.', '_' and '-', at most 100 "
                             "characters, starting with a letter or digit (a number: at most 18 digits)")
        if self.teacher_epochs is not None and self.teacher_epochs < 1:
            raise ValueError(f"teacher epochs must be >= 1, got {self.teacher_epochs}")

    @property
    def teacher_arch(self) -> str:
        """What the bundle's meta says the network is: its zoo architecture, or ``onnx``."""
        return ONNX_ARCH if self.teacher.is_onnx else self.teacher.arch

    @property
    def model_name(self) -> str:
        return self.name or f"{self.data.split(':')[0]}-{self.teacher_arch}"

    @property
    def recipe_train(self):
        """The training settings of the recipe this wrap runs."""
        return (self.sdb if self.mode == "sdb" else self.nasty).train

    @classmethod
    def from_options(cls, data: str, arch: str | None, *, teacher: str | None = None,
                     teacher_mean: tuple[float, ...] | None = None, teacher_std: tuple[float, ...] | None = None,
                     lam: float | None = None,
                     max_accuracy_drop: float | None = None, max_keyed_drop: float | None = None,
                     min_leak_margin: float | None = None, min_guessed_key_share: float | None = None,
                     check_attempts: int | None = None,
                     check_budget: float | None = None, epochs: int | None = None, lr: float | None = None,
                     batch_size: int | None = None, **task) -> WrapTask:
        """The task from the flat options the CLI's flags and the job's params share; ``None`` keeps a default."""
        given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
        sdb = SDBConfig(**given(lam=lam))
        thresholds = replace(Thresholds(), **given(max_accuracy_drop=max_accuracy_drop, max_keyed_drop=max_keyed_drop,
                                                   min_leak_margin=min_leak_margin,
                                                   min_guessed_key_share=min_guessed_key_share))
        check = replace(CheckConfig(), thresholds=thresholds, budget_seconds=check_budget,
                        **given(max_attempts=check_attempts))
        ref = ModelRef(arch=arch, weights=teacher, mean=teacher_mean, std=teacher_std)
        out = cls(data=data, teacher=ref, sdb=sdb, check=check, **task)
        return out.with_training(**given(epochs=epochs, lr=lr, batch_size=batch_size))

    def with_training(self, **train) -> WrapTask:
        """This task with the running recipe's training settings changed (``epochs``, ``lr``, ...)."""
        recipe = self.sdb if self.mode == "sdb" else self.nasty
        recipe = replace(recipe, train=replace(recipe.train, **train))
        return replace(self, **({"sdb": recipe} if self.mode == "sdb" else {"nasty": recipe}))


@dataclass
class WrapOutcome:
    bundle: Path
    name: str
    metrics: dict[str, float]
    report: dict
    teacher_history: list[dict] = field(default_factory=list)


def run(cfg: WrapTask, out: str | os.PathLike, hooks: Hooks | None = None, *, master_key: bytes) -> WrapOutcome:
    """Load the data, get the teacher (given or trained), wrap it, export the bundle to ``out`` (a directory or
    ``FILE.sdb``). The wrap checks itself (SDB and Nasty alike): :class:`~sdb_core.protect.WrapRefused` means
    nothing was written."""
    from ..bundle import bundle_target, export_bundle
    from ..data import load_dataset
    from ..models import create_model
    from ..models.schedules import teacher_config, teacher_shift
    from ..outputs import out_file
    from ..protect import wrap, wrap_nasty
    from ..protect.check import teacher_data
    from ..train import accuracy, seed_everything, train_classifier
    from ..weights import save_weights

    hooks = hooks or Hooks()
    bundle_target(out)  # before any work: a path no bundle can take is refused now, not after the training
    if cfg.save_teacher:
        out_file(cfg.save_teacher, "the teacher's weights file")
    trained = cfg.teacher.weights is None
    # The teacher and the check's students train where the recipe does (``with_training(device=...)``), unless the
    # check names a device of its own.
    device = cfg.recipe_train.device
    tcfg = teacher_config(cfg.teacher.arch, epochs=cfg.teacher_epochs, batch_size=cfg.recipe_train.batch_size,
                          seed=cfg.seed, device=device) if trained else None
    hooks.plan(**({"teacher": tcfg.epochs} if trained else {}), wrap=cfg.recipe_train.epochs)
    data = load_dataset(cfg.data, image_size=image_size_for(cfg.data, cfg.teacher))
    students = cfg.check.student_train
    check = replace(cfg.check, seed=cfg.seed, teacher_apart=trained,
                    student_train=students if students.device != "auto" else replace(students, device=device))
    seed_everything(cfg.seed)
    arch = cfg.teacher_arch
    teacher_history: list[dict] = []
    if not trained:  # a zoo architecture's weights, or an ONNX model
        teacher = cfg.teacher.network(data.num_classes, data.in_shape, (data.mean, data.std))
        scored = _require_learned(teacher, data, normalisation_given=cfg.teacher.mean is not None)
    else:  # not on the part the wrap's check holds out: there it must be unseen
        teacher = create_model(arch, num_classes=data.num_classes, in_shape=data.in_shape)
        train = teacher_data(data, check).train
        h = train_classifier(teacher, train, tcfg, shift=teacher_shift(data.in_shape), progress=hooks.phase("teacher"),
                             should_cancel=hooks.should_cancel)
        teacher_history = h.epochs
        if cfg.save_teacher:
            save_weights(teacher, cfg.save_teacher)
        scored = teacher
    # scored through its adapter (check_teacher): a binary teacher's one score per input read as logits had every
    # input in class 0
    hooks.log(f"teacher {arch} on {cfg.data_label or cfg.data}: test accuracy {accuracy(scored, data.test):.2f}%")

    seeded = cfg.with_training(seed=cfg.seed)
    # Both modes check themselves; WrapRefused propagates: the caller exits non-zero (CLI) or fails the job,
    # with its message and report.
    recipe = wrap_nasty if cfg.mode == "nasty" else wrap
    result = recipe(teacher, data, seeded.nasty if cfg.mode == "nasty" else seeded.sdb, check=check,
                    progress=hooks.phase("wrap"), should_cancel=hooks.should_cancel, log=hooks.log)
    r = result.report
    metrics = {k: r[k] for k in ("teacher_acc", "public_acc", "keyed_acc", "agreement") if k in r}
    extra = {"arch": arch, "data": cfg.data_label or cfg.data, **({"check": r["check"]} if "check" in r else {}),
             **({"output_policy": cfg.output_policy} if cfg.output_policy else {})}
    path = export_bundle(result.box, out, name=cfg.model_name, version=cfg.version, in_shape=data.in_shape,
                         mean=data.mean, std=data.std, labels=data.labels,
                         master_key=master_key if result.box.has_key else None, metrics=metrics, extra=extra,
                         samples=data.train.tensors[0][:8])  # the export checked on real inputs
    return WrapOutcome(Path(path), cfg.model_name, metrics, r, teacher_history)


LEARNED_MARGIN = 5.0  # points above chance a given teacher must score on the data's own training inputs
# Points by which a given teacher must score better with its outputs read in another class order, and above chance,
# for that order to be taken as its own: a teacher at chance gains a few points from the best mapping by luck on a
# small set, one trained on the classes in another order gains tens.
ORDER_MARGIN = 25.0
# Points by which a given teacher, its normalisation not given, must score better under another usual input
# convention than as the box gives it its inputs (and above chance) to be refused as trained on that one. Fed another
# scale, a network loses tens of points (a CNN trained on digits' pixels in [0, 1]: 54 % as given, 96 % in [0, 1]; an
# MLP on raw tabular features: 45 % vs 100 %); 15 is far past the sampling noise of the same up to 2,000 inputs (an
# accuracy's standard error there is at most 1.1 points) and past what a teacher trained on the data's own
# normalisation gains by chance under another.
SCALE_MARGIN = 15.0


def _require_learned(teacher, data, *, normalisation_given: bool = False):
    """Refuse, saying why, a given teacher that scores at chance on the data's training inputs (up to 2,000): it
    was trained on other inputs than these, and a box of it would protect nothing worth having; or, its normalisation
    not given (``normalisation_given``: the owner's --teacher-mean/--teacher-std), that scores far better under
    another usual input convention (:func:`_require_own_scale`): a box of it would serve a crippled teacher; or that
    answers these classes in another order (it scores far better with its outputs mapped to the set's classes one to
    one), a box of which would teach every student the wrong class. Returns the teacher as scored (inside
    :func:`~sdb_core.protect.teacher.check_teacher`'s adapter, if it needs one)."""
    from ..protect.teacher import check_teacher, shown
    from ..train import predict_logits

    x, y = (t[:2000] for t in data.train.tensors)
    checked = check_teacher(teacher, data)
    predicted = predict_logits(checked, x).argmax(1)
    fit, chance = 100.0 * (predicted == y).float().mean().item(), 100.0 / data.num_classes
    # Given, the owner said what the network takes, and is not second-guessed: a wrong one far off scores at chance
    # (refused below), and giving one (the data's own too) is the way past this check for a teacher it misjudges.
    if not normalisation_given:
        _require_own_scale(checked, data, x, y, fit, chance)
    mapped, outputs = _best_mapping(predicted, y, data.num_classes)
    if mapped >= fit + ORDER_MARGIN and mapped >= chance + ORDER_MARGIN:
        moved = [f"{data.labels[c]!r} (class {c}) -> output {o}" for c, o in enumerate(outputs) if c != o]
        raise ValueError(
            f"the teacher's classes seem to be in another order than the data set's ({_names(data.labels)}): it "
            f"scores {fit:.1f}% on the data's training inputs, {mapped:.1f}% with the set's classes read from its "
            f"outputs as {', '.join(moved[:4])}{', ...' if len(moved) > 4 else ''}. The box gives it the classes in "
            "the data set's order (an .npz's y, an image folder's class folders sorted by name: '10' before '2'): "
            "give the data with its classes in the teacher's order (an .npz whose y numbers them as the teacher's "
            "outputs, with its labels; class folders named to sort so, e.g. '00' to '11')")
    if fit < chance + LEARNED_MARGIN:
        raise ValueError(
            f"the teacher scores {fit:.1f}% on the data's training inputs (chance {chance:.1f}%): it was trained on "
            "other inputs than these. The box gives it each input normalised per channel by the training split's "
            f"mean and std {shown(data.mean)}, {shown(data.std)}, its classes in the data set's order "
            f"({_names(data.labels)}). A network trained on inputs normalised otherwise: give that normalisation "
            "(sdb wrap --teacher-mean/--teacher-std, a job's teacher.mean/std); trained on another class order: "
            "give the data in its order")
    return checked


def _require_own_scale(checked, data, x, y, fit: float, chance: float) -> None:
    """Refuse ``checked`` (a teacher as :func:`_require_learned` scores it: ``fit`` percent on ``x``, ``y``) if it
    scores :data:`SCALE_MARGIN` points better (and as far above chance) on the same inputs under another usual
    input convention (:func:`_input_conventions`): it was trained on those, and the box, which gives it the data's
    own normalisation, would protect a crippled teacher. The message names the convention and the flags that give
    it; the wrap never switches to it silently."""
    from ..protect.teacher import Renormalized, shown
    from ..train import device_of, predict_logits

    if fit > 100.0 - SCALE_MARGIN:  # no convention can score that much better
        return
    scores = []
    for what, mean, std in _input_conventions(data, x):
        net = Renormalized(checked, (data.mean, data.std), (mean, std), data.in_shape).to(device_of(checked))
        scores.append((100.0 * (predict_logits(net, x).argmax(1) == y).float().mean().item(), what, mean, std))
    best, what, mean, std = max(scores, key=lambda s: s[0], default=(0.0, "", (), ()))
    if best < fit + SCALE_MARGIN or best < chance + SCALE_MARGIN:
        return
    own = (f"--teacher-mean {_flag(data.mean)} --teacher-std {_flag(data.std)}" if len(data.mean) <= 8 else
           f"the training split's mean and std of each of its {len(data.mean)} channels")
    raise ValueError(
        f"the teacher scores {fit:.1f}% on the data's training inputs as the box gives them (normalised per channel "
        f"by the training split's mean and std {shown(data.mean)}, {shown(data.std)}), {best:.1f}% given {what}: it "
        f"seems to have been trained on those. Say so: sdb wrap --teacher-mean {_flag(mean)} --teacher-std "
        f"{_flag(std)} (a job's teacher.mean [{_flag(mean, ', ')}], teacher.std [{_flag(std, ', ')}]). If it does "
        f"take the data's own normalisation, give that: {own}")


def _input_conventions(data, x) -> list[tuple[str, tuple[float, ...], tuple[float, ...]]]:
    """The usual ways a network's inputs are scaled besides the data's own normalisation, for the data's kind, as
    ``(what, mean, std)`` of ``(raw - mean) / std`` on its raw values (a ModelRef's mean and std: --teacher-mean and
    --teacher-std): images whose raw values are pixels in [0, 1] (every loader's, checked on ``x``), those pixels
    as they are, in [-1, 1], in 0-255 and, with 3 channels, by ImageNet's statistics; any other inputs (features,
    signals, images built by hand on another scale), their raw units."""
    from ..style.loss_net import IMAGENET_MEAN, IMAGENET_STD

    if not _pixels_in_unit_range(data, x):
        return [("the data's raw values (not standardised)", (0.0,), (1.0,))]
    found = [("pixels in [0, 1], not normalised (a ToTensor without Normalize)", (0.0,), (1.0,)),
             ("pixels in [-1, 1], (x - 0.5) / 0.5", (0.5,), (0.5,)),
             ("pixels in 0-255", (0.0,), (1.0 / 255.0,))]
    if data.in_shape[0] == 3:
        found.append(("pixels normalised by ImageNet's mean and std", IMAGENET_MEAN, IMAGENET_STD))
    return found


def _pixels_in_unit_range(data, x) -> bool:
    """Whether ``data`` holds images (C, H, W) whose inputs ``x``, mapped back from the normalisation, are pixels in
    [0, 1] (up to float rounding)."""
    import torch

    if len(data.in_shape) != 3:
        return False
    view = (1, -1, 1, 1)
    raw = x * torch.tensor(data.std).view(view) + torch.tensor(data.mean).view(view)
    return bool(raw.min() >= -1e-3 and raw.max() <= 1.0 + 1e-3)


def _flag(values, sep: str = ",") -> str:
    """Per-channel values as a flag or a job's list takes them (8 significant digits: 1/255 and a set's measured
    statistics to well within float32's input rounding)."""
    return sep.join(f"{float(v):.8g}" for v in values)


def _best_mapping(predicted, y, num_classes: int) -> tuple[float, list[int]]:
    """The accuracy in percent of ``predicted`` outputs with each class read from one output of its own, the
    mapping that scores best, and that mapping (class -> output). Greedy on the confusion counts, largest first:
    the check needs a mapping far better than the identity, not the very best one."""
    import torch

    counts = torch.zeros(num_classes, max(num_classes, int(predicted.max()) + 1), dtype=torch.long)
    counts.index_put_((y.long(), predicted.long()), torch.ones_like(y, dtype=torch.long), accumulate=True)
    outputs, free = [-1] * num_classes, counts.clone()
    for _ in range(num_classes):
        c, o = divmod(int(free.argmax()), free.shape[1])
        outputs[c] = o
        free[c, :], free[:, o] = -1, -1
    hits = sum(int(counts[c, o]) for c, o in enumerate(outputs))
    return 100.0 * hits / max(len(y), 1), outputs


def _names(labels, first: int = 5) -> str:
    """The first class names, each quoted: a name may hold a comma ("tench, Tinca tinca")."""
    return ", ".join(repr(str(n)) for n in labels[:first]) + (", ..." if len(labels) > first else "")

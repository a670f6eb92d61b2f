"""The Safe Distillation Box recipe (AAAI 2022, arXiv 2112.03695), as hardened here.

From the owner's pre-trained network ``f_A`` (frozen) the recipe fine-tunes a copy ``f``:

    L = 2·CE(z, y) + CE(z̃, y)                                # inference kept, clean and keyed
        + c·w·T²·KL(q_y ‖ p_z^T) + w·T²·KL(q_y ‖ p_z'^T)     # plain-input and wrong-key soft labels disturbed
        + T²·KL(p_a^T ‖ p_z̃^T)                               # the keyed path keeps the teacher's knowledge

with z = f(x), z̃ = f(λx + (1−λ)k), z' = f(λx + (1−λ)k') for fresh random keys k'
(key specificity), a = f_A(x), c the clean-path term's share (``SDBConfig.clean_weight``, 1; the
self-check lowers it when the public top-1 misses: the public path answers the public form, so the
term guards only the network itself). The paper's disturbance −KL(p_z^T ‖ p_a^T) is unbounded
and diverged here (DESIGN.md, measured table); the bounded replacement pulls the
tempered public output toward a class-level confusion target ``q_y`` (true class 0.40,
two fixed confusion partners 0.25 each): the argmax stays the label, while a student
distilled from it learns near-ties between each class and its partners. The paper's f_R
feature terms (η = 0.001) are left out: a forward pass each, nothing measurable at that
weight. The public path answers the box's public form (:func:`public_form`) of the network's
top-1, not the network's logits. Why these values, and what was measured: docs/protection.md.
"""
from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..distill.losses import kl_to_target, soft_kl
from ..onnx_torch import float_activations
from ..train import Progress, fit, float32_default, pick_device, predict_logits
from .box import SafeDistillationBox
from .check import checked_wrap
from .config import CheckConfig, SDBConfig, Thresholds
from .key import blend, check_key_scale, generate_key, random_keys
from .teacher import FiniteWatch, check_teacher, copy_teacher, require_finite_logits

CALIBRATION_INPUTS = 2000  # training inputs the keyed path's scale is fitted on
CACHED_LOGITS_MAX = 2**26  # teacher logits train_box keeps for the whole training split (256 MB of float32)


@dataclass
class WrapResult:
    box: SafeDistillationBox
    report: dict


def confusion_partners(num_classes: int, cfg: SDBConfig, seed: int) -> list[list[int]]:
    """Each class's fixed confusion partners: ``cfg.partners`` other classes drawn at ``seed``, at most K − 2 of
    them so that one class at least stays at the public form's floor (with every other class a partner the form
    is a softened label, and a student learned more from it than from labels: 3 classes, 91.0 vs 89.3); one for
    a binary classifier. O(K) memory: a head of 21k classes costs no K × K table."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    k = min(cfg.partners, max(1, num_classes - 2))
    out = []
    for y in range(num_classes):
        # A draw among the K − 1 other classes: index i stands for class i below y, i + 1 from y on.
        drawn = torch.randperm(num_classes - 1, generator=g)[:k]
        out.append((drawn + (drawn >= y).long()).tolist())
    return out


def confusion_rows(partners: Tensor, y: Tensor, num_classes: int, cfg: SDBConfig) -> Tensor:
    """q_y for each label of ``y``, (len(y), K): the label ``target_prob``, its partners (``partners[y]``, a
    (K, k) long tensor of :func:`confusion_partners`) ``partner_prob`` each, the rest spread evenly; built per
    batch, so no K × K table is ever held."""
    ps = partners[y]
    rest = num_classes - 1 - ps.shape[1]
    fill = (1.0 - cfg.target_prob - ps.shape[1] * cfg.partner_prob) / rest if rest > 0 else 0.0
    q = torch.full((len(y), num_classes), fill, device=y.device, dtype=torch.float32)
    q.scatter_(1, ps, cfg.partner_prob).scatter_(1, y[:, None], cfg.target_prob)
    return q / q.sum(1, keepdim=True)  # few classes: renormalise, the order is kept


def confusion_targets(num_classes: int, cfg: SDBConfig, seed: int) -> Tensor:
    """The whole table of q_y, (K, K), row y for label y (:func:`confusion_rows` of every class)."""
    partners = torch.tensor(confusion_partners(num_classes, cfg, seed))
    return confusion_rows(partners, torch.arange(num_classes), num_classes, cfg)


def public_form(num_classes: int, cfg: SDBConfig, seed: int) -> dict:
    """The public form: what the public path answers, in logits, when the network's top-1 is y.

    The label 0, its confusion partners (those of ``q_y``) ``-cfg.public_gap``, every other class
    ``-cfg.public_floor`` (``sdb_core.bundle.PublicForm`` answers its rows). The answer keeps the
    network's top-1 exactly and carries nothing else about the input, so a student distilled from it learns
    the label with near-ties to fixed partners (docs/protection.md, "The public form").
    """
    return {"partners": confusion_partners(num_classes, cfg, seed), "gap": cfg.public_gap,
            "floor": cfg.public_floor}


def keyed_scale(keyed: Tensor, teacher: Tensor, temperature: float) -> float:
    """The factor s on the keyed path's logits that brings its soft labels at ``temperature`` closest to the
    teacher's (KL, convex in s; a grid over 1/4..4 in log steps, then one finer around the best): temperature
    scaling (Guo et al. 2017, arXiv 1706.04599) of the keyed path, toward the teacher rather than the labels."""
    def kl(s: float) -> float:
        return soft_kl(s * keyed, teacher, temperature).item()

    best = min(torch.logspace(-0.6, 0.6, 49).tolist(), key=kl)
    return min((best * f for f in torch.logspace(-0.0125, 0.0125, 11).tolist()), key=kl)


def frozen_and_trainable(teacher: nn.Module, device: torch.device, data) -> tuple[nn.Module, nn.Module]:
    """f_A (a frozen eval-mode copy) and f (a trainable copy) of a teacher checked against ``data``
    (:func:`~.teacher.check_teacher`; its network: a compiled module's original, the ``logits`` of a dict or
    ``ModelOutput``): the owner's model stays untouched. Every float parameter of f trains, whatever the owner
    froze: the keyed path's inputs are blended with the key, so the first layers have to learn too. A quantized ONNX
    teacher's f computes in float (:func:`~sdb_core.onnx_torch.float_activations`); f_A answers as it does. A
    network whose box would not export to a bundle is refused here, before any training (:func:`require_export`)."""
    net = check_teacher(teacher, data)
    frozen = copy_teacher(net).to(device).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    model = copy_teacher(net).to(device)
    float_activations(model)  # a quantized ONNX teacher's box trains and serves in float (onnx_torch)
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    if net not in _EXPORTED:  # once per checked network: a checked wrap's attempts share it
        require_export(model, data)
        _EXPORTED.add(net)
    return frozen, model


# The checked networks whose box was exported once already (:func:`require_export`), weakly: an owner's teacher
# is never kept alive by it.
_EXPORTED: weakref.WeakSet = weakref.WeakSet()


def require_export(model: nn.Module, data) -> None:
    """Export the untrained box network ``model`` to ONNX once, as its bundle will be (``export_onnx``, checked on
    a few training inputs): raise :class:`~sdb_core.bundle.BundleError` naming the exporter's refusal before any
    training, not after it (an InstanceNorm with running statistics, a ``torch.compile``'d submodule, a forward
    through numpy). Training moves weights, not what the exporter can express."""
    from ..bundle import BundleError, export_onnx

    try:
        export_onnx(model, data.in_shape, samples=data.train.tensors[0][:8])
    except BundleError as e:
        raise BundleError(f"the teacher's box could not be exported to a bundle, so it is not trained (checked "
                          f"before any training): {e}") from None


# Devices where the recipe's three batches (plain, keyed, random keys) go through the network as one. On the CPU,
# three calls: as fast with two threads and ~20% faster with one (smaller working set). On a GPU a small network's
# step is bound by kernel launches, and one call launches a third of them. The network trains in eval mode, where
# each sample's answer is its own (no batch statistics, no dropout): the same logits either way.
ONE_CALL_DEVICES = ("cuda",)


def three_paths(model: nn.Module, *batches: Tensor) -> tuple[Tensor, ...]:
    """``model``'s logits for each of ``batches`` (equal sizes), in one call where the device is in
    :data:`ONE_CALL_DEVICES`, else one call each."""
    if batches[0].device.type in ONE_CALL_DEVICES:
        return model(torch.cat(batches)).split(len(batches[0]))
    return tuple(model(b) for b in batches)


def require_finite_network(model: nn.Module, x: Tensor, *outputs: Tensor) -> None:
    """Raise ``FloatingPointError`` unless a trained network's parameters and buffers are finite, and so are its
    logits on ``x`` (training inputs, the first ``CALIBRATION_INPUTS`` of them) and ``outputs`` (other logits of
    it). ``fit`` checks each step's loss, before its update: the last update may still leave NaN or Inf weights
    (or weights that overflow on some inputs), and a box of them would export NaN and answer garbage."""
    bad = [n for n, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(f"the network's {bad[0]} became NaN or Inf in training"
                                 + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    for z in (predict_logits(model, x[:CALIBRATION_INPUTS]), *outputs):
        if not bool(torch.isfinite(z).all()):
            raise FloatingPointError("the trained network answers NaN or Inf logits on training inputs")


GUESSED_KEYS = 3  # random keys the check's guessed-key figure averages over
# The guessed-key share is measured where the key's soft labels are nearer the teacher's than the confusion
# target's by at least this share of the target's distance: the share's scale is that gap, and a gap of nothing
# read shares of 39,029 and 16 million.
KEY_NEARER_MIN = 0.05


# Soft labels whose mean entropy is over this share of the most there can be (log C) are near uniform.
FLAT_SOFT_LABELS = 0.9


def reading_temperature(logits: Tensor, temperature: float) -> float:
    """``temperature``, or for a teacher whose soft labels at it are near uniform (:data:`FLAT_SOFT_LABELS`: its
    logits a few units apart, as a calibration head that divides them or an InstanceNorm network leaves them), the
    lower temperature at which they are not. Every answer is near uniform at T for such a teacher: the box's keyed
    path is scaled to its softness, and a guessed key answering at chance was as close to the teacher as the key,
    while the confusion target (zero on most classes) was far: shares of 0.01-0.06 read as "any noise opens the
    keyed path" where guessed keys answered at chance and taught a third of what labels do. A trained network's
    soft labels at T = 4 (top logit ~2 above the rest, or more) are not flat: its figure is read at T itself."""
    c = logits.shape[1]

    def flatness(t: float) -> float:
        log_p = F.log_softmax(logits / t, dim=1)
        return -(log_p.exp() * log_p).sum(1).mean().item() / math.log(c)

    if c < 2 or flatness(temperature) <= FLAT_SOFT_LABELS:
        return temperature
    lo, hi = math.log(temperature) - math.log(1000.0), math.log(temperature)  # in log T: flatness rises with T
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flatness(math.exp(mid)) <= FLAT_SOFT_LABELS else (lo, mid)
    return math.exp(lo)


def guessed_key_share(box: SafeDistillationBox, teacher: nn.Module | Tensor, data, cfg: SDBConfig,
                      keys: int = GUESSED_KEYS, seed: int = 0) -> float | None:
    """How little a guessed key teaches: the soft labels (at T) of the box's network under random keys of the
    key's own distribution, placed between the key's (0) and the confusion target q_y the recipe trains a wrong
    key toward (1), by their mean KL from the teacher's on ``data.test`` (held-out inputs); at T, or at the lower
    temperature where a teacher with small logits has soft labels that are not near uniform
    (:func:`reading_temperature`). Near 0, any noise opens
    the keyed path (inputs that hide the key, a key blended too faintly): what a holder of the bundle's network
    gets without the sealed key. Inference only: no student is trained. ``teacher``: the frozen teacher, or its
    logits on ``data.test`` already (the check's attempts share them).

    The share is read in [-1, 10] (``Thresholds.GUESSED_KEY_SHARE_FLOOR`` and ``_CAP``), and is None (unmeasured)
    where the key is not nearer the teacher than q_y by :data:`KEY_NEARER_MIN` of q_y's distance: the scale then
    has no length (a box of an epoch or two, a teacher with tiny logits), and any figure would be noise over it."""
    x, y = data.test.tensors
    teacher_logits = teacher if isinstance(teacher, Tensor) else predict_logits(teacher, x)
    t = reading_temperature(teacher_logits, cfg.temperature)

    def kl(logits: Tensor) -> float:
        return soft_kl(logits, teacher_logits, t).item()

    guesses = random_keys(keys, data.in_shape, data.mean, data.std, generator=torch.Generator().manual_seed(seed))
    d_key = kl(predict_logits(box.distill_logits, x))
    d_wrong = sum(kl(predict_logits(box.with_key(g).distill_logits, x)) for g in guesses) / keys
    partners = torch.tensor(box.public_form["partners"])
    q = confusion_rows(partners, y, teacher_logits.shape[1], cfg)
    log_p = F.log_softmax(teacher_logits / t, dim=1)
    d_q = (log_p.exp() * (log_p - q.clamp_min(1e-12).log())).sum(1).mean().item() * t * t
    # A keyed path no nearer the teacher than the confusion target leaves the scale without length: the share was
    # then -1e6 or less, or 16 million, which no owner's bound means. Unmeasured there; else read within the range:
    # below -1 guessed keys are nearer the teacher than the key, above 10 they are 10 gaps further than it.
    if d_q - d_key <= KEY_NEARER_MIN * d_q:
        return None
    share = (d_wrong - d_key) / (d_q - d_key)
    return min(Thresholds.GUESSED_KEY_SHARE_CAP, max(Thresholds.GUESSED_KEY_SHARE_FLOOR, share))


def public_report(teacher: nn.Module, box: SafeDistillationBox, test, keyed: bool = True) -> dict:
    """Accuracies of the teacher and both paths of the box, public/teacher top-1 agreement, and the standard
    error of each path's drop against the teacher (points; paired: the same inputs for both). Each accuracy
    also class-balanced (``*_balanced_acc``: the mean recall over the classes present in ``test``), with its
    drop's standard error: on a set of one rare class the overall top-1 hardly moves when a path never
    predicts it (7 vs rest, 98/2: keyed 90.0 against the teacher's 98.8, its recall of the sevens 0)."""
    x, y = test.tensors[0], test.tensors[1]
    t_top = predict_logits(teacher, x).argmax(1)
    p_top = predict_logits(box.public_logits, x).argmax(1)
    t_hit = t_top == y
    out = {"teacher_acc": _percent(t_hit), "public_acc": _percent(p_top == y), "agreement": _percent(t_top == p_top),
           "public_drop_se": _paired_se(t_hit, p_top == y),
           "teacher_balanced_acc": _balanced_percent(t_hit, y), "public_balanced_acc": _balanced_percent(p_top == y, y),
           "public_balanced_drop_se": _balanced_paired_se(t_hit, p_top == y, y)}
    if keyed and box.has_key:
        k_hit = predict_logits(box.distill_logits, x).argmax(1) == y
        out.update(keyed_acc=_percent(k_hit), keyed_drop_se=_paired_se(t_hit, k_hit),
                   keyed_balanced_acc=_balanced_percent(k_hit, y),
                   keyed_balanced_drop_se=_balanced_paired_se(t_hit, k_hit, y))
    return out


def _percent(hits: Tensor) -> float:
    return 100.0 * hits.float().mean().item()


def _paired_se(a: Tensor, b: Tensor) -> float:
    """Standard error, in points, of mean(a) − mean(b) for 0/1 outcomes on the same inputs: how far a drop
    measured on these inputs may be from the drop on unseen ones (600 inputs: ~0.4-0.8 points)."""
    d = a.float() - b.float()
    return 100.0 * (d.std() / len(d) ** 0.5).item() if len(d) > 1 else 0.0


def _balanced_percent(hits: Tensor, y: Tensor) -> float:
    """Balanced accuracy, in points: the mean over the classes present in ``y`` of the share of their inputs hit.
    On classes of equal size it is the accuracy."""
    n, hit = _per_class(hits.double(), y)
    return 100.0 * (hit / n).mean().item()


def _balanced_paired_se(a: Tensor, b: Tensor, y: Tensor) -> float:
    """Standard error, in points, of the balanced accuracy of ``a`` minus that of ``b`` (0/1 outcomes on the same
    inputs), estimated as :func:`_paired_se` does on each class's inputs (0 for a class of one): the classes weigh
    1/C each, so a rare class's few inputs weigh as much as a common class's many, and its error dominates."""
    d = a.double() - b.double()
    n, total = _per_class(d, y)
    _, squares = _per_class(d * d, y)
    var = ((squares - total * total / n) / (n - 1).clamp_min(1)).clamp_min(0)  # each class's sample variance
    return 100.0 * ((var / n).sum().sqrt() / len(n)).item()


def _per_class(values: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """For each class present in ``y``: its number of inputs and the sum of ``values`` over them."""
    n = torch.bincount(y).double()
    total = torch.bincount(y, weights=values, minlength=len(n))
    present = n > 0
    return n[present], total[present]


@torch.inference_mode(False)  # the recipe trains: under a caller's no_grad or inference_mode too
@torch.enable_grad()
@float32_default()  # the check's students are float32 networks, under a caller's float64 default too
def wrap(
    teacher: nn.Module,
    data,
    cfg: SDBConfig | None = None,
    *,
    check: CheckConfig | None = CheckConfig(),  # noqa: B008 - frozen, shared safely
    key: Tensor | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> WrapResult:
    """Wrap ``teacher`` (any classifier of ``data.in_shape`` → ``data.num_classes`` logits).

    By default the wrap checks itself (:mod:`.check`): it holds out part of ``data.train``,
    adapts the setting until the box meets ``check.thresholds`` there and raises
    :class:`~.check.WrapRefused` when no setting does. The report's ``check`` holds the
    measured figures. ``check=None`` runs the recipe once on all of ``data.train``, unchecked.
    """
    cfg = cfg or SDBConfig()
    if check is None:
        return train_box(teacher, data, cfg, key=key, progress=progress, should_cancel=should_cancel)
    return checked_wrap(teacher, data, cfg, check, key=key, progress=progress, should_cancel=should_cancel,
                        log=log)


@torch.inference_mode(False)
@torch.enable_grad()
def train_box(
    teacher: nn.Module,
    data,
    cfg: SDBConfig | None = None,
    *,
    key: Tensor | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> WrapResult:
    """The recipe once: fine-tune a box from ``teacher`` on ``data.train``, report on ``data.test``. The box's
    network lives on ``cfg.train.device`` (the owner's ``teacher`` is copied, never moved)."""
    cfg = cfg or SDBConfig()
    data = data.checked()
    device = pick_device(cfg.train.device)
    check_key_scale(data.train.tensors[0], data.in_shape, data.mean, data.std)
    key = generate_key(data.in_shape, data.mean, data.std) if key is None else key.float()
    if tuple(key.shape) != tuple(data.in_shape):
        raise ValueError(f"key shape {tuple(key.shape)} does not match the input shape {tuple(data.in_shape)}")
    frozen, model = frozen_and_trainable(teacher, device, data)
    form = public_form(data.num_classes, cfg, cfg.train.seed)
    partners = torch.tensor(form["partners"], device=device)
    k = key.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)  # random keys drawn where they are used
    T, w = cfg.temperature, cfg.weight

    # The frozen teacher sees each clean image the same way every epoch (no augmentation),
    # so its logits are computed once: a step then costs the three passes the loss needs. Unless
    # they would not fit in memory (ImageNet's 1.28M images x 1,000 classes: 5 GB): then per step.
    x_train, y_train = data.train.tensors[0], data.train.tensors[1]
    cached = len(x_train) * data.num_classes <= CACHED_LOGITS_MAX
    teacher_logits = predict_logits(frozen, x_train) if cached else torch.empty(len(x_train), 0)
    if cached:
        require_finite_logits(teacher_logits)

    watch = FiniteWatch()

    def step(batch):
        x, y, a = batch
        if not cached:
            with torch.no_grad():
                a = frozen(x)
            watch.add(a)
        wrong = random_keys(len(x), data.in_shape, data.mean, data.std, generator=gen)
        z, zk, zw = three_paths(model, x, blend(x, k, cfg.lam), blend(x, wrong, cfg.lam))
        qy = confusion_rows(partners, y, data.num_classes, cfg)
        ce = 2.0 * F.cross_entropy(z, y) + F.cross_entropy(zk, y)
        disturb = cfg.clean_weight * kl_to_target(qy, z, T) + kl_to_target(qy, zw, T)
        preserve = soft_kl(zk, a, T)
        return ce + w * disturb + preserve, {"ce": ce.detach(), "disturb": disturb.detach(),
                                             "preserve": preserve.detach()}

    t0 = time.perf_counter()
    # Eval mode throughout: BatchNorm keeps the teacher's running statistics (keyed and random-key
    # batches would otherwise rewrite the ones the clean path serves with) and dropout stays off.
    try:
        history = fit(model, TensorDataset(x_train, y_train, teacher_logits), step, cfg.train, progress=progress,
                      should_cancel=should_cancel, train_mode=False)
        watch.check()
        model, scale = model.eval(), 1.0
        sample = x_train[:CALIBRATION_INPUTS].to(device)
        keyed_sample = predict_logits(model, blend(sample, k, cfg.lam))
        require_finite_network(model, sample, keyed_sample)
    except FloatingPointError as e:
        watch.check()  # a NaN the teacher's logits made is not a divergence: no gentler step would help
        raise FloatingPointError(f"the wrap diverged ({e}) at lr {cfg.train.lr:g}, grad_clip {cfg.train.grad_clip}: "
                                 "lower the learning rate or clip gradients (SDBConfig's default training clips "
                                 "at 5; the self-checking wrap retries gentler by itself)") from None
    if cfg.calibrate_keyed:
        teacher_sample = teacher_logits[:CALIBRATION_INPUTS] if cached else predict_logits(frozen, sample)
        fitted = keyed_scale(keyed_sample, teacher_sample.to(device), T)
        scale = round(fitted, 4) if abs(fitted - 1.0) > 0.05 else 1.0  # within 5 %: soft labels hardly move
    box = SafeDistillationBox(model, key.cpu(), cfg.lam, cfg.temperature, mode="sdb",
                              public_form=form, keyed_scale=scale)
    report = public_report(frozen, box, data.test)
    report.update(mode="sdb", lam=cfg.lam, temperature=T, keyed_scale=scale, seconds=time.perf_counter() - t0,
                  step_seconds=history.step_seconds, history=history.epochs)
    return WrapResult(box, report)

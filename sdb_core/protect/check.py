"""The self-checking wrap: measure a box on held-out data before it ships, adapt, or refuse.

An owner's training split is divided once (stratified, fixed seed) into the data the recipe
fits and a validation split it never sees; the test split is never read. Each attempt wraps
the teacher with one setting and measures on the validation split what the protection
benchmark measures: the public path's accuracy drop against the teacher, the keyed path's
drop (SDB; a Nasty box has no keyed path), each overall and class-balanced (a rare class weighs as much as a
common one), and a short leak check (a student distilled from
the public outputs against one trained on labels alone). A miss moves the next attempt's
setting in the direction that fixes it (each recipe's :class:`Recipe` says how); the first
setting that meets every threshold is exported with its measured report, and when the
attempts or the time budget run out, :class:`WrapRefused` carries what was tried and the
best figures. No silent bad box, in either mode.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..data import DatasetError, stratified_split
from ..data.base import transfer_indices
from ..distill import DistillConfig
from ..progress import Progress
from ..train_config import gentler as gentler_training
from .config import CheckConfig, NastyConfig, SDBConfig

if TYPE_CHECKING:
    from torch import nn

    from .sdb import WrapResult


class WrapRefused(RuntimeError):
    """No attempt met the thresholds; ``report`` holds every attempt and the best figures.

    ``best`` is the closest attempt's result, for a benchmark that reports what a refused
    wrap would have shipped; nothing that exports may use it.
    """

    def __init__(self, message: str, report: dict, best: WrapResult | None = None) -> None:
        super().__init__(message)
        self.report, self.best = report, best


def holdout(data, fraction: float, seed: int):
    """``(fit, val)``: ``data`` with a stratified validation split taken out of its train split.

    ``fit`` is ``data`` with train = the rest and test = the validation split, so a recipe
    that reports on ``data.test`` reports on held-out training data, never on the test split.
    The split is ``fraction`` of the inputs, or one per class that has inputs when that is more (the classes
    present: a 1000-output teacher wrapped on data of 10 of them held out 1000 of 1437 inputs), never more than
    half: the fitted part keeps most of the data. A class gives one from its second input on; a set where no class
    has two is refused here, in words (it failed later as an empty test split).
    """
    x, y = data.train.tensors
    counts = np.unique(y.numpy(), return_counts=True)[1]
    if not (counts >= 2).any():
        raise DatasetError(
            f"too few training inputs per class for the self-check's held-out part: {len(y)} training input(s) in "
            f"{len(counts)} class(es), none with two or more, and a class gives one to the held-out part from its "
            "second on: add inputs, two or more per class (a few more for figures worth reading), or give the test "
            "split apart (x_test and y_test, a test/ folder) so that none of them goes to it")
    n_val = min(max(len(counts), round(fraction * len(y))), len(y) // 2)
    train_idx, val_idx = stratified_split(y.numpy(), n_val, seed)
    fit_train = type(data.train)(x[train_idx], y[train_idx])
    val = type(data.train)(x[val_idx], y[val_idx])
    return replace(data, train=fit_train, test=val), val


def unvalidated_classes(fit, shown: int = 20) -> dict | None:
    """The classes with no input in ``fit``'s validation split (its ``test``, :func:`holdout`): ``{"count", "first"}``
    (the first ``shown``), or None when every class has one. A class with a single training input keeps it for
    the fit, so a set with rare classes is checked on the others only, and its report says which."""
    return absent_classes(fit.test.tensors[1], fit.num_classes, shown)


def absent_classes(labels: torch.Tensor, num_classes: int, shown: int = 20) -> dict | None:
    """The classes of ``num_classes`` with no input in ``labels``: ``{"count", "first"}`` (the first ``shown``), or
    None when every class has one."""
    present = torch.zeros(num_classes, dtype=torch.bool)
    present[labels] = True
    missing = (~present).nonzero().flatten()
    return {"count": len(missing), "first": missing[:shown].tolist()} if len(missing) else None


def teacher_data(data, check: CheckConfig):
    """``data`` less the check's validation split: what a teacher trained for a checked wrap may see.

    A teacher trained on all of ``data.train`` has memorised the validation split, so its accuracy
    there is its training accuracy and every drop measured against it is overstated (the zoo cnn on
    mnist-5k: 98.5 on the held-out part vs 97.1 on test). ``holdout`` is deterministic, so the wrap's
    check later holds out exactly the split this leaves out.
    """
    fit, _ = holdout(data, check.val_fraction, check.seed)
    return replace(fit, test=data.test)


def leak_check(box, data, cfg: CheckConfig, should_cancel=None, labels_only: float | None = None) -> dict[str, float]:
    """Accuracy of a student on labels alone and one distilled from the public outputs, on unseen images,
    and their margin (the leak threshold's figure).

    The labels-only student does not depend on the box: pass an earlier attempt's ``labels_only``. A two-class
    box with a public form has no margin: its form is the label itself, softened, and no answer that carries
    the top-1 can teach less than labels do; both accuracies are reported all the same.
    """
    from .measure import public_teacher, student_accuracy

    x, y = data.train.tensors
    idx = transfer_indices(data, min(cfg.transfer_n, len(y)), cfg.seed)
    transfer = TensorDataset(x[idx], y[idx])
    # The students are scored on every image they never saw: the held-out split and the training images
    # outside their transfer set (the box was fitted on those, but a student's accuracy on an image does
    # not depend on the box's output there). On mnist-5k that is 3,000 images instead of 600.
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[idx] = False
    vx, vy = data.test.tensors
    unseen = TensorDataset(torch.cat([vx, x[rest]]), torch.cat([vy, y[rest]]))
    dcfg = DistillConfig(temperature=cfg.temperature, alpha=cfg.alpha, train=cfg.student_train)
    seeds = [cfg.seed + 1000 * i for i in range(cfg.student_seeds)]
    run = lambda teacher: statistics.fmean(
        student_accuracy(cfg.student, data, transfer, teacher, dcfg, s, evaluate_on=unseen,
                         should_cancel=should_cancel) for s in seeds)
    labels_only = run(None) if labels_only is None else labels_only
    kd_public = run(public_teacher(box.predict))
    out = {"labels_only": labels_only, "kd_public": kd_public}
    if box.public_form is None or data.num_classes > 2:
        out["leak_margin"] = labels_only - kd_public
    return out


P_MIN = 0.05  # below this the partners are hardly above the other classes: no confusion left to teach
CLEAN_MIN = 0.25  # the clean-path share below which the next public miss drops the term altogether


def _fit_part(train, n: int = 2000) -> TensorDataset:
    """Up to ``n`` of the images the box is fitted on (fixed draw), to tell underfitting from a narrow margin."""
    x, y = train.tensors
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    return TensorDataset(x[idx], y[idx])


def adapt(sdb: SDBConfig, misses: dict[str, float], step: float,
          underfit: bool = False, narrow: bool = False) -> tuple[SDBConfig, int]:
    """The next setting to try, moved away from what the last one missed, and the move's direction.

    The public path's accuracy and the public outputs' uselessness pull the confusion target's
    partner share ``p`` in opposite directions (measured: docs/protection.md): a lower ``p`` widens
    the margin between the label and its partners (the public top-1 holds on more inputs), a higher
    one teaches a distilling student more false near-ties. A public miss lowers ``p`` by ``step``, a
    leak raises it; both at once, or a keyed-path miss, train longer, and a keyed miss also lets
    more of the image through the key (λ up); a guessed key that teaches too much blends less of it (λ down), and
    with a keyed miss at once trains longer. Direction: -1 (p down), +1 (p up), 0.
    ``underfit`` (the public path missed even on the images the box was fitted on) is not the
    margin's fault: a public miss then trains longer at twice the step size (at most 0.05) instead,
    and lowers ``p`` too only when ``narrow``: the held-out inputs lost more than the fitted ones, by more
    than the threshold (a BatchNorm CNN with Dropout2d on digits: 9.0 points held out, 6.7 fitted, then
    9.5 and 0.3 as it trained longer; the margin moved it, to 1.4).
    Every public miss also halves the clean-path term's share ``clean_weight`` (0 after 0.25).
    """
    p, lam, epochs, lr, direction = sdb.partner_prob, sdb.lam, sdb.train.epochs, sdb.train.lr, 0
    public, leak, keyed, guessed = "public" in misses, "leak" in misses, "keyed" in misses, "guessed" in misses
    # The clean-path term costs public top-1 and guards only the network itself (the public path answers the
    # public form): every public miss halves it, to 0 after 0.25.
    clean = (sdb.clean_weight / 2 if sdb.clean_weight > CLEAN_MIN else 0.0) if public else sdb.clean_weight
    p_max = min(sdb.target_prob - 0.05, (1.0 - sdb.target_prob) / sdb.partners - 1e-3)
    if public and underfit:
        epochs, lr = math.ceil(epochs * 1.5), max(lr, min(0.05, 2 * lr))
        if narrow and not leak and p > P_MIN + 1e-9:
            p, direction = max(P_MIN, p - step), -1
    elif public and not leak and p > P_MIN + 1e-9:
        p, direction = max(P_MIN, p - step), -1
    elif leak and not public and p < p_max - 1e-9:
        p, direction = min(p_max, p + step), +1
    else:
        epochs = math.ceil(epochs * 1.5)
    if keyed and not guessed:
        lam = min(0.6, lam + 0.1)
        epochs = math.ceil(epochs * 1.5) if direction else epochs
    elif guessed and not keyed:
        lam = max(0.1, lam - 0.1)
    elif guessed:
        epochs = math.ceil(epochs * 1.5)
    return replace(sdb, partner_prob=round(p, 4), lam=round(lam, 3), clean_weight=clean,
                   train=replace(sdb.train, epochs=epochs, lr=lr)), direction


def gentler(cfg):
    """The setting after a diverged attempt: half the learning rate, and gradients clipped at the recipe's
    default clip (its config's default training), unless the owner's clip is tighter."""
    return replace(cfg, train=gentler_training(cfg.train, type(cfg)().train.grad_clip))


def settings_of(sdb: SDBConfig) -> dict:
    return {"lam": sdb.lam, "partner_prob": sdb.partner_prob, "target_prob": sdb.target_prob, "weight": sdb.weight,
            "clean_weight": sdb.clean_weight, "temperature": sdb.temperature, "epochs": sdb.train.epochs, "lr": sdb.train.lr,
            "batch_size": sdb.train.batch_size, "grad_clip": sdb.train.grad_clip}


# ω's range, from the paper's released settings (VITA-Group/Nasty-Teacher, experiments/*/kd_nasty_*/params.json;
# arXiv 2105.07381 §4): ω 0.04 at τ 4 (CIFAR-10), 0.005 at τ 20 (CIFAR-100), 0.01 at τ 20 (Tiny-ImageNet), τ
# after Yuan et al. 2020 (4 for 10 classes, 20 for 100 and 200). The weight on the plain KL is ω·τ², 0.64 to 4
# there; the check stays inside what the paper trained with: ω·τ² <= 4 (ω <= 0.25 at τ 4) and ω >= 0.005.
NASTY_OMEGA_T2_MAX = 4.0
NASTY_OMEGA_MIN = 0.005


def adapt_nasty(nasty: NastyConfig, misses: dict[str, float], step: float,
                underfit: bool = False, narrow: bool = False) -> tuple[NastyConfig, int]:
    """Nasty's next setting and the move's direction: a leak raises the disturbance weight ω, a public miss lowers it.

    ω trades the public top-1 (the CE term) against how far the tempered outputs are pushed from the teacher's
    (the disturbance). ``step`` is the move in doublings: 1 multiplies ω by 2 (up to ``NASTY_OMEGA_T2_MAX / τ²``)
    or divides it by 2 (down to ``NASTY_OMEGA_MIN``); the check halves it when the direction reverses. A public
    miss on the images the box was fitted on (``underfit``) also trains 1.5× longer; both misses at once, or ω
    at its bound, train 1.5× longer instead. τ stays the owner's. Direction: -1 (ω down), +1 (ω up), 0.
    ``narrow`` (:func:`adapt`'s) changes nothing here: every public miss already lowers ω.
    """
    omega, epochs, direction = nasty.omega, nasty.train.epochs, 0
    public, leak = "public" in misses, "leak" in misses
    hi, factor = NASTY_OMEGA_T2_MAX / nasty.temperature ** 2, 2.0 ** step
    if public and not leak and omega > NASTY_OMEGA_MIN + 1e-9:
        omega, direction = max(NASTY_OMEGA_MIN, omega / factor), -1
        epochs = math.ceil(epochs * 1.5) if underfit else epochs
    elif leak and not public and omega < hi - 1e-9:
        omega, direction = min(hi, omega * factor), +1
    else:
        epochs = math.ceil(epochs * 1.5)
    return replace(nasty, omega=round(omega, 5), train=replace(nasty.train, epochs=epochs)), direction


def nasty_settings_of(nasty: NastyConfig) -> dict:
    return {"omega": nasty.omega, "temperature": nasty.temperature, "max_kl": nasty.max_kl,
            "epochs": nasty.train.epochs, "lr": nasty.train.lr, "batch_size": nasty.train.batch_size,
            "grad_clip": nasty.train.grad_clip}


@dataclass(frozen=True)
class Recipe:
    """What the check needs of a recipe: fit it once, name its setting, move the setting after a miss."""

    mode: str  # the box's mode: "sdb" | "nasty"
    fit: Callable[..., WrapResult]  # (teacher, data, cfg, key, progress=, should_cancel=): fit on data.train
    settings: Callable[[Any], dict]  # the setting an attempt reports; has "epochs"
    adapt: Callable[[Any, dict[str, float], float, bool, bool], tuple[Any, int]]  # (cfg, misses, step, underfit, narrow)
    first_step: float  # the first move's size; halved whenever the direction reverses


def recipe_for(cfg: SDBConfig | NastyConfig) -> Recipe:
    """The check's view of the recipe ``cfg`` configures."""
    if isinstance(cfg, SDBConfig):
        from .sdb import train_box

        return Recipe("sdb", lambda t, d, c, key, **kw: train_box(t, d, c, key=key, **kw), settings_of, adapt, 0.05)
    if isinstance(cfg, NastyConfig):
        from .nasty import wrap_nasty

        def fit(t, d, c, key, **kw):
            if key is not None:
                raise ValueError("a Nasty box has no key: pass key=None")
            return wrap_nasty(t, d, c, **kw)

        return Recipe("nasty", fit, nasty_settings_of, adapt_nasty, 1.0)
    raise TypeError(f"no self-check for a {type(cfg).__name__}: expected SDBConfig or NastyConfig")


def _attempt_progress(progress, attempt: int, attempts: int):
    """Attempt ``attempt``'s progress as a share of all attempts, so a watcher's fraction never goes back."""
    if progress is None:
        return None
    return lambda p: progress(replace(p, fraction=(attempt + p.fraction) / attempts,
                                      metrics={"attempt": attempt + 1, **p.metrics}))


def checked_wrap(
    teacher: nn.Module,
    data,
    cfg: SDBConfig | NastyConfig,
    check: CheckConfig,
    *,
    key=None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> WrapResult:
    """Wrap with held-out validation, adapting the setting; raise :class:`WrapRefused` on a miss.

    ``cfg`` picks the recipe (:func:`recipe_for`): SDB (``key``: its key, None draws one) or Nasty (no key).
    """
    from ..train import accuracy, predict_logits
    from .teacher import check_teacher, copy_teacher, dropped_hooks

    data = data.checked()
    owner = teacher
    teacher = check_teacher(teacher, data)  # the network the recipe copies: the figures below are of it
    if hasattr(teacher, "why"):
        log(f"teacher: {teacher.why}")
    dropped = dropped_hooks(owner)
    if dropped:
        log(f"teacher: the box runs without {len(dropped)} forward hook(s) of yours that answer None (they observe "
            f"into your objects): {', '.join(dropped[:5])}{', ...' if len(dropped) > 5 else ''}")
    recipe = recipe_for(cfg)
    t0 = time.perf_counter()
    untrained = absent_classes(data.train.tensors[1], data.num_classes)
    if untrained:  # a data set whose test split has classes its train split lacks, say: said, not refused
        log(f"{untrained['count']} of {data.num_classes} classes have no training input: neither the box nor any "
            "student learns them, e.g. classes " + ", ".join(map(str, untrained["first"])))
    fit_data, _ = holdout(data, check.val_fraction, check.seed)
    unvalidated = unvalidated_classes(fit_data)
    if unvalidated:
        log(f"self-check: {unvalidated['count']} of {data.num_classes} classes have no held-out input (a class "
            "gives one from 2 training inputs on): the figures measure nothing of them, e.g. classes "
            + ", ".join(map(str, unvalidated["first"])))
    fit_part = _fit_part(fit_data.train)
    measured = copy_teacher(teacher)  # a forward with state (a counter buffer) leaves the owner's model as it was
    teacher_fit_acc = accuracy(measured, fit_part)  # the teacher is frozen: once for every attempt
    # its logits on the held-out inputs, for the guessed-key figure
    teacher_val = predict_logits(measured, fit_data.test.tensors[0])
    del measured
    th = check.thresholds
    attempts: list[dict] = []
    best: tuple[float, WrapResult, dict] | None = None
    step, last_direction = recipe.first_step, 0
    for i in range(check.max_attempts):
        elapsed = time.perf_counter() - t0
        if attempts and check.budget_seconds is not None:
            last = attempts[-1]["seconds"] * cfg.train.epochs / attempts[-1]["settings"]["epochs"]
            if elapsed + last > check.budget_seconds:
                log(f"self-check: budget of {check.budget_seconds:.0f}s reached after {i} attempt(s)")
                break
        ta = time.perf_counter()
        try:
            result = recipe.fit(teacher, fit_data, cfg, key,
                                progress=_attempt_progress(progress, i, check.max_attempts), should_cancel=should_cancel)
        except FloatingPointError as e:  # the loss diverged: a miss like any other, retried gentler
            attempts.append({"attempt": i + 1, "settings": recipe.settings(cfg), "diverged": str(e), "passed": False,
                             "seconds": round(time.perf_counter() - ta, 2)})
            log(f"self-check attempt {i + 1}: diverged ({e}) -> half the learning rate, gradients clipped")
            cfg = gentler(cfg)
            continue
        r = result.report
        keyed = "keyed_acc" in r  # a Nasty box has no keyed path: no keyed figures, no keyed threshold
        figures = {**_drops(r, keyed), "fit_public_drop": teacher_fit_acc - accuracy(result.box.public_logits, fit_part)}
        if keyed:
            from .sdb import guessed_key_share

            figures["guessed_key_share"] = guessed_key_share(result.box, teacher_val, fit_data, cfg)
            if figures["guessed_key_share"] is None:
                log(f"self-check attempt {i + 1}: the guessed-key share is unmeasured: the keyed path's soft labels "
                    "are no nearer the teacher's than the confusion target's"
                    + ("" if th.min_guessed_key_share <= th.GUESSED_KEY_SHARE_FLOOR else ", a miss of its bound"))
        if check.leak_check:
            earlier = next((a["figures"]["labels_only"] for a in attempts if "labels_only" in a.get("figures", {})), None)
            figures.update(leak_check(result.box, fit_data, check, should_cancel, labels_only=earlier))
        figures = {k: v if v is None else round(v, 3) for k, v in figures.items()}
        misses = th.misses(figures)
        attempt = {"attempt": i + 1, "settings": recipe.settings(cfg), "figures": figures, "misses": misses,
                   "passed": not misses, "seconds": round(time.perf_counter() - ta, 2)}
        attempts.append(attempt)
        log(f"self-check attempt {i + 1}: " + ", ".join(f"{k} {_shown(v)}" for k, v in figures.items())
            + (" -> ok" if not misses else " -> missed " + ", ".join(f"{k} by {v:.2f}" for k, v in misses.items())))
        shortfall = sum(misses.values())
        if best is None or shortfall < best[0]:
            best = (shortfall, result, attempt)
        if not misses:
            break
        if _collapse(result, fit_data.test, teacher_val, figures, th)[2]:  # no other setting mends a rate too high
            log(f"self-check attempt {i + 1}: the box collapsed to a few classes -> half the learning rate, "
                "gradients clipped")
            cfg = gentler(cfg)
            continue
        underfit = figures["fit_public_drop"] > th.max_accuracy_drop
        narrow = figures["public_drop"] - max(figures["fit_public_drop"], 0.0) > th.max_accuracy_drop
        moves = _by_path(misses, figures)
        nxt, direction = recipe.adapt(cfg, moves, step, underfit, narrow)
        if direction and direction == -last_direction:  # overshot: bracket the setting more finely
            step /= 2
            nxt, direction = recipe.adapt(cfg, moves, step, underfit, narrow)
        cfg, last_direction = nxt, direction or last_direction

    if best is None:
        raise WrapRefused(f"every attempt of the {recipe.mode} recipe diverged (the loss became NaN or Inf), down to "
                          f"lr {cfg.train.lr:g} with gradients clipped at {cfg.train.grad_clip:g}: the teacher's "
                          "logits or inputs may be far out of scale (normalised inputs, logits of a few units)",
                          {"passed": False, "mode": recipe.mode, "attempts": attempts,
                           "seconds": round(time.perf_counter() - t0, 2)})
    _, result, chosen = best
    report = {"passed": chosen["passed"], "mode": recipe.mode, "thresholds": asdict(th),
              "val_size": len(fit_data.test.tensors[1]), "fit_size": len(fit_data.train.tensors[1]),
              **({"unvalidated_classes": unvalidated} if unvalidated else {}),
              **({"untrained_classes": untrained} if untrained else {}),
              "chosen": chosen["settings"],
              "figures": chosen["figures"], "attempts": attempts,
              "seconds": round(time.perf_counter() - t0, 2)}
    result.report["check"] = report
    if not chosen["passed"]:
        best_fig = chosen["figures"]
        config = "NastyConfig" if recipe.mode == "nasty" else "SDBConfig"
        raise WrapRefused(
            f"the {'Nasty ' if recipe.mode == 'nasty' else ''}box missed the owner's thresholds after "
            f"{len(attempts)} attempt(s); best (attempt {chosen['attempt']}): public {best_fig['public_acc']:.2f}% "
            f"vs teacher {best_fig['teacher_acc']:.2f}% (max drop {th.max_accuracy_drop})"
            + (f", keyed {best_fig['keyed_acc']:.2f}% (max drop {th.max_keyed_drop})" if "keyed_acc" in best_fig
               else "")
            + (f", KD from public {best_fig['kd_public']:.2f}% vs labels only {best_fig['labels_only']:.2f}% "
               f"(min margin {th.min_leak_margin})" if "kd_public" in best_fig else "")
            + _balanced_missed(best_fig, chosen["misses"], th, config)
            + _guessed_missed(best_fig, chosen["misses"], th)
            + "; missed " + ", ".join(f"{k} by {v:.2f}" + ("" if k == "guessed" else " points")
                                      for k, v in chosen["misses"].items())
            + (_measured_on(report["val_size"], best_fig["teacher_acc"], teacher_fit_acc, check.teacher_apart)
               if {"public", "keyed", "public_balanced", "keyed_balanced"} & set(chosen["misses"]) else "")
            + _collapsed(result, fit_data.test, teacher_val, chosen, th, config)
            + _unmeasurable_leak(chosen, data.num_classes, min(check.transfer_n, report["fit_size"]), th),
            report, result)
    return result


def _drops(r: dict, keyed: bool) -> dict[str, float]:
    """An attempt's accuracy figures from its recipe's report (:func:`~.sdb.public_report` on the held-out part):
    each path's top-1 and class-balanced top-1 (mean per-class recall) and their drops against the teacher's, with
    each drop's standard error; the keyed path's where the box has one."""
    paths = ("public", "keyed") if keyed else ("public",)
    out = {"teacher_acc": r["teacher_acc"], "teacher_balanced_acc": r["teacher_balanced_acc"]}
    for path in paths:
        out |= {f"{path}_acc": r[f"{path}_acc"], f"{path}_balanced_acc": r[f"{path}_balanced_acc"]}
    for path in paths:
        out |= {f"{path}_drop": r["teacher_acc"] - r[f"{path}_acc"], f"{path}_drop_se": r[f"{path}_drop_se"],
                f"{path}_balanced_drop": r["teacher_balanced_acc"] - r[f"{path}_balanced_acc"],
                f"{path}_balanced_drop_se": r[f"{path}_balanced_drop_se"]}
    return out


def _shown(v: float | None) -> str:
    return "unmeasured" if v is None else f"{v:.2f}"


def _by_path(misses: dict[str, float], figures: dict) -> dict[str, float]:
    """The misses as a recipe's ``adapt`` reads them. A class-balanced drop's miss is its path's (the larger
    shortfall): the same moves keep a path's top-1, on a rare class too. An unmeasured guessed-key share (the keyed
    path no nearer the teacher than the confusion target) is a keyed miss: more of the image through the key and
    longer training bring the keyed path nearer the teacher, where less of it (a guessed-key miss) would not."""
    out = dict(misses)
    for path in ("public", "keyed"):
        balanced = out.pop(f"{path}_balanced", None)
        if balanced is not None:
            out[path] = max(out.get(path, 0.0), balanced)
    if "guessed" in out and figures.get("guessed_key_share", 0.0) is None:
        out["keyed"] = max(out.get("keyed", 0.0), out.pop("guessed"))
    return out


def _option(flag: str, param: str | None, python: str) -> str:
    """An option as each caller of the check gives it, which a refusal names without knowing which of them it answers
    (as :mod:`sdb_core.tasks.wrap`'s messages do): the ``sdb wrap`` flag, the ``wrap`` job's param (None: it has
    none) and the library's name."""
    return f"sdb wrap {flag}" + (f", a job's {param}" if param else "") + f"; {python} in Python"


def _bounds(th) -> dict[str, float]:
    """Each path's bound on its top-1 drop, overall and class-balanced alike."""
    return {"public": th.max_accuracy_drop, "keyed": th.max_keyed_drop}


def _class_level(fig: dict, path: str, bound: float) -> bool:
    """Whether ``path``'s class-balanced drop is clearly worse than its top-1 drop, as a rare class's miss makes it:
    by more than the path's bound (at least a point) and than half the top-1 drop (7 vs rest at 98/2, no seven
    answered: 2.1 overall, ~50 balanced). A class of share p missed alone parts them by 100/K - 100p against a top-1
    drop of 100p: past half of it for a class under two thirds of its equal share. On classes of equal size the two
    are one figure (a collapsed box: 87.1 and 87.1); on classes of near sizes a large miss parts them by a few points
    (41/32/27 %, a keyed path of token ids: 41.3 and 43.8), and neither is a rare class's."""
    drop = fig[f"{path}_drop"]
    return fig[f"{path}_balanced_drop"] - drop > max(bound, 1.0, drop / 2)


def _balanced_missed(fig: dict, misses: dict[str, float], th, config: str = "SDBConfig") -> str:
    """What a refusal says of a class-balanced miss: each path's mean per-class recall against the teacher's, and,
    where it is clearly worse than the top-1 (:func:`_class_level`), what a rare class needs."""
    bounds = _bounds(th)
    missed = [p for p in bounds if f"{p}_balanced" in misses]
    if not missed:
        return ""
    rare = any(_class_level(fig, p, bounds[p]) for p in missed)
    return (", class-balanced (the mean recall of each class held out, which a rare class weighs as much as a "
            "common one; a path that never answers a rare class loses little top-1): " + ", ".join(
                f"{p} {fig[p + '_balanced_acc']:.2f}% vs teacher {fig['teacher_balanced_acc']:.2f}% (max drop "
                f"{bounds[p]}, ± {fig[p + '_balanced_drop_se']:.2f})" for p in missed)
            + (": a box fits a rare class's few inputs last; give that class more training inputs, or train the box "
               f"longer ({_option('--epochs', 'epochs', config + '.train.epochs')})" if rare else
               ": no rare class's (the top-1 misses nearly as much), every class missed alike"))


def _collapse(result: WrapResult, held_out, teacher_val: torch.Tensor, fig: dict, th) -> tuple[int, dict, list]:
    """The paths of a box that collapsed: a path that answers at most half the classes the teacher answers on the
    held-out inputs while it misses its top-1 bound, and not for a rare class (:func:`_class_level`: a path that
    never answers the rare one of two classes answers half of them too). A learning rate too high for the network
    does that (a wrap at lr 10 on balanced digits: one class for every input, 10%, a training loss of 2,302), where
    no rare class's inputs nor longer training help. Returns the classes taught, those each path answers, and the
    collapsed paths (none: [])."""
    from ..train import predict_logits

    bounds, x = _bounds(th), held_out.tensors[0]
    taught = int(teacher_val.argmax(1).unique().numel())
    paths = {"public": result.box.public_logits, **({"keyed": result.box.distill_logits} if "keyed_acc" in fig else {})}
    answered = {p: int(predict_logits(fn, x).argmax(1).unique().numel()) for p, fn in paths.items()}
    return taught, answered, [p for p, n in answered.items() if taught >= 2 and n <= taught // 2
                              and fig[f"{p}_drop"] > bounds[p] and not _class_level(fig, p, bounds[p])]


def _collapsed(result: WrapResult, held_out, teacher_val: torch.Tensor, chosen: dict, th, config: str) -> str:
    """What a refusal says of a box that collapsed (:func:`_collapse`): so, and the learning rate to lower."""
    taught, answered, collapsed = _collapse(result, held_out, teacher_val, chosen["figures"], th)
    if not collapsed:
        return ""
    history = result.report.get("history") or []
    loss = (f" (its training loss {history[-1]['loss']:.4g} in the last epoch)"
            if history and "loss" in history[-1] else "")
    return (f". The box collapsed: of the {taught} classes the teacher answers on the held-out inputs, the "
            + ", the ".join(f"{p} path answers {answered[p]}" for p in collapsed) + loss
            + ": a learning rate too high for the network does that (each step leaps past what the last one "
            "learned), not a rare class nor too few epochs; lower the learning rate, "
            f"{chosen['settings']['lr']:g} in attempt {chosen['attempt']} "
            f"({_option('--lr', 'lr', config + '.train.lr')})")


def _guessed_missed(fig: dict, misses: dict[str, float], th) -> str:
    """What a refusal says of a guessed-key miss: the share, or why it could not be measured."""
    if "guessed" not in misses:
        return ""
    if fig["guessed_key_share"] is None:
        return (f", a guessed key's share unmeasured (min {th.min_guessed_key_share}): the keyed path's soft labels "
                "are no nearer the teacher's than the confusion target's, so nothing places a guessed key between "
                "them; a keyed path trained longer or with more of the image (a higher λ) is nearer the teacher")
    return (f", a guessed key's share {fig['guessed_key_share']:.2f} (min {th.min_guessed_key_share}: random "
            "keys open the keyed path)")


def _measured_on(val_size: int, teacher_val: float, teacher_fit: float, teacher_apart: bool) -> str:
    """What to add to a refusal for an accuracy miss: how many inputs measured it, and, where the teacher scores on
    them as on its fit inputs and the caller has not said it trained the teacher apart, that a teacher trained on
    them overstates every drop (one that generalises scores less on inputs it never saw: the hint would mislead)."""
    if teacher_apart or teacher_val < teacher_fit - 1.0:
        return f" (measured on {val_size} held-out training inputs)"
    return (f" (measured on {val_size} held-out training inputs, where the teacher scores as on its fit inputs, "
            f"{teacher_fit:.2f}%: a teacher trained on them scores its training accuracy there, which overstates every "
            "drop; train it without them: sdb wrap --train-teacher does, as does a job's teacher given as {arch} "
            "alone; in Python sdb_core.protect.check.teacher_data(data, check) is the rest)")


def _unmeasurable_leak(chosen: dict, classes: int, transfer: int, th) -> str:
    """What to add to a refusal whose leak miss no box could be expected to avoid: the labels-only student itself
    is within the margin of chance (many classes, few transfer inputs each: 1,000 classes, 1,000 inputs, 1.7%),
    so KD from the public outputs cannot come the margin below it whatever they teach; or within the margin of a
    perfect score (a task the labels alone solve: 4 classes of 3x12x20 prototypes, 100%), where the public
    outputs, whose top-1 is the label, teach a student all of it too (KD 100% there at every attempt): nothing
    is left for them to leak beyond the labels, and no margin below them to show."""
    if "leak" not in chosen["misses"]:
        return ""
    labels_only, chance = chosen["figures"]["labels_only"], 100.0 / classes
    if labels_only + th.min_leak_margin > 100.0:
        return (f". A student on labels alone reaches {labels_only:.2f}% from {transfer} transfer inputs, within "
                f"{th.min_leak_margin} points of every input right: the labels alone teach this task, the public "
                "outputs (their top-1 is the label) cannot teach a student less than that, and no leak beyond the "
                "labels is left to refuse. A leak margin of 0 accepts a box whose public outputs teach no more "
                "than the labels do ("
                + _option("--min-leak-margin 0", "min_leak_margin 0", "CheckConfig.thresholds.min_leak_margin") + ")")
    if labels_only - chance >= th.min_leak_margin:
        return ""
    return (f". The leak check cannot show that margin here: a student on labels alone reaches {labels_only:.2f}% "
            f"(chance {chance:.2f}%) from {transfer} transfer inputs, {transfer / classes:.1f} per class, so none can "
            f"fall {th.min_leak_margin} points below it: give more inputs per class (a larger training split; "
            "CheckConfig.transfer_n in Python too) or a lower leak margin "
            f"({_option('--min-leak-margin', 'min_leak_margin', 'CheckConfig.thresholds.min_leak_margin')})")

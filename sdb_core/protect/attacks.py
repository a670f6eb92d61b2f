"""The attacker of the leak audit: what it sees (:class:`PublicAPI`) and what it tries.

Every attack sees the public outputs only, under the target's output policy. Attacks come in
families, one registered function per name of :data:`~.config.FAMILIES`: given the audit's
config and the public API, it yields its attacks (name, family, students trained per seed, and
how one seed of it runs). :func:`~.audit.audit` runs the families in the order of ``FAMILIES``.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..distill import DistillConfig, as_teacher, soft_kl
from ..models import create_model
from ..registry import Registry
from ..train import TrainConfig, accuracy, fit, predict_logits, seed_everything
from ..train_config import gentler as gentler_training
from .box import SafeDistillationBox
from .config import POLICIES
from .key import blend, random_keys
from .measure import public_teacher, student_accuracy

if TYPE_CHECKING:
    from .audit import AuditConfig


# --------------------------------------------------------------------------- the public API
def apply_policy(probs: Tensor, policy: str, k: int = 3) -> Tensor:
    """What the public path shows: all probabilities, the top k renormalised, or a one-hot label."""
    if policy == "probs":
        return probs
    if policy == "label":
        return F.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
    if policy == "top_k":
        k = min(k, probs.shape[1])
        vals, idx = probs.topk(k, dim=1)
        out = torch.zeros_like(probs).scatter_(1, idx, vals)
        return out / out.sum(1, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"policy must be one of {'|'.join(POLICIES)}, got {policy!r}")


class PublicAPI:
    """One callable over any target: a batch of inputs → the probabilities the policy allows.

    ``lam`` is the keyed-input blend of a box (public in a bundle's meta), so an attacker
    can try keys of its own; ``None`` for a model with no keyed path.
    """

    def __init__(self, probs_fn: Callable[[Tensor], Tensor], policy: str = "probs", k: int = 3,
                 lam: float | None = None, name: str = "model") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {'|'.join(POLICIES)}, got {policy!r}")
        self._probs, self.policy, self.k, self.lam, self.name = probs_fn, policy, k, lam, name

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return apply_policy(torch.as_tensor(self._probs(x)).float().cpu(), self.policy, self.k)


def public_api(target: Any, policy: str = "probs", k: int = 3) -> PublicAPI:
    """Adapt a box, a plain ``nn.Module`` (its logits are the outputs) or a loaded bundle."""
    if isinstance(target, PublicAPI):
        return PublicAPI(target._probs, policy, k, target.lam, target.name)
    if isinstance(target, SafeDistillationBox):
        return PublicAPI(target.predict, policy, k, target.lam if target.has_key else None,
                         f"box ({target.mode})")
    if isinstance(target, nn.Module):
        logits = as_teacher(target)  # eval mode, no gradients, each batch a copy (a forward may write into it)
        return PublicAPI(lambda x: F.softmax(logits(x), dim=1), policy, k, None, type(target).__name__)
    if hasattr(target, "meta") and hasattr(target, "predict"):  # sdb_core.bundle.Bundle, no onnxruntime import
        lam = target.meta.get("lam") if target.meta.get("mode") == "sdb" else None
        return PublicAPI(lambda x: torch.from_numpy(target.predict(x.detach().cpu().numpy())), policy, k,
                         None if lam is None else float(lam), f"bundle {target.meta.get('name')}")
    raise TypeError(f"cannot audit a {type(target).__name__}: pass a SafeDistillationBox, an nn.Module "
                    "or a loaded bundle")


# --------------------------------------------------------------------------- attacks and families
@dataclass
class Round:
    """What the attacks of one seed share: the attacker's transfer set (images and public top-1)."""

    cfg: AuditConfig
    data: Any
    seed: int
    transfer: TensorDataset
    count: Callable[[float], float]  # the audit's tally of trained students (progress, finite check)
    should_cancel: Callable[[], bool] | None = None
    retries: list[dict] = field(default_factory=list)  # students that diverged and were trained again (trained)

    def kd(self, temperature: float, alpha: float) -> DistillConfig:
        return DistillConfig(temperature=temperature, alpha=alpha, train=self.cfg.train)

    def train_config(self, train: TrainConfig, n: int) -> TrainConfig:
        """``train`` with the epochs that give a student on ``n`` images the audit's steps."""
        return replace(train, epochs=self.cfg.epochs_for(n))

    def student(self, teacher, dcfg: DistillConfig, *, transfer: TensorDataset | None = None,
                evaluate_on=None) -> float:
        """Test accuracy (%) of a ``cfg.student`` distilled from ``teacher`` (``None``: labels only)."""
        transfer = self.transfer if transfer is None else transfer
        return self.trained(self.train_config(dcfg.train, len(transfer)), lambda train: student_accuracy(
            self.cfg.student, self.data, transfer, teacher, replace(dcfg, train=train), self.seed,
            evaluate_on=evaluate_on, should_cancel=self.should_cancel))

    def trained(self, train: TrainConfig, run: Callable[[TrainConfig], float]) -> float:
        """``run(train)``'s test accuracy, counted. A student that diverges (its loss or accuracy not finite) is
        trained once more as an attacker would, at a quarter of the step with its gradient clipped, and the retry
        is noted in :attr:`retries`; a second divergence ends the audit, saying both."""
        try:
            return self.count(run(train))
        except FloatingPointError as e:
            gentler = gentler_training(train, RETRY_GRAD_CLIP, RETRY_LR_FACTOR)
            self.retries.append({"seed": self.seed, "diverged": str(e), "retried_lr": gentler.lr,
                                 "retried_grad_clip": gentler.grad_clip})
            try:
                return self.count(run(gentler))
            except FloatingPointError as again:
                raise FloatingPointError(f"a student diverged ({e}) and again at lr {gentler.lr:g} with its gradient "
                                         f"clipped at {gentler.grad_clip:g} ({again})") from None


# A diverged student's second run (Round.trained): an attacker whose run blew up lowers the step and clips, as the
# wrap's check does; a quarter of the step rather than the check's half, as the audit retries once only.
RETRY_LR_FACTOR = 0.25
RETRY_GRAD_CLIP = 5.0


@dataclass(frozen=True)
class Attack:
    name: str
    family: str
    students: int  # students it trains per seed
    run: Callable[[Round], tuple[float, dict | None]]  # one seed: test accuracy, detail for the report


Family = Callable[["AuditConfig", PublicAPI], Iterator[Attack]]
ATTACK_FAMILIES: Registry[Family] = Registry("attack family")
attack_family = ATTACK_FAMILIES.register


@attack_family
def labels(cfg: AuditConfig, api: PublicAPI) -> Iterator[Attack]:
    """``labels_ls{ε}``: the labels-only reference, cross-entropy on the public top-1 with label smoothing ε."""
    for ls in cfg.label_smoothings:
        yield Attack(f"labels_ls{ls:g}", "labels", 1,
                     lambda r, ls=ls: (r.student(None, DistillConfig(label_smoothing=ls, train=cfg.train)), None))


@attack_family
def kd(cfg: AuditConfig, api: PublicAPI) -> Iterator[Attack]:
    """``kd_T{T}_a{α}``: KD from the public probabilities at every T (sharpening included) and α."""
    for t in cfg.temperatures:
        for a in cfg.alphas:
            yield Attack(f"kd_T{t:g}_a{a:g}", "kd", 1,
                         lambda r, t=t, a=a: (r.student(public_teacher(api), r.kd(t, a)), None))


def _topk_teacher(api: PublicAPI, k: int) -> Callable[[Tensor], Tensor]:
    return public_teacher(lambda x: apply_policy(api(x), "top_k", k))


@attack_family
def topk(cfg: AuditConfig, api: PublicAPI) -> Iterator[Attack]:
    """``topk{k}``: KD from the top-k probabilities renormalised (the stingy view).

    ``topk1`` is a function of the label alone and counts in the labels-only reference
    (see :func:`~.audit.label_only`).
    """
    for k in cfg.sparse_k:
        yield Attack(f"topk{k}", "topk", 1,
                     lambda r, k=k: (r.student(_topk_teacher(api, k), r.kd(cfg.sparse_temperature, 0.9)), None))


def _smooth_teacher(api: PublicAPI, tau: float, eps: float, num_classes: int) -> Callable[[Tensor], Tensor]:
    """Logits of ``(1 − ε)·softmax(log p / τ) + ε/C``: the outputs re-tempered and smoothed."""
    def teacher(x: Tensor) -> Tensor:
        q = F.softmax(torch.log(api(x).clamp_min(1e-8)) / tau, dim=1)
        return torch.log((1.0 - eps) * q + eps / num_classes)
    return teacher


def _split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed + 7919).permutation(n)
    h = max(1, round(n * holdout))
    return np.sort(perm[h:]), np.sort(perm[:h])


@attack_family
def smooth(cfg: AuditConfig, api: PublicAPI) -> Iterator[Attack]:
    """``smooth``: KD from the outputs after temperature scaling and label smoothing.

    (τ, ε) is chosen by a student's agreement with the public labels on a held-out part of the
    transfer set.
    """
    def run(r: Round) -> tuple[float, dict]:
        x, y_pub = r.transfer.tensors
        fit_idx, held_idx = _split(len(x), cfg.holdout, r.seed)
        tune = TensorDataset(x[fit_idx], y_pub[fit_idx])
        held = TensorDataset(x[held_idx], y_pub[held_idx])
        best = None
        for tau in cfg.smooth_taus:
            for eps in cfg.smooth_eps:
                # Chosen by how well a student matches the public labels it never saw.
                agree = r.student(_smooth_teacher(api, tau, eps, r.data.num_classes), r.kd(1.0, 0.9),
                                  transfer=tune, evaluate_on=held)
                if best is None or agree > best[0]:
                    best = (agree, tau, eps)
        _, tau, eps = best
        acc = r.student(_smooth_teacher(api, tau, eps, r.data.num_classes), r.kd(1.0, 0.9))
        return acc, {"seed": r.seed, "tau": tau, "eps": eps, "holdout_agreement": best[0]}

    yield Attack("smooth", "smooth", len(cfg.smooth_taus) * len(cfg.smooth_eps) + 1, run)


class _Skeptic(nn.Module):
    """A student plus an auxiliary head on its first activation (its shallowest hidden stage)."""

    def __init__(self, student: nn.Module, num_classes: int, in_shape) -> None:
        super().__init__()
        self.student = student
        act = next((m for m in student.modules() if isinstance(m, (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh))), None)
        if act is None:
            raise ValueError(f"the skeptical student needs an activation layer in {type(student).__name__}")
        self._feat: Tensor | None = None
        act.register_forward_hook(lambda m, i, o: setattr(self, "_feat", o))
        with torch.no_grad():
            student(torch.zeros(2, *in_shape))
        self.aux = nn.Sequential(nn.Flatten(), nn.Linear(self._feat[0].numel(), num_classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.student(x)
        return out, self.aux(self._feat)


# The skeptic's gradient norm is clipped at this (unless its TrainConfig clips already). Its auxiliary head reads the
# first hidden layer straight from the input: on 3x32x32 images an MLP's aux logits grew to ~80 on the 300 labels
# before the teacher's term started, whose T^2-scaled gradient then blew the student up (chance accuracy or a
# NaN loss, 3 of 9 audits of plain teachers on mnist-textures). Clipped, the same runs train as the KD students do.
SKEPTIC_GRAD_CLIP = 5.0


def _skeptical_accuracy(cfg: AuditConfig, data, transfer: TensorDataset, teacher, train: TrainConfig,
                        seed: int, should_cancel) -> float:
    seed_everything(seed)
    student = create_model(cfg.student, num_classes=data.num_classes, in_shape=data.in_shape)
    net = _Skeptic(student, data.num_classes, data.in_shape)
    x, y = transfer.tensors
    t_logits = predict_logits(teacher, x)
    total = math.ceil(len(x) / train.batch_size) * train.epochs
    delay, t, step_no = int(cfg.skeptical_delay * total), cfg.skeptical_temperature, [0]

    def step(batch):
        xb, yb, tb = batch
        out, aux = net(xb)
        use_teacher = float(step_no[0] >= delay)
        step_no[0] += 1
        loss = (F.cross_entropy(out, yb) + F.cross_entropy(aux, yb)
                + use_teacher * soft_kl(aux, tb, t)  # the teacher reaches the shallow head only
                + soft_kl(out, aux.detach(), t))  # the final head self-distils from it
        return loss

    fit(net, TensorDataset(x, y, t_logits), step, replace(train, seed=seed, grad_clip=train.grad_clip or SKEPTIC_GRAD_CLIP),
        should_cancel=should_cancel)
    return accuracy(student, data.test)


@attack_family
def skeptical(cfg: AuditConfig, api: PublicAPI) -> Iterator[Attack]:
    """``skeptical``: a skeptical student (after Kundu et al., NeurIPS 2021, simplified).

    An auxiliary head on the student's first hidden stage takes the soft labels, only after a
    delay; the final head learns from the labels and by self-distillation from that auxiliary head.
    """
    def run(r: Round) -> tuple[float, None]:
        teacher = public_teacher(api)
        return r.trained(r.train_config(cfg.train, len(r.transfer)), lambda train: _skeptical_accuracy(
            cfg, r.data, r.transfer, teacher, train, r.seed, r.should_cancel)), None

    yield Attack("skeptical", "skeptical", 1, run)


def _keyed_teacher(api: PublicAPI, keys: Tensor) -> Callable[[Tensor], Tensor]:
    """The public outputs on the attacker's own keyed inputs, averaged over ``keys``."""
    lam = api.lam
    return public_teacher(lambda x: torch.stack([api(blend(x, k, lam)) for k in keys]).mean(0))


@attack_family
def keys(cfg: AuditConfig, api: PublicAPI) -> Iterator[Attack]:
    """``key_mean`` / ``key_ensemble``, for a box with a keyed path (none without one).

    The attacker blends random keys of the key's distribution into its images (λ is public in
    a bundle's meta) and distils the public outputs on them, one student per key (mean) or
    their average (ensemble).
    """
    if api.lam is None or cfg.keys <= 0:
        return

    def drawn(r: Round) -> Tensor:
        g = torch.Generator().manual_seed(10_000 + r.seed)
        return random_keys(cfg.keys, r.data.in_shape, r.data.mean, r.data.std, generator=g)

    def mean(r: Round) -> tuple[float, dict]:
        k = drawn(r)
        per_key = [r.student(_keyed_teacher(api, k[i:i + 1]), r.kd(cfg.key_temperature, 0.9))
                   for i in range(cfg.keys)]
        return statistics.fmean(per_key), {"seed": r.seed, "per_key": per_key}

    def ensemble(r: Round) -> tuple[float, None]:
        return r.student(_keyed_teacher(api, drawn(r)), r.kd(cfg.key_temperature, 0.9)), None

    yield Attack("key_mean", "keys", cfg.keys, mean)
    yield Attack("key_ensemble", "keys", 1, ensemble)

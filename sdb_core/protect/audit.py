"""The leak audit: how much does a model's public API teach a distiller?

An attacker holds ``N`` unlabelled images from the training distribution, black-box access
to the public outputs under the model's output policy, and a student architecture. Each
attack trains that student and is scored by its test accuracy and its *distillation
advantage*: accuracy minus that of the best labels-only student (the public top-1 labels
with cross-entropy and label smoothing 0, 0.1 or 0.2; a regulariser that needs no
knowledge of the model is not a leak). Verdict: ``protected`` when the largest mean
advantage is at most ``threshold`` points, else ``leaks``, naming the attack.

Attacks (every one sees the public outputs only, through :class:`PublicAPI`):

- ``labels_ls{0,0.1,0.2}`` the labels-only reference students;
- ``kd_T{T}_a{α}`` KD from the public probabilities, T ∈ {0.25 … 20} (sharpening included);
- ``topk{k}`` KD from the top-k probabilities renormalised (the stingy view); ``topk1`` is a
  function of the label alone and counts in the labels-only reference (see :func:`label_only`);
- ``smooth`` KD from the outputs after temperature scaling and label smoothing, (τ, ε)
  chosen by a student's agreement with the public labels on a held-out part of the transfer set;
- ``skeptical`` a skeptical student (after Kundu et al., NeurIPS 2021, simplified): an auxiliary
  head on the student's first hidden stage takes the soft labels, only after a delay; the final
  head learns from the labels and by self-distillation from that auxiliary head;
- ``key_mean`` / ``key_ensemble`` for a box with a keyed path: the attacker blends random
  keys of the key's distribution into its images (λ is public in a bundle's meta) and
  distils the public outputs on them, one student per key (mean) or their average (ensemble).

Defaults (N = 300, MLP student, 30 epochs) are where the audit *sees* a leak: on mnist-5k
KD from an unprotected small CNN beats the best labels-only student there, and does not at
N = 1,000 (label smoothing 0.2 catches up); see the README's "Leak audit" section.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..data import transfer_split
from ..distill import DistillConfig, soft_kl
from ..models import create_model
from ..train import Progress, TrainConfig, accuracy, fit, predict_logits, seed_everything
from .box import SafeDistillationBox
from .key import blend, random_keys
from .measure import public_teacher, student_accuracy

POLICIES = ("probs", "top_k", "label")
FAMILIES = ("labels", "kd", "topk", "smooth", "skeptical", "keys")


@dataclass
class AuditConfig:
    transfer_n: int = 300
    student: str = "mlp"
    temperatures: tuple[float, ...] = (0.25, 0.5, 1.0, 4.0, 10.0, 20.0)
    alphas: tuple[float, ...] = (0.9, 0.5)
    label_smoothings: tuple[float, ...] = (0.0, 0.1, 0.2)
    sparse_k: tuple[int, ...] = (1, 3)
    sparse_temperature: float = 4.0
    smooth_taus: tuple[float, ...] = (0.5, 2.0, 4.0)  # temperature scaling of the public outputs
    smooth_eps: tuple[float, ...] = (0.0, 0.1)  # label smoothing mixed into them
    holdout: float = 0.2  # share of the transfer set held out to choose (τ, ε)
    skeptical_temperature: float = 4.0
    skeptical_delay: float = 0.25  # share of training before the teacher's soft labels are used
    keys: int = 10  # random keys blended in by the attacker (boxes with a keyed path only)
    key_temperature: float = 4.0
    policy: str = "probs"  # what the public API returns: probs | top_k | label
    top_k: int = 3  # k of the top_k policy
    threshold: float = 0.5  # points of advantage above which the verdict is `leaks`
    seeds: tuple[int, ...] = (0,)
    families: tuple[str, ...] = FAMILIES
    # Every student gets the same number of optimisation steps (epochs follow from the set's
    # size): an under-trained labels-only reference would make any attack that merely scales
    # the gradient (KD's T², top-1 "KD") look like a leak. None: use ``train.epochs``.
    steps: int | None = 1000
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.01, batch_size=64))

    def __post_init__(self) -> None:
        self.temperatures, self.alphas = tuple(self.temperatures), tuple(self.alphas)
        self.label_smoothings, self.sparse_k = tuple(self.label_smoothings), tuple(self.sparse_k)
        self.smooth_taus, self.smooth_eps = tuple(self.smooth_taus), tuple(self.smooth_eps)
        self.seeds, self.families = tuple(self.seeds), tuple(self.families)
        if isinstance(self.transfer_n, bool) or not isinstance(self.transfer_n, int) or self.transfer_n < 2:
            raise ValueError(f"transfer_n must be an int >= 2, got {self.transfer_n!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {'|'.join(POLICIES)}, got {self.policy!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not self.label_smoothings:
            raise ValueError("label_smoothings must not be empty: the labels-only reference needs one")
        if any(not 0.0 <= ls < 1.0 for ls in self.label_smoothings):
            raise ValueError(f"label_smoothings must be in [0, 1), got {self.label_smoothings}")
        if any(not t > 0 for t in (*self.temperatures, *self.smooth_taus)):
            raise ValueError(f"temperatures must be > 0, got {self.temperatures} / {self.smooth_taus}")
        if any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas must be in [0, 1], got {self.alphas}")
        if any(k < 1 for k in self.sparse_k):
            raise ValueError(f"sparse_k must be >= 1, got {self.sparse_k}")
        if any(not 0.0 <= e < 1.0 for e in self.smooth_eps):
            raise ValueError(f"smooth_eps must be in [0, 1), got {self.smooth_eps}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.keys < 0:
            raise ValueError(f"keys must be >= 0, got {self.keys}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None, got {self.steps}")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown attack families {sorted(unknown)}; known: {', '.join(FAMILIES)}")

    def epochs_for(self, n: int) -> int:
        """Epochs of a student on ``n`` transfer images: ``steps`` optimisation steps, else ``train.epochs``."""
        if self.steps is None:
            return self.train.epochs
        return math.ceil(self.steps / math.ceil(n / self.train.batch_size))


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
        target.eval()

        def probs(x: Tensor) -> Tensor:
            device = next(iter(target.parameters()), torch.empty(0)).device
            return F.softmax(target(x.to(device)), dim=1)

        return PublicAPI(probs, policy, k, None, type(target).__name__)
    if hasattr(target, "meta") and hasattr(target, "predict"):  # sdb_core.bundle.Bundle, no onnxruntime import
        lam = target.meta.get("lam") if target.meta.get("mode") == "sdb" else None
        return PublicAPI(lambda x: torch.from_numpy(target.predict(x.detach().cpu().numpy())), policy, k,
                         None if lam is None else float(lam), f"bundle {target.meta.get('name')}")
    raise TypeError(f"cannot audit a {type(target).__name__}: pass a SafeDistillationBox, an nn.Module "
                    "or a loaded bundle")


# --------------------------------------------------------------------------- the report
@dataclass
class AuditReport:
    dataset: str
    target: str
    policy: str
    config: dict
    attacks: dict[str, dict]  # name → family, acc, accs, advantage, advantages, detail
    reference: str  # the best labels-only attack (by mean accuracy)
    public_acc: float  # test accuracy of the public top-1
    max_advantage: float
    worst_attack: str
    verdict: str
    seconds: float

    @property
    def advantages(self) -> dict[str, float]:
        return {n: a["advantage"] for n, a in self.attacks.items() if not a["label_only"]}

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self) -> str:
        width = max(len(n) for n in self.attacks)
        head = (f"leak audit of {self.target} on {self.dataset}: policy {self.policy}, "
                f"N={self.config['transfer_n']}, student {self.config['student']}, "
                f"seeds {list(self.config['seeds'])}; public top-1 {self.public_acc:.1f}%")
        lines = [head,
                 f"{'attack':{width}}  {'acc %':>6}  {'advantage':>9}", "-" * (width + 19)]
        for n, a in self.attacks.items():
            adv = "(ref)" if n == self.reference else ("" if a["label_only"] else f"{a['advantage']:+.2f}")
            mark = "  <-- leaks" if not a["label_only"] and a["advantage"] > self.config["threshold"] else ""
            lines.append(f"{n:{width}}  {a['acc']:6.2f}  {adv:>9}{mark}")
        lines.append("")
        lines.append(f"verdict: {self.verdict.upper()} (largest advantage {self.max_advantage:+.2f} points, "
                     f"{self.worst_attack}; threshold {self.config['threshold']})")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Bar chart of the mean advantage per attack; bars above the threshold in red."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        adv = self.advantages
        names, vals = list(adv), [adv[n] for n in adv]
        thr = self.config["threshold"]
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.4))
        ax.barh(names, vals, color=["#c0392b" if v > thr else "#2e86c1" for v in vals])
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.axvline(thr, color="#c0392b", linestyle="--", linewidth=0.8, label=f"threshold {thr:+.1f}")
        ax.invert_yaxis()
        ax.set_xlabel(f"advantage over labels only ({self.reference}), points")
        ax.set_title(f"{self.target}, policy {self.policy}: {self.verdict}", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """``report.json``, ``table.txt`` and ``advantages.png`` in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=2))
        (out / "table.txt").write_text(self.format_table() + "\n")
        return {"report": out / "report.json", "table": out / "table.txt",
                "chart": self.plot(out / "advantages.png")}


# --------------------------------------------------------------------------- attacks
def _smooth_teacher(api: PublicAPI, tau: float, eps: float, num_classes: int) -> Callable[[Tensor], Tensor]:
    """Logits of ``(1 − ε)·softmax(log p / τ) + ε/C``: the outputs re-tempered and smoothed."""
    def teacher(x: Tensor) -> Tensor:
        q = F.softmax(torch.log(api(x).clamp_min(1e-8)) / tau, dim=1)
        return torch.log((1.0 - eps) * q + eps / num_classes)
    return teacher


def _topk_teacher(api: PublicAPI, k: int) -> Callable[[Tensor], Tensor]:
    return public_teacher(lambda x: apply_policy(api(x), "top_k", k))


def _keyed_teacher(api: PublicAPI, keys: Tensor) -> Callable[[Tensor], Tensor]:
    """The public outputs on the attacker's own keyed inputs, averaged over ``keys``."""
    lam = api.lam
    return public_teacher(lambda x: torch.stack([api(blend(x, k, lam)) for k in keys]).mean(0))


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

    fit(net, TensorDataset(x, y, t_logits), step, replace(train, seed=seed), should_cancel=should_cancel)
    return accuracy(student, data.test)


def _split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed + 7919).permutation(n)
    h = max(1, round(n * holdout))
    return np.sort(perm[h:]), np.sort(perm[:h])


def _attack_plan(cfg: AuditConfig, api: PublicAPI) -> list[tuple[str, str]]:
    plan = [(f"labels_ls{ls:g}", "labels") for ls in cfg.label_smoothings]
    if "kd" in cfg.families:
        plan += [(f"kd_T{t:g}_a{a:g}", "kd") for t in cfg.temperatures for a in cfg.alphas]
    if "topk" in cfg.families:
        plan += [(f"topk{k}", "topk") for k in cfg.sparse_k]
    if "smooth" in cfg.families:
        plan.append(("smooth", "smooth"))
    if "skeptical" in cfg.families:
        plan.append(("skeptical", "skeptical"))
    if "keys" in cfg.families and api.lam is not None and cfg.keys > 0:
        plan += [("key_mean", "keys"), ("key_ensemble", "keys")]
    return plan


def label_only(name: str, family: str, policy: str = "probs") -> bool:
    """Students taught by the public top-1 alone: the labels-only family and KD from the top-1.

    KD from the renormalised top-1 is a function of the label only (a one-hot, softened by T),
    so whatever it gains over cross-entropy is optimisation (T² scales its gradient ~14x at
    T = 4), not knowledge: measured on mnist-5k at N = 300 it beat the best CE student by
    +1.0 on one seed of the protected box. It joins the reference rather than the attacks.
    Under the ``label`` policy the same holds for every attack on the transfer images' outputs
    (they are one-hots): KD at T = 10 from a one-hot is label smoothing at about 0.65, a
    regulariser that needs no knowledge of the model (measured: +0.6 over smoothing 0.2). Only
    the attacker's keys query other inputs (keyed blends) and stay attacks.
    """
    return family == "labels" or name == "topk1" or (policy == "label" and family != "keys")


def score(accs: dict[str, list[float]], families: dict[str, str], policy: str = "probs") -> dict[str, dict]:
    """Per attack: mean accuracy and advantage over the best label-only student, seed by seed."""
    ref = [n for n in accs if label_only(n, families[n], policy)]
    if not ref:
        raise ValueError("no labels-only student to compare with")
    n_seeds = len(next(iter(accs.values())))
    ref_per_seed = [max(accs[n][i] for n in ref) for i in range(n_seeds)]
    out = {}
    for name, values in accs.items():
        advs = [a - r for a, r in zip(values, ref_per_seed)]
        out[name] = {"family": families[name], "label_only": label_only(name, families[name], policy),
                     "acc": statistics.fmean(values), "accs": list(values),
                     "advantage": statistics.fmean(advs), "advantages": advs}
    return out


def verdict_of(attacks: dict[str, dict]) -> tuple[str, str, float]:
    """(reference, worst attack, its advantage) of scored attacks."""
    reference = max((n for n, a in attacks.items() if a["label_only"]), key=lambda n: attacks[n]["acc"])
    scored = {n: a["advantage"] for n, a in attacks.items() if not a["label_only"]}
    if not scored:
        return reference, reference, 0.0
    worst = max(scored, key=scored.get)
    return reference, worst, scored[worst]


def audit(
    target: Any,
    data,
    cfg: AuditConfig | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> AuditReport:
    """Run every attack of ``cfg`` against the public outputs of ``target`` on ``data``."""
    cfg = cfg or AuditConfig()
    api = public_api(target, cfg.policy, cfg.top_k)
    plan = _attack_plan(cfg, api)
    students_per_seed = (len(plan) + (len(cfg.smooth_taus) * len(cfg.smooth_eps) if "smooth" in cfg.families else 0)
                         + (cfg.keys - 1 if any(f == "keys" for _, f in plan) else 0))
    total, done = students_per_seed * len(cfg.seeds), 0
    t0 = time.perf_counter()
    accs: dict[str, list[float]] = {n: [] for n, _ in plan}
    detail: dict[str, list] = {n: [] for n, _ in plan}

    def student(transfer: TensorDataset, teacher, dcfg: DistillConfig, seed: int, evaluate_on=None,
                skeptical: bool = False) -> float:
        nonlocal done
        dcfg = replace(dcfg, train=replace(dcfg.train, epochs=cfg.epochs_for(len(transfer))))
        if skeptical:
            acc = _skeptical_accuracy(cfg, data, transfer, teacher, dcfg.train, seed, should_cancel)
        else:
            acc = student_accuracy(cfg.student, data, transfer, teacher, dcfg, seed, evaluate_on=evaluate_on,
                                   should_cancel=should_cancel)
        if not math.isfinite(acc):
            raise FloatingPointError(f"a student's accuracy is {acc}")
        done += 1
        if progress is not None:
            progress(Progress(done, total, done, total, done / max(total, 1), {"acc": acc}))
        return acc

    for seed in cfg.seeds:
        x = transfer_split(data, cfg.transfer_n, seed).tensors[0]
        y_pub = api(x).argmax(1)  # the attacker's only labels: the public top-1
        transfer = TensorDataset(x, y_pub)
        kd = lambda t, a: DistillConfig(temperature=t, alpha=a, train=cfg.train)
        for name, fam in plan:
            if fam == "labels":
                ls = cfg.label_smoothings[[f"labels_ls{v:g}" for v in cfg.label_smoothings].index(name)]
                acc = student(transfer, None, DistillConfig(label_smoothing=ls, train=cfg.train), seed)
            elif fam == "kd":
                t, a = (float(s[1:]) for s in name.split("_")[1:])
                acc = student(transfer, public_teacher(api), kd(t, a), seed)
            elif fam == "topk":
                acc = student(transfer, _topk_teacher(api, int(name[4:])), kd(cfg.sparse_temperature, 0.9), seed)
            elif fam == "skeptical":
                acc = student(transfer, public_teacher(api), kd(cfg.skeptical_temperature, 0.9), seed,
                              skeptical=True)
            elif fam == "smooth":
                fit_idx, held_idx = _split(len(x), cfg.holdout, seed)
                fit = TensorDataset(x[fit_idx], y_pub[fit_idx])
                held = TensorDataset(x[held_idx], y_pub[held_idx])
                best = None
                for tau in cfg.smooth_taus:
                    for eps in cfg.smooth_eps:
                        # Chosen by how well a student matches the public labels it never saw.
                        agree = student(fit, _smooth_teacher(api, tau, eps, data.num_classes), kd(1.0, 0.9),
                                        seed, evaluate_on=held)
                        if best is None or agree > best[0]:
                            best = (agree, tau, eps)
                _, tau, eps = best
                acc = student(transfer, _smooth_teacher(api, tau, eps, data.num_classes), kd(1.0, 0.9), seed)
                detail[name].append({"seed": seed, "tau": tau, "eps": eps, "holdout_agreement": best[0]})
            else:  # keys
                g = torch.Generator().manual_seed(10_000 + seed)
                keys = random_keys(cfg.keys, data.in_shape, data.mean, data.std, generator=g)
                if name == "key_mean":
                    per_key = [student(transfer, _keyed_teacher(api, keys[i:i + 1]), kd(cfg.key_temperature, 0.9),
                                       seed) for i in range(cfg.keys)]
                    acc = statistics.fmean(per_key)
                    detail[name].append({"seed": seed, "per_key": per_key})
                else:
                    acc = student(transfer, _keyed_teacher(api, keys), kd(cfg.key_temperature, 0.9), seed)
            accs[name].append(acc)
        log(f"seed {seed}: " + "  ".join(f"{n} {v[-1]:.1f}" for n, v in accs.items()))

    attacks = score(accs, dict(plan), cfg.policy)
    for name in attacks:
        attacks[name]["detail"] = detail[name]
    reference, worst, max_adv = verdict_of(attacks)
    public_acc = 100.0 * (api(data.test.tensors[0]).argmax(1) == data.test.tensors[1]).float().mean().item()
    return AuditReport(
        dataset=data.name, target=api.name, policy=cfg.policy,
        config={**{k: v for k, v in asdict(cfg).items() if k != "train"}, "train": asdict(cfg.train)},
        attacks=attacks, reference=reference, public_acc=public_acc, max_advantage=max_adv,
        worst_attack=worst, verdict="protected" if max_adv <= cfg.threshold else "leaks",
        seconds=time.perf_counter() - t0)

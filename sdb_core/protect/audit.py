"""The leak audit: how much does a model's public API teach a distiller?

An attacker holds ``N`` unlabelled images from the training distribution, black-box access
to the public outputs under the model's output policy, and a student architecture. Each
attack trains that student and is scored by its test accuracy and its *distillation
advantage*: accuracy minus that of the best labels-only student (the public top-1 labels
with cross-entropy and label smoothing 0, 0.1 or 0.2; a regulariser that needs no
knowledge of the model is not a leak). Verdict: ``protected`` when the largest mean
advantage is at most ``threshold`` points, else ``leaks``, naming the attack; none (a ValueError)
when no attack is scored or the labels-only reference learned nothing (:func:`unlearned`).

Attacks (every one sees the public outputs only, through :class:`~.attacks.PublicAPI`) come in
families, registered by name in :mod:`.attacks`, run in the order of ``FAMILIES``: ``labels``
(the labels-only reference, always run), ``kd``, ``topk``, ``smooth``, ``skeptical`` and
``keys`` (boxes with a keyed path only).

Defaults (N = 300, MLP student, 30 epochs) are where the audit *sees* a leak: on mnist-5k
KD from an unprotected small CNN beats the best labels-only student there, and does not at
N = 1,000 (label smoothing 0.2 catches up); see the README's "Leak audit" section.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..data import transfer_split
from ..reports import report_json
from ..train import Progress, chance_of
from .attacks import ATTACK_FAMILIES, Attack, PublicAPI, Round, public_api
from .config import FAMILIES, AuditConfig, no_attack


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
        (out / "report.json").write_text(report_json(self.to_dict()))
        (out / "table.txt").write_text(self.format_table() + "\n")
        return {"report": out / "report.json", "table": out / "table.txt",
                "chart": self.plot(out / "advantages.png")}


# --------------------------------------------------------------------------- scoring
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
    """(reference, worst attack, its advantage) of scored attacks.

    With no attack at all (the labels-only students alone) there is no verdict: a ValueError, never ``protected``.
    Under the ``label`` policy attacks on the transfer images run and score as labels-only (what they were shown is
    labels): their verdict is the reference's, advantage 0.
    """
    if not any(not label_only(n, a["family"]) for n, a in attacks.items()):
        raise ValueError(f"no attack was run (only the labels-only students {sorted(attacks)}): an audit without an "
                         "attack has no verdict")
    reference = max((n for n, a in attacks.items() if a["label_only"]), key=lambda n: attacks[n]["acc"])
    scored = {n: a["advantage"] for n, a in attacks.items() if not a["label_only"]}
    if not scored:
        return reference, reference, 0.0
    worst = max(scored, key=scored.get)
    return reference, worst, scored[worst]


# A labels-only reference that gains less than this share of the target's public top-1 over chance learned nothing (nor
# did its attacks: every advantage ~0, read `protected`); normal audits gain 0.6-0.95 of it (docs/audit.md#attacks).
MIN_LEARNED_SHARE = 0.1


def unlearned(reference: float, public_acc: float, chance: float, cfg: AuditConfig) -> str | None:
    """Why the labels-only reference's test accuracy ``reference`` shows its students learned nothing, in words; None
    when it learned. Such an audit has no verdict: its advantages over a student at chance are noise, never
    ``protected``."""
    if reference - chance >= MIN_LEARNED_SHARE * (public_acc - chance):
        return None
    more = (f"more steps (steps {cfg.steps})" if cfg.steps is not None else f"more epochs ({cfg.train.epochs})")
    return (f"the labels-only reference scores {reference:.1f}% on the test split, chance {chance:.1f}% (the target's "
            f"public top-1 {public_acc:.1f}%): the {cfg.student} students stayed at chance and learned nothing, so "
            f"their advantages measure nothing and the audit has no verdict; give them {more}, more transfer images "
            f"(transfer {cfg.transfer_n}) or pick another student")


def attack_plan(cfg: AuditConfig, api: PublicAPI) -> list[Attack]:
    """The attacks of ``cfg`` on ``api``, family by family in the order of ``FAMILIES``.

    The labels-only family always runs: every advantage is measured against it. A plan without an attack (see
    :func:`~.config.no_attack`) is refused: its verdict would say ``protected`` of any model.
    """
    why = no_attack(cfg.families, cfg.keys, api.lam is not None)
    if why is not None:
        raise ValueError(f"{api.name}: {why}")
    plan = [attack for family in FAMILIES if family == "labels" or family in cfg.families
            for attack in ATTACK_FAMILIES.get(family)(cfg, api)]
    if all(label_only(a.name, a.family) for a in plan):  # e.g. kd with no temperature, topk with k = 1 alone
        raise ValueError(f"{api.name}: families {list(cfg.families)} score no attack with these settings (they train "
                         f"only labels-only students: {', '.join(a.name for a in plan)}): an audit without an attack "
                         "has no verdict")
    return plan


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
    plan = attack_plan(cfg, api)
    x_test, y_test = data.test.tensors
    public_acc = 100.0 * (api(x_test).argmax(1) == y_test).float().mean().item()
    total, done = sum(a.students for a in plan) * len(cfg.seeds), 0
    t0 = time.perf_counter()
    accs: dict[str, list[float]] = {a.name: [] for a in plan}
    detail: dict[str, list] = {a.name: [] for a in plan}

    def count(acc: float) -> float:
        nonlocal done
        if not math.isfinite(acc):
            raise FloatingPointError(f"a student's accuracy is {acc}")
        done += 1
        if progress is not None:
            progress(Progress(done, total, done, total, done / max(total, 1), {"acc": acc}))
        return acc

    for seed in cfg.seeds:
        x = transfer_split(data, cfg.transfer_n, seed).tensors[0]
        shown = api(x)
        if not torch.isfinite(shown).all():  # no student could learn from it: the target's fault, not a divergence
            raise ValueError(f"{api.name} answers NaN or Inf on the attacker's inputs ({data.name}): its outputs "
                             "cannot be audited")
        y_pub = shown.argmax(1)  # the attacker's only labels: the public top-1
        r = Round(cfg, data, seed, TensorDataset(x, y_pub), count, should_cancel)
        for attack in plan:
            before = len(r.retries)
            acc, note = attack.run(r)
            accs[attack.name].append(acc)
            if note is not None:
                detail[attack.name].append(note)
            for retry in r.retries[before:]:  # a student of this attack diverged and was trained again
                detail[attack.name].append(retry)
                log(f"seed {seed}: a {attack.name} student diverged ({retry['diverged']}); trained again at lr "
                    f"{retry['retried_lr']:g}, gradient clipped at {retry['retried_grad_clip']:g}")
        log(f"seed {seed}: " + "  ".join(f"{n} {v[-1]:.1f}" for n, v in accs.items()))
        # each seed's reference, as score() takes it: one that learned nothing ends the audit now, not after every seed
        why = unlearned(max(accs[a.name][-1] for a in plan if label_only(a.name, a.family, cfg.policy)),
                        public_acc, chance_of(y_test), cfg)
        if why is not None:
            raise ValueError(f"{api.name}: seed {seed}: {why}")

    attacks = score(accs, {a.name: a.family for a in plan}, cfg.policy)
    for name in attacks:
        attacks[name]["detail"] = detail[name]
    reference, worst, max_adv = verdict_of(attacks)
    return AuditReport(
        dataset=data.name, target=api.name, policy=cfg.policy,
        config={**{k: v for k, v in asdict(cfg).items() if k != "train"}, "train": asdict(cfg.train)},
        attacks=attacks, reference=reference, public_acc=public_acc, max_advantage=max_adv,
        worst_attack=worst, verdict="protected" if max_adv <= cfg.threshold else "leaks",
        seconds=time.perf_counter() - t0)

"""The data-free recipe's losses, from the single terms to the group-stack generator loss.

DAFL's terms adapted to multi-label outputs, the BN-statistics prior, multi-label KD, and
:func:`generator_loss`, which combines them over every judged stage and teacher.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DataFreeConfig, TeacherSpec, label_union

if TYPE_CHECKING:
    from .networks import GroupStackGenerator


def one_hot_loss(logits: Tensor, threshold: float = 0.5, target: Tensor | None = None) -> Tensor:
    """BCE of the outputs against their own thresholded probabilities: confident, teacher-like outputs.
    A label-conditioned generator gives the ``target`` its image was drawn for instead."""
    if target is None:
        target = (torch.sigmoid(logits) > threshold).float()
    return F.binary_cross_entropy_with_logits(logits, target.detach())


def activation_loss(features: Tensor) -> Tensor:
    """−mean |features| of the teacher's last block: images that excite the teacher (DAFL's L_a)."""
    return -features.abs().mean()


def entropy_loss(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """−H of the batch's label frequencies (mean probability per label, normalised to sum 1).

    DAFL's information entropy for multi-label outputs: minimising it spreads the
    positives over all labels instead of one label lighting up on every image.
    """
    freq = torch.sigmoid(logits).mean(dim=0)
    q = freq / freq.sum().clamp_min(eps)
    return (q * torch.log(q.clamp_min(eps))).sum()


def sparsity_loss(logits: Tensor) -> Tensor:
    """Mean probability (L1 of the outputs): few positives per image, as in the real label sets."""
    return torch.sigmoid(logits).mean()


def consistency_loss(stage_logits: Tensor, final_logits: Tensor) -> Tensor:
    """An intermediate stage's predictions should agree with the deepest stage's (held fixed)."""
    return F.binary_cross_entropy_with_logits(stage_logits, torch.sigmoid(final_logits).detach())


def soft_bce(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """BCE of the student to the teacher's per-label probabilities (multi-label KD)."""
    return F.binary_cross_entropy_with_logits(student_logits, torch.sigmoid(teacher_logits))


def run_teacher(teacher: nn.Module, h: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Blocks ``start:`` then the head on a block input: (last block's features, logits)."""
    for blk in teacher.blocks[start:]:
        h = blk(h)
    return h, teacher.head(h)


def bn_statistics_loss(teacher: nn.Module, h: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`run_teacher`, plus how far the batch statistics entering the teacher's BN layers
    (blocks ``start:``) are from the running statistics the teacher kept of its training data.

    Not in the paper: the BN prior of DeepInversion (Yin et al., CVPR 2020). Here the teachers'
    max-pool heads are otherwise satisfied by a few blobs (docs/notes/datafree.md).
    """
    terms: list[Tensor] = []

    def hook(mod: nn.BatchNorm2d, inputs, _out) -> None:
        x = inputs[0]
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        terms.append(torch.linalg.vector_norm(mean - mod.running_mean) + torch.linalg.vector_norm(var - mod.running_var))

    handles = [m.register_forward_hook(hook) for blk in teacher.blocks[start:] for m in blk.modules()
               if isinstance(m, nn.BatchNorm2d)]
    try:
        feats, logits = run_teacher(teacher, h, start)
    finally:
        for hd in handles:
            hd.remove()
    return feats, logits, (torch.stack(terms).mean() if terms else h.new_zeros(()))


def generator_loss(gen: GroupStackGenerator, filters: nn.ModuleList, teachers: Sequence[TeacherSpec],
                   z: Tensor, stages: int, cfg: DataFreeConfig, *, intermediate: bool = True,
                   y: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The group-stack loss of generator stages 1..``stages`` over every teacher.

    With ``intermediate=False`` only the deepest stage is judged and by the DAFL terms
    alone (one-hot, activation, entropy): the single-generator baseline. With ``y`` (a
    label-conditioned generator's targets over :func:`label_union`'s labels) the one-hot
    term is each teacher's BCE to its part of ``y`` instead of to its own thresholded outputs.
    """
    n_blocks, half = len(gen.blocks), len(z) // 2
    seek = cfg.w_modeseek > 0 and stages == n_blocks and half > 0
    if seek and y is not None:
        y = torch.cat([y[:half], y[:half], y[2 * half:]])  # pairs: image i and i + half share a target
    outs = gen(z, stages, y)
    cols = label_union(teachers)[1] if y is not None else None
    total = z.new_zeros(())
    parts = {"onehot": 0.0, "act": 0.0, "ent": 0.0, "sparse": 0.0, "cons": 0.0}
    if seek:
        x = outs[-1]
        ms = (x[:half] - x[half:2 * half]).abs().mean() / (z[:half] - z[half:2 * half]).abs().mean().clamp_min(1e-8)
        total = total - cfg.w_modeseek * ms
        parts["modeseek"] = ms.detach()
    judged = range(1, stages + 1) if intermediate else [stages]
    for m, teacher in enumerate([t.model for t in teachers]):
        logits_by_stage = {}
        for j in judged:
            h = outs[j - 1]
            if j < n_blocks:
                h = filters[j - 1][m](h)
            if intermediate and cfg.w_bn > 0:
                feats, logits, bn = bn_statistics_loss(teacher, h, n_blocks - j)
                parts["bn"] = parts.get("bn", 0.0) + bn.detach()
            else:
                (feats, logits), bn = run_teacher(teacher, h, n_blocks - j), 0.0
            logits_by_stage[j] = logits
            oh = one_hot_loss(logits, cfg.threshold, None if y is None else y[:, cols[m]])
            act, ent = activation_loss(feats), entropy_loss(logits)
            loss = cfg.w_onehot * oh + cfg.w_activation * act + cfg.w_entropy * ent + cfg.w_bn * bn
            parts["onehot"] += oh.detach()
            parts["act"] += act.detach()
            parts["ent"] += ent.detach()
            if intermediate:
                sp = sparsity_loss(logits)
                loss = loss + cfg.w_sparsity * sp
                parts["sparse"] += sp.detach()
            total = total + loss
        if intermediate:
            for j in judged:
                if j < stages:
                    c = consistency_loss(logits_by_stage[j], logits_by_stage[stages])
                    total = total + cfg.w_consistency * c
                    parts["cons"] += c.detach()
    return total, parts

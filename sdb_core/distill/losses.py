"""Distillation losses, defined once; every recipe imports them from here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(p_teacher^T ‖ p_student^T), batch mean (Hinton et al.; T² keeps gradients T-invariant)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def kl_to_target(target_probs: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(q ‖ softmax(logits/T)) toward a fixed distribution ``q``, batch mean."""
    t = temperature
    log_p = F.log_softmax(logits / t, dim=1)
    return F.kl_div(log_p, target_probs, reduction="batchmean") * (t * t)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    label_smoothing: float = 0.0,
) -> Tensor:
    """α·T²·KL(teacher‖student) + (1−α)·CE(student, labels); pure KD when ``labels`` is None."""
    kd = soft_kl(student_logits, teacher_logits, temperature)
    if labels is None or alpha >= 1.0:
        return kd
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * kd + (1.0 - alpha) * ce


def probs_to_logits(probs: Tensor, eps: float = 1e-8) -> Tensor:
    """Log-probabilities: logits up to a per-row constant, so KD from a probability API works."""
    return torch.log(probs.clamp_min(eps))

"""Knowledge distillation: losses and the distiller that trains a student from any teacher."""
from .distiller import DistillConfig, DistillResult, as_teacher, distill
from .losses import kd_loss, kl_to_target, probs_to_logits, soft_kl

__all__ = ["DistillConfig", "DistillResult", "as_teacher", "distill", "kd_loss", "kl_to_target",
           "probs_to_logits", "soft_kl"]

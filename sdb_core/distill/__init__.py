"""Knowledge distillation: losses and the distiller that trains a student from any teacher.

Names resolve lazily (PEP 562), as in ``sdb_core.protect``: ``sdb_core.distill.config`` is
torch-free and a job kind or the CLI reads its defaults without importing torch.
"""
from ..lazy import lazy_getattr

_EXPORTS = {
    "DistillConfig": "config", "DistillResult": "distiller", "as_teacher": "distiller", "distill": "distiller",
    "kd_loss": "losses", "kl_to_target": "losses", "probs_to_logits": "losses", "soft_kl": "losses",
}
__all__ = ["DistillConfig", "DistillResult", "as_teacher", "distill", "kd_loss", "kl_to_target",
           "probs_to_logits", "soft_kl"]
assert set(__all__) == set(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)

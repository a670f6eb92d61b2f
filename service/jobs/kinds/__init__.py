"""Job kinds by name. Each module registers one kind with ``@job_kind``; import it here."""
from . import audit, distill, style, wrap  # noqa: F401  (registers the kinds)
from . import okdhp  # noqa: F401  (pose distillation)
from . import amalgamate  # noqa: F401  (knowledge amalgamation: afk, branching, datafree)
from . import transferability  # noqa: F401  (DEPARA: model and layer selection)
from .base import KINDS, JobParams, Kind, Submission, get_kind, job_kind

__all__ = ["KINDS", "JobParams", "Kind", "Submission", "get_kind", "job_kind"]

"""Job kinds by name. Each module registers one kind with ``@job_kind``; import it here."""
# Imported for their registrations: protection, distillation, the leak audit, pose (OKDHP),
# amalgamation (afk, branching, datafree), transferability (DEPARA) and style transfer.
from . import amalgamate, audit, distill, okdhp, style, transferability, wrap  # noqa: F401
from .base import (
    KINDS,
    JobParams,
    Kind,
    ModelParam,
    StaleJob,
    Submission,
    get_kind,
    job_kind,
    params_errors,
    stored_params,
)

__all__ = ["KINDS", "JobParams", "Kind", "ModelParam", "StaleJob", "Submission", "get_kind", "job_kind",
           "params_errors", "stored_params"]

"""What a long run reports and how it is stopped; no torch here, so the service can watch
training (progress callbacks, cancel) without importing it."""
from __future__ import annotations

from dataclasses import dataclass, field


class Cancelled(Exception):
    """Raised by the training loop when the cancel callback asks it to stop."""


@dataclass
class Progress:
    """What the loop reports; ``fraction`` runs from 0 to 1 over the whole fit."""

    epoch: int
    epochs: int
    step: int
    steps: int
    fraction: float
    metrics: dict[str, float] = field(default_factory=dict)

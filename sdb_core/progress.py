"""What a long run reports and how it is stopped; no torch here, so the service can watch
training (progress callbacks, cancel) without importing it."""
from __future__ import annotations

from collections.abc import Callable
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


ProgressFn = Callable[[Progress], None]


@dataclass
class Hooks:
    """How a caller watches and stops a task: the one protocol of the CLI, the jobs and the tests.

    ``plan(**weights)`` announces the run's phases in order with their weights (epochs), so that
    a job can split its overall fraction over them; ``phase(name)`` returns the progress callback
    for that phase (``None``: not watched; the CLI draws a bar, a job maps it onto its overall
    fraction), ``log`` takes one line, ``should_cancel`` is polled between steps.
    """

    plan: Callable[..., None] = lambda **weights: None
    phase: Callable[[str], ProgressFn | None] = lambda name: None
    log: Callable[[str], None] = lambda message: None
    should_cancel: Callable[[], bool] = lambda: False

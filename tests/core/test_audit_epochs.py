"""An audit's students get ``steps`` optimiser steps whatever the transfer set's size: AuditConfig.epochs_for is
:func:`sdb_core.train_config.epochs_for_steps`, the one rule for it (it computed its own, and divided by zero on an
empty transfer set)."""
from __future__ import annotations

import pytest

from sdb_core.protect.config import AuditConfig
from sdb_core.train_config import TrainConfig, epochs_for_steps


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 300, 10_000])
def test_an_audits_epochs_are_those_that_give_its_steps(n):
    cfg = AuditConfig(steps=1000, train=TrainConfig(epochs=30, batch_size=64))
    assert cfg.epochs_for(n) == epochs_for_steps(1000, n, 64)


def test_an_audit_without_steps_trains_its_epochs():
    assert AuditConfig(steps=None, train=TrainConfig(epochs=7)).epochs_for(300) == 7


def test_300_images_in_batches_of_64_are_5_steps_an_epoch():
    assert AuditConfig(steps=1000, train=TrainConfig(batch_size=64)).epochs_for(300) == 200

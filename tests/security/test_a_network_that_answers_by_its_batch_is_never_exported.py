"""A network whose answer to one input follows the other inputs of its batch is never made a bundle.

The service's micro-batcher answers different callers' inputs in one ONNX Runtime call: a network that computes
a statistic over the batch axis (a BatchNorm without running statistics, attention across the batch) would give
one caller an answer that changes with, and tells of, another caller's inputs; a random one (``F.dropout`` left
at ``training=True``) answers by chance. Before the fix such a network trained and exported (or failed at export
with a message about tracing). Now ``export_bundle`` refuses it before tracing, and every wrap before training
(``tests/core/test_check.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdb_core.bundle import BundleError, export_bundle


class _Net(torch.nn.Module):
    """A classifier of 8 features whose forward is ``how(self.a, x)``."""

    def __init__(self, how):
        super().__init__()
        self.a, self.how = torch.nn.Linear(8, 3), how

    def forward(self, x):
        return self.how(self.a, x)


@pytest.mark.parametrize("how, why", [
    (lambda a, x: F.dropout(a(x), 0.5), "changes from one run to the next .*F.dropout"),
    (lambda a, x: a(x) * float(x.abs().max()), "depends on the other inputs of its batch"),  # its batch's max
    (lambda a, x: a(x - x.mean(0)), "depends on the other inputs of its batch"),
    (lambda a, x: F.batch_norm(a(x), None, None, training=True), "cannot answer one input alone .*track_running_stats"),
], ids=["dropout", "batch-max", "batch-mean", "batchnorm-without-statistics"])
def test_a_network_that_does_not_answer_each_input_alone_and_the_same_every_time_is_refused(tmp_path, how, why):
    with pytest.raises(BundleError, match=why):
        export_bundle(_Net(how), tmp_path / "m", name="m", in_shape=(8,), mean=(0.0,), std=(1.0,),
                      labels=["a", "b", "c"])
    assert not (tmp_path / "m").exists()

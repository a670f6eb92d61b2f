"""OKDHP: the Feature Aggregation Unit, the pixel-wise KL, the ramp-up, the multi-branch hourglass and a
tiny run of the recipe that must learn."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sdb_core.distill.okdhp import (
    OKDHPConfig,
    PoseDataConfig,
    count_gflops,
    okdhp,
    okdhp_loss,
    pixel_kl,
    pose_train_config,
    rampup,
)
from sdb_core.distill.pose_metrics import pck
from sdb_core.models.hourglass import FeatureAggregation, MultiBranchHourglass, StackedHourglass


def test_fau_weights_sum_to_one_across_branches_and_weight_the_ensemble():
    torch.manual_seed(0)
    fau = FeatureAggregation(width=8, num_branches=3, num_joints=5).eval()
    w = fau(torch.randn(4, 8, 6, 6))
    assert w.shape == (4, 3, 5) and (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(4, 5))
    net = MultiBranchHourglass(num_joints=5, width=8, branch_stacks=(1, 1, 1), in_shape=(3, 32, 32)).eval()
    _, outs, ens, weights = net.forward_all(torch.randn(2, 3, 32, 32))
    finals = torch.stack([o[-1] for o in outs], 1)
    torch.testing.assert_close(ens, (finals * weights[..., None, None]).sum(1))
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 3))  # learned weights, not a plain mean
    mean_net = MultiBranchHourglass(num_joints=5, width=8, in_shape=(3, 32, 32), ensemble="mean").eval()
    _, outs, ens, _ = mean_net.forward_all(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(ens, torch.stack([o[-1] for o in outs], 1).mean(1))


def test_pixel_kl_is_zero_for_identical_maps_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 4, 4)
    assert pixel_kl(a, a).abs().item() < 1e-6
    assert pixel_kl(a, a + 5.0).abs().item() < 1e-5  # a softmax over pixels ignores a constant shift
    assert pixel_kl(a, torch.randn(2, 3, 4, 4)).item() > 0
    # Golden value: one map of two pixels, teacher (ln 3, 0) -> (3/4, 1/4), student (0, 0) -> (1/2, 1/2).
    t, s = torch.tensor([math.log(3.0), 0.0]).view(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2  # summed over pixels, divided by b*h*w
    assert pixel_kl(s, t).item() == pytest.approx(expected, rel=1e-5)
    # An unlabelled joint's map does not count.
    b = a.clone()
    b[:, 1] = torch.randn(2, 4, 4)
    w = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    assert pixel_kl(b, a, w).abs().item() < 1e-6 < pixel_kl(b, a).item()


def test_the_kd_term_teaches_the_branches_and_leaves_the_fau_alone():
    # The ensemble is the teacher: the pixel-wise KL must not pull the FAU (or the ensemble) towards the
    # branches; only the ensemble's own supervised term trains the FAU.
    torch.manual_seed(0)
    net = MultiBranchHourglass(num_joints=5, width=8, shared_stacks=0, branch_stacks=(1, 1),
                               in_shape=(3, 32, 32))
    batch = (torch.randn(4, 3, 32, 32), torch.rand(4, 5, 8, 8), torch.ones(4, 5))

    def fau_and_branch_grads(**over):
        net.zero_grad(set_to_none=True)
        cfg = OKDHPConfig(branch_stacks=(1, 1), **over)
        okdhp_loss(net, batch, cfg, ramp=1.0)[0].backward()
        fau = sum(float(p.grad.abs().sum()) for p in net.fau.parameters() if p.grad is not None)
        branch = sum(float(p.grad.abs().sum()) for p in net.branches.parameters() if p.grad is not None)
        return fau, branch

    kd_only = {"w_ens": 0.0, "w_kd": 1.0}
    fau, branch = fau_and_branch_grads(**kd_only)
    assert fau == 0.0
    assert abs(branch - fau_and_branch_grads(w_ens=0.0, w_kd=0.0)[1]) > 1e-6 * branch  # the KL reaches them
    assert fau_and_branch_grads(**kd_only, detach_ensemble=False)[0] > 0  # the authors' code: it would
    assert fau_and_branch_grads(w_ens=1.0, w_kd=1.0)[0] > 0               # the ensemble's MSE trains it


def test_rampup_rises_from_near_zero_to_one():
    assert rampup(0, 10) == pytest.approx(math.exp(-5))
    assert rampup(10, 10) == 1.0 and rampup(25, 10) == 1.0 and rampup(3, 0) == 1.0
    values = [rampup(t, 10) for t in np.linspace(0, 10, 11)]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_branches_share_the_first_stacks_and_export_alone():
    torch.manual_seed(0)
    net = MultiBranchHourglass(num_joints=17, width=8, shared_stacks=1, branch_stacks=(1, 2, 3),
                               in_shape=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    shared, outs, _, _ = net.forward_all(x)
    assert len(shared) == 1 and [len(o) for o in outs] == [1, 2, 3]
    for b in range(3):
        alone = net.branch(b)
        assert isinstance(alone, StackedHourglass) and len(alone.stacks) == 1 + b + 1
        torch.testing.assert_close(alone(x), outs[b][-1])
        assert alone.stem is net.stem and alone.stacks[0] is net.shared[0]  # the same trained modules
    # Deeper branches cost more; the deployed branch costs what a plain net of its depth costs.
    flops = [count_gflops(net.branch(b), (3, 32, 32)) for b in range(3)]
    assert flops[0] < flops[1] < flops[2]
    plain = StackedHourglass(17, 8, 2, (3, 32, 32))
    assert count_gflops(plain, (3, 32, 32)) == pytest.approx(flops[0])
    with pytest.raises(ValueError, match="branch"):
        net.branch(3)
    with pytest.raises(ValueError, match="ensemble"):
        OKDHPConfig(ensemble="max")


def test_tiny_okdhp_run_learns(tmp_path):
    cfg = OKDHPConfig(data=PoseDataConfig(root=str(tmp_path), n_train=128, n_test=48, input_size=32),
                      width=16, branch_stacks=(1, 1), train=pose_train_config(epochs=8, batch_size=16, lr=2e-3,
                                                                              schedule="cosine"))
    res = okdhp(cfg)
    losses = [e["loss"] for e in res.history.epochs]
    assert losses[-1] < 0.6 * losses[0], losses
    # Chance: every joint at a random place in the crop.
    test = res.data.test
    rng = np.random.default_rng(0)
    guess = test.to_image(rng.uniform(0, test.input_size, size=test.joints.shape))
    chance = 100 * pck(guess, test.meta.joints, test.meta.visibility, test.meta.bboxes)
    assert res.metrics["pck"] > chance + 8, (res.metrics, chance)  # seeds 0-2 each measured > 10 above
    assert {"ap", "ensemble_pck", "mean_ensemble_pck", "branch1_pck"} <= set(res.metrics)
    assert res.gflops > 0 and res.seconds > 0
    assert isinstance(res.target, StackedHourglass)

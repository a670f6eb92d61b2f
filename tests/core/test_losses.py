import math

import torch

from sdb_core.distill.losses import kd_loss, kl_to_target, probs_to_logits, soft_kl


def test_soft_kl_hand_computed():
    # Two classes, T=1: KL([0.5,0.5] ‖ softmax([log 3, 0]) = [0.75, 0.25]).
    s = torch.tensor([[math.log(3.0), 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert math.isclose(soft_kl(s, t, 1.0).item(), expected, rel_tol=1e-5)
    # T scales logits by 1/T and the loss by T².
    assert math.isclose(soft_kl(2 * s, 2 * t, 2.0).item(), 4 * expected, rel_tol=1e-5)


def test_kl_to_target_zero_at_target_and_positive_elsewhere():
    q = torch.tensor([[0.4, 0.25, 0.25, 0.1]])
    logits = 4.0 * torch.log(q)
    assert kl_to_target(q, logits, 4.0).item() < 1e-6
    assert kl_to_target(q, torch.zeros(1, 4), 4.0).item() > 0.01


def test_kd_loss_mixes_kd_and_ce():
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    pure = kd_loss(s, t, None, 4.0, 0.9)
    assert torch.allclose(pure, soft_kl(s, t, 4.0))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.7), 0.7 * pure + 0.3 * ce)


def test_probs_to_logits_keeps_softmax():
    z = torch.randn(4, 6)
    assert torch.allclose(torch.softmax(probs_to_logits(torch.softmax(z, 1)), 1), torch.softmax(z, 1), atol=1e-6)

"""Data-free amalgamation (group-stack dual-GAN): shapes, losses, no data, and that it learns."""
import math

import pytest
import torch
import torch.nn.functional as F

from sdb_core.amalgamate import datafree as df
from sdb_core.amalgamate.multilabel import (
    MultiLabelNet,
    mean_average_precision,
    predict_probs,
    train_multilabel,
)
from sdb_core.progress import Cancelled
from sdb_core.train import TrainConfig

IN = (1, 56, 56)


def _teachers(widths_a, widths_b):
    torch.manual_seed(0)
    a = MultiLabelNet(1, 3, widths=widths_a).eval()
    b = MultiLabelNet(1, 2, widths=widths_b).eval()
    return [df.TeacherSpec("a", a, [0, 1, 2]), df.TeacherSpec("b", b, [3, 4])]


def _tiny(specs, **kw):
    base = {"target": [2, 3], "in_shape": IN, "student_widths": (4, 8, 8)[:len(specs[0].model.blocks)],
                "latent": 8, "gen_samples": 32, "gen_epochs": 1, "image_epochs": 1, "student_samples": 32, "block_epochs": 1, "finetune_epochs": 1,
                "batch_size": 16, "device": "cpu"}
    return df.DataFreeConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("blocks", [2, 3])
def test_group_stack_and_filters_shapes(blocks):
    # Teachers of different widths: the filters must carry the shared generator into each one's space.
    specs = _teachers((8, 16, 32)[:blocks], (6, 12, 24)[:blocks])
    cfg = _tiny(specs)
    gen, filters = df.build_generator(cfg, specs)
    assert len(gen.blocks) == blocks and len(filters) == blocks - 1
    z, y = gen.draw(5)  # the default generator is label-conditioned: noise and a multi-hot target
    assert y.shape == (5, 5) and (y.sum(1) >= 1).all()
    outs = gen(z, y=y)
    assert len(outs) == blocks
    assert outs[-1].shape == (5, *IN) and 0 <= outs[-1].min() and outs[-1].max() <= 1
    for m, spec in enumerate(specs):
        feats = spec.model.features(torch.zeros(5, *IN))
        for j in range(1, blocks):  # stage j enters the last j blocks: its input is the output of block B-j-1
            entry = feats[blocks - j - 1]
            assert filters[j - 1][m](outs[j - 1]).shape == entry.shape
            assert spec.model.forward_from(filters[j - 1][m](outs[j - 1]), blocks - j).shape == (5, len(spec.labels))
    # The student's block b, filtered, goes through the rest of every teacher.
    sblocks, sfilters, cols, order = df.build_student(cfg, specs)
    h = torch.zeros(5, *IN)
    for b in range(blocks):
        h = sblocks[b](h)
        for m, spec in enumerate(specs):
            assert sfilters[b][m](h).shape == spec.model.features(torch.zeros(5, *IN))[b].shape
    student = df.regroup(sblocks, sfilters, specs, cols, order, cfg.target)
    assert student(torch.zeros(5, *IN)).shape == (5, 2)


def test_filter_starts_as_identity_and_gates_per_sample():
    f = df.FeatureFilter(4, 4)
    h = torch.randn(3, 4, 5, 5)
    assert torch.allclose(f(h), h)  # zero-initialised last layer: gate 2*sigmoid(0) = 1
    with torch.no_grad():
        f.fc2.bias.fill_(-100.0)
    assert f(h).abs().max() < 1e-30  # a closed gate removes the channels
    assert df.FeatureFilter(4, 7)(h).shape == (3, 7, 5, 5)


def test_label_plan_puts_branches_in_target_order():
    specs = [df.TeacherSpec("a", None, [0, 1, 2]), df.TeacherSpec("b", None, [2, 3])]
    cols, order = df.label_plan(specs, [3, 0, 2])
    # 0 and 2 come from the first teacher (columns 0 and 2; it holds 2 first), 3 from the second.
    assert cols == [[0, 2], [1]]
    placed = [0, 2, 3]
    assert [placed[i] for i in order] == [3, 0, 2]


def test_recipe_and_config_reject_labels_no_teacher_holds():
    specs = _teachers((8, 16), (8, 16))
    with pytest.raises(ValueError, match="not held"):
        df.datafree(_tiny(specs, target=[2, 9]), specs)  # checked before any training
    with pytest.raises(ValueError, match="variant"):
        _tiny(specs, variant="gan")


# ---------------------------------------------------------------------------------------- losses
def test_one_hot_loss_hand_computed():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    # Thresholded at 0.5: targets [[1, 0], [1, 0]]; BCE = mean of -log sigmoid(+-logit).
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(-0.5))
                + math.log1p(math.exp(-3))) / 4
    assert df.one_hot_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    # A higher threshold flips the 0.5 logit (p = 0.62) to a negative target.
    expected_hi = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(0.5))
                   + math.log1p(math.exp(-3))) / 4
    assert df.one_hot_loss(logits, threshold=0.7).item() == pytest.approx(expected_hi, rel=1e-6)


def test_activation_loss_hand_computed():
    f = torch.tensor([[[[1.0, -3.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    assert df.activation_loss(f).item() == pytest.approx(-(1 + 3 + 0 + 2) / 4)


def test_entropy_loss_hand_computed():
    # Mean probabilities per label: sigmoid(0)=0.5 for both → frequencies 1/2, 1/2 → -H = -log 2.
    assert df.entropy_loss(torch.zeros(4, 2)).item() == pytest.approx(-math.log(2), rel=1e-6)
    # Label frequencies 0.75 and 0.25 (after normalising) → -H = 0.75 log .75 + 0.25 log .25.
    p = torch.tensor([[0.9, 0.3], [0.6, 0.2]])
    logits = torch.log(p / (1 - p))
    expected = 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert df.entropy_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    # Balanced frequencies are the minimum: one label always on scores worse.
    assert df.entropy_loss(torch.tensor([[9.0, -9.0]] * 4)).item() > df.entropy_loss(torch.zeros(4, 2)).item()


def test_sparsity_and_consistency_losses_hand_computed():
    p = torch.tensor([[0.9, 0.3], [0.6, 0.2]])
    logits = torch.log(p / (1 - p))
    assert df.sparsity_loss(logits).item() == pytest.approx((0.9 + 0.3 + 0.6 + 0.2) / 4, rel=1e-6)
    stage = torch.zeros(2, 2)  # p = 0.5 everywhere: BCE to any target is log 2
    assert df.consistency_loss(stage, logits).item() == pytest.approx(math.log(2), rel=1e-6)
    # The target side is held fixed: no gradient flows into the deepest stage's logits.
    final = logits.clone().requires_grad_(True)
    df.consistency_loss(stage.clone().requires_grad_(True), final).backward()
    assert final.grad is None


def test_bn_statistics_loss_is_zero_on_matching_statistics():
    torch.manual_seed(0)
    net = MultiLabelNet(1, 2, widths=(4, 4)).eval()
    bn = net.blocks[1][1]
    h = torch.randn(64, 4, 14, 14) * 2 + 1
    with torch.no_grad():
        x = net.blocks[1][0](h)  # what the BN layer sees: the conv's output
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    _, logits, loss = df.bn_statistics_loss(net, h, 1)
    assert loss.item() < 1e-4 and logits.shape == (64, 2)
    _, _, far = df.bn_statistics_loss(net, h + 3, 1)
    assert far.item() > 1.0


def test_label_conditioned_generator_draws_targets_and_the_one_hot_loss_follows_them():
    specs = _teachers((8, 16), (8, 16))
    cfg = _tiny(specs, label_rate=0.3)
    nets = [s.model for s in specs]
    gen, filters = df.build_generator(cfg, specs)
    torch.manual_seed(0)
    z, y = gen.draw(4000)
    assert y.shape == (4000, 5) and set(y.unique().tolist()) == {0.0, 1.0} and (y.sum(1) >= 1).all()
    # Each label on with chance 0.3, plus the forced one for the draws that came out empty (0.7^5 = 17%).
    assert 0.3 < y.mean().item() < 0.3 + 0.17 / 5 + 0.02
    with pytest.raises(ValueError, match="label-conditioned"):
        gen(z[:2])
    # The one-hot term is each teacher's BCE to its own labels' part of y (teacher b holds labels 3, 4).
    z, y = z[:8], y[:8]
    w = {"w_activation": 0.0, "w_entropy": 0.0, "w_sparsity": 0.0, "w_consistency": 0.0, "w_bn": 0.0,
         "w_modeseek": 0.0}
    total, _ = df.generator_loss(gen.eval(), filters, specs, z, 2, df.DataFreeConfig(**{**cfg.__dict__, **w}), y=y)
    with torch.no_grad():
        x = gen(z, y=y)[-1]
        img = F.binary_cross_entropy_with_logits(nets[0](x), y[:, :3]) + F.binary_cross_entropy_with_logits(nets[1](x), y[:, 3:])
        h = gen(z, 1, y)[0]
        feat = sum(F.binary_cross_entropy_with_logits(n.forward_from(filters[0][m](h), 1), y[:, c])
                   for m, (n, c) in enumerate(zip(nets, ([0, 1, 2], [3, 4]))))
    assert total.item() == pytest.approx((img + feat).item(), rel=1e-5)
    # The paper's form: no labels drawn, and the generator takes noise alone.
    plain, _ = df.build_generator(df.DataFreeConfig(**{**cfg.__dict__, **df.PAPER_RECIPE}), specs)
    assert plain.draw(3)[1] is None and plain(torch.randn(3, cfg.latent))[-1].shape == (3, *IN)


def test_mode_seeking_pairs_targets_and_rewards_distance_per_unit_of_noise():
    specs = _teachers((8, 16), (8, 16))
    off = {"w_onehot": 0.0, "w_activation": 0.0, "w_entropy": 0.0, "w_sparsity": 0.0, "w_consistency": 0.0, "w_bn": 0.0}
    cfg = _tiny(specs, w_modeseek=2.0, **off)
    gen, filters = df.build_generator(cfg, specs)
    torch.manual_seed(0)
    z, y = gen.draw(6)
    total, parts = df.generator_loss(gen.eval(), filters, specs, z, 2, cfg, y=y)
    with torch.no_grad():
        x = gen(z, y=torch.cat([y[:3], y[:3]]))[-1]  # the second half drawn for the first half's targets
    ms = (x[:3] - x[3:]).abs().mean() / (z[:3] - z[3:]).abs().mean()
    assert parts["modeseek"] == pytest.approx(ms.item(), rel=1e-5)
    assert total.item() == pytest.approx(-2.0 * ms.item(), rel=1e-5)
    # Only the image stage seeks modes; off in the paper's recipe.
    assert "modeseek" not in df.generator_loss(gen, filters, specs, z, 1, cfg, y=y)[1]
    assert df.PAPER_RECIPE["w_modeseek"] == 0.0


def test_random_shift_rolls_each_image_by_its_own_offset():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 6, 7)
    out = df.random_shift(x)
    offsets = set()
    for i in range(16):
        found = [(a, b) for a in range(6) for b in range(7) if torch.equal(torch.roll(x[i], (a, b), (1, 2)), out[i])]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 8  # offsets drawn per image, not one for the batch


def test_random_warp_turns_each_image_about_the_centre():
    x = torch.zeros(8, 1, 21, 21)
    x[:, :, 6:15, 9:12] = 1.0  # a centred vertical bar
    assert torch.equal(df.random_warp(x, 0.0, 0.0, 0.0), x)
    torch.manual_seed(0)
    out = df.random_warp(x, 40.0, 0.2, 0.2)
    grid = torch.arange(21.0)
    for img in out[:, 0]:
        mass = img.sum()
        centre = ((img.sum(1) * grid).sum() / mass, (img.sum(0) * grid).sum() / mass)
        assert abs(centre[0] - 10) < 0.5 and abs(centre[1] - 10) < 0.5  # the map fixes the centre
        assert not torch.allclose(img, x[0, 0], atol=0.1)  # but moves the bar
    # Each image gets its own map: no two of the eight are the same.
    assert min((out[i] - out[j]).abs().max() for i in range(8) for j in range(i)) > 0.05


def test_reverse_grad_negates_and_scales_the_gradient():
    x = torch.randn(3, requires_grad=True)
    y = df._ReverseGrad.apply(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_adversarial_finetune_moves_the_generator_and_the_plain_one_does_not():
    specs = _teachers((8, 16), (8, 16))
    moved = {}
    for w_adv in (0.0, 1.0):
        torch.manual_seed(0)
        result = df.datafree(_tiny(specs, w_adv=w_adv, gen_epochs=0, image_epochs=0), specs)
        gen = result.generator
        torch.manual_seed(0)
        fresh, _ = df.build_generator(_tiny(specs), specs)
        moved[w_adv] = max((p - q).abs().max().item() for p, q in zip(gen.parameters(), fresh.parameters()))
        assert not any(p.requires_grad for p in gen.parameters())  # frozen again for sampling
    # No generator epochs: only the adversarial fine-tune can change the generator's weights.
    assert moved[0.0] == 0.0 and moved[1.0] > 1e-4


# ---------------------------------------------------------------------------------------- runs
def test_runs_on_teachers_alone(monkeypatch, tmp_path):
    """The recipe takes no data set: any attempt to load or draw one fails the test."""
    from sdb_core import data
    from sdb_core.data import composites

    def forbidden(*a, **k):
        raise AssertionError("the data-free recipe touched a data set")

    monkeypatch.setattr(composites, "make_composites", forbidden)
    monkeypatch.setattr(data, "load_dataset", forbidden)
    specs = _teachers((8, 16), (8, 16))
    seen = []
    cfg = _tiny(specs, grid_dir=str(tmp_path / "grids"), checkpoint_dir=str(tmp_path / "ckpt"))
    result = df.datafree(cfg, specs, phase=lambda name: seen.append(name) or (lambda p: None))
    assert result.student(torch.zeros(3, *IN)).shape == (3, 2) and result.target == [2, 3]
    assert seen == ["generator_stage1", "generator_stage2", "student_block1", "student_block2", "student_finetune"]
    assert {p.name for p in result.grids} == {"grid_generator_stage1.png", "grid_generator_stage2.png", "grid_final.png"}
    assert all(p.stat().st_size > 100 for p in result.grids)
    assert (tmp_path / "ckpt" / "student_finetune.pt").is_file()


def test_cancel_stops_the_run():
    specs = _teachers((8, 16), (8, 16))
    with pytest.raises(Cancelled):
        df.datafree(_tiny(specs), specs, should_cancel=lambda: True)


def test_student_beats_untrained_on_real_composites():
    """Teachers trained on real composites; the student, from their weights alone, scores well above an
    untrained student of the same architecture on real test composites. One-cell composites (28 px, one
    digit each) keep it fast; the 2x2 ones are the benchmark's."""
    from sdb_core.data.composites import make_composites

    x, y = make_composites(2000, split="train", grid=1, seed=0)
    xt, yt = make_composites(500, split="test", grid=1, seed=0)
    sets = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    target = [1, 3, 6, 8]
    specs = []
    for i, labels in enumerate(sets):
        torch.manual_seed(i)
        t = MultiLabelNet(1, len(labels), widths=(8, 16, 32))
        train_multilabel(t, x, y[:, labels], TrainConfig(epochs=4, lr=3e-3, optimizer="adam", weight_decay=0))
        specs.append(df.TeacherSpec(f"t{i}", t.eval(), labels))
    cfg = df.DataFreeConfig(target=target, in_shape=(1, 28, 28), student_widths=(8, 16, 16),
                            latent=32, gen_samples=2048, gen_epochs=2, image_epochs=2, student_samples=2048,
                            block_epochs=1, finetune_epochs=3, device="cpu")
    torch.manual_seed(0)
    xt = torch.as_tensor(xt)
    untrained = mean_average_precision(predict_probs(df.new_student(cfg, specs), xt), yt[:, target])
    trained = mean_average_precision(predict_probs(df.datafree(cfg, specs).student, xt), yt[:, target])
    assert trained > untrained + 10.0, (trained, untrained)

"""Devices without a GPU, recipe by recipe: where each helper sends its tensors (see test_devices.py).

A network "elsewhere" keeps its weights on torch's ``meta`` device; an elementwise op that mixes them with a
CPU tensor raises as a CUDA network given a CPU tensor does (a convolution would not: hence the product in
``Elsewhere.forward``). Where a helper's own answer has to come back from the network's device, the only
failure left is reading it out of ``meta`` (a copy, ``.item()``): that is what "the input went to the
network" looks like here, where a device mix-up raises "Tensor on device meta is not on the expected device". Training itself runs on the CPU; a teacher elsewhere is what these tests move.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from sdb_core.amalgamate.config import TeacherSpec
from sdb_core.amalgamate.multilabel import MultiLabelNet
from sdb_core.train import TrainConfig, device_of, predict_logits

from .test_devices import META, Elsewhere

CPU_TRAIN = TrainConfig(epochs=1, batch_size=4, lr=1e-3, optimizer="adam", weight_decay=0.0, device="cpu")
READ_BACK = r"(Cannot copy out of|cannot be called on) meta tensor"  # an answer computed there, read back


class BuffersElsewhere(Elsewhere):
    """The same, its weights buffers and no parameter at all (an ONNX graph read back: ``OnnxModule``)."""

    def __init__(self, in_features: int, out: tuple[int, ...]):
        nn.Module.__init__(self)
        self.register_buffer("w", torch.empty(in_features, device=META))
        self.out = out


class Graded(nn.Module):
    """Weights on ``meta``; its output depends on the input, so a gradient can be taken (on ``meta``)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.body = nn.Flatten()
        self.w = nn.Parameter(torch.empty(in_features, device=META))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) * self.w).sum(1, keepdim=True)


# ---- where a network lives ------------------------------------------------------------------------

def test_a_network_of_buffers_lives_where_its_buffers_are():
    """``device_of`` read parameters only: a network made of buffers (a bundle's graph for DEPARA) moved to the
    GPU was taken for a CPU one, and every helper left its input on the CPU."""
    net = BuffersElsewhere(4, (3,))
    assert list(net.parameters()) == [] and device_of(net) == META
    x = torch.rand(5, 1, 2, 2)
    out = predict_logits(net, x, batch_size=2)
    assert out.shape == (5, 3) and out.device == x.device


def test_a_bundle_graph_read_back_lives_where_it_is_moved():
    from sdb_core.bundle import export_onnx
    from sdb_core.onnx_torch import OnnxModule

    graph = OnnxModule(export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (1, 2, 2)))
    assert device_of(graph) == torch.device("cpu")
    assert device_of(graph.to(META)) == META


# ---- distillation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cached", [True, False])
def test_a_distillation_teacher_runs_where_it_lives(cached: bool):
    from sdb_core.distill import distill
    from sdb_core.distill.config import DistillConfig

    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    res = distill(student, TensorDataset(x, y), Elsewhere(16, (3,)),
                  DistillConfig(cache_teacher=cached, train=CPU_TRAIN))
    assert len(res.history.epochs) == 1 and device_of(res.student) == torch.device("cpu")


def test_a_pose_teacher_teaches_from_where_it_lives():
    """Two-stage pose KD (FPD) with a teacher that is not on the student's device: the old step called the
    teacher on the student's batch as it was."""
    from sdb_core.distill.okdhp import train_single
    from sdb_core.models.hourglass import StackedHourglass

    x, y, w = torch.rand(4, 3, 16, 16), torch.rand(4, 17, 4, 4), torch.ones(4, 17)
    student = StackedHourglass(17, width=4, stacks=1, in_shape=(3, 16, 16))
    hist = train_single(student, SimpleNamespace(train=TensorDataset(x, y, w)), CPU_TRAIN,
                        teacher=Elsewhere(3 * 16 * 16, (17, 4, 4)))
    assert len(hist.epochs) == 1 and {"gt", "kd"} <= set(hist.epochs[0])


def test_pose_gflops_are_counted_where_the_network_lives():
    from sdb_core.distill.okdhp import count_gflops
    from sdb_core.models.hourglass import StackedHourglass

    net = StackedHourglass(17, width=4, stacks=2, in_shape=(3, 16, 16))
    here = count_gflops(net, (3, 16, 16))
    assert here > 0 and count_gflops(net.to(META), (3, 16, 16)) == here


# ---- amalgamation ---------------------------------------------------------------------------------

def test_afk_teacher_scores_run_each_teacher_where_it_lives():
    from sdb_core.amalgamate.afk import teacher_scores

    x = torch.rand(6, 1, 4, 4)
    teachers = [TeacherSpec("low", Elsewhere(16, (2,)), [0, 1]), TeacherSpec("high", BuffersElsewhere(16, (2,)), [1, 2])]
    scores = teacher_scores(teachers, x, [2, 0, 1])
    assert scores.shape == (6, 3) and scores.device == x.device
    assert torch.allclose(scores, torch.full((6, 3), 0.5))  # sigmoid(0), label 1 the mean of both teachers


def test_scene_metrics_take_the_images_to_the_network():
    from sdb_core.amalgamate.scene_tasks import evaluate
    from sdb_core.data.scenes import make_scenes

    scenes = make_scenes(3, size=16, num_classes=2, seed=0)
    metrics = evaluate(Elsewhere(3 * 16 * 16, (3, 16, 16)), scenes, num_classes=2)
    assert set(metrics) == {"miou"} and 0.0 <= metrics["miou"] <= 100.0


def _datafree_setup():
    from sdb_core.amalgamate.datafree import DataFreeConfig

    cfg = DataFreeConfig(target=[2, 0, 3], in_shape=(1, 16, 16), student_widths=(4, 4), student_samples=8,
                         batch_size=4, student_lr=1e-3, device="cpu")
    torch.manual_seed(0)
    real = [TeacherSpec("a", MultiLabelNet(1, 2, (4, 4)).eval(), [0, 1]),
            TeacherSpec("b", MultiLabelNet(1, 2, (4, 4)).eval(), [2, 3])]
    elsewhere = [TeacherSpec(t.name, Elsewhere(16 * 16, (2,)), t.labels) for t in real]
    return cfg, real, elsewhere


@pytest.mark.parametrize("source", ["images", "sampler"])
def test_a_datafree_student_learns_from_teachers_where_they_live(source: str):
    """The data-free student's end-to-end stage (and the benchmark's data-driven and noise students): the
    teachers answer where they live, and a sampler's images go to the student's device."""
    from sdb_core.amalgamate.datafree import distill_student, new_student

    cfg, real, elsewhere = _datafree_setup()
    student = new_student(cfg, real)
    drawn = torch.rand(8, 1, 16, 16) if source == "images" else (lambda n: torch.rand(n, 1, 16, 16))
    hist = distill_student(student, elsewhere, cfg, drawn, epochs=1, name="t")
    assert len(hist) == 1 and device_of(student) == torch.device("cpu")


def test_datafree_networks_and_augmentations_stay_on_their_device():
    from sdb_core.amalgamate.datafree import GroupStackGenerator, augment, new_student
    from sdb_core.amalgamate.datafree.networks import _entry_shapes, _output_shapes

    cfg, real, _ = _datafree_setup()
    student = new_student(cfg, real).to(META)  # its branches' label indices (buffers) move with it
    assert student(torch.empty(5, 1, 16, 16, device=META)).shape == (5, 3)
    teacher = MultiLabelNet(1, 2, (4, 4)).to(META)
    assert _output_shapes(teacher, (1, 16, 16)) == [(4, 4, 4), (4, 2, 2)]
    assert _entry_shapes(teacher, (1, 16, 16)) == [(1, 16, 16), (4, 4, 4)]
    gen = GroupStackGenerator(8, [(4, 4, 4), (1, 16, 16)]).to(META)
    x = gen.sample(3)
    assert x.device == META and x.shape == (3, 1, 16, 16)
    assert augment(x, cfg).device == META and augment(x, cfg).shape == x.shape


# ---- transferability (DEPARA) ---------------------------------------------------------------------

def test_depara_features_take_the_probe_to_the_network():
    from sdb_core.transfer.depara import layer_features

    probe = torch.rand(5, 1, 2, 2)
    for net in (Elsewhere(4, (3,)), BuffersElsewhere(4, (3,))):
        feats = layer_features(net, None, probe, batch_size=2)
        assert feats.shape == (5, 3) and feats.device == probe.device
    hooked = nn.Sequential(nn.Identity(), Elsewhere(4, (6,)))  # a named layer: its output, the rest cut short
    assert layer_features(hooked, "1", probe, batch_size=2).shape == (5, 6)


def test_depara_attribution_maps_are_taken_where_the_network_lives():
    """Gradient x input on the network's device: the only failure left on ``meta`` is the map's copy back."""
    from sdb_core.transfer.depara import attribution_maps

    with pytest.raises(NotImplementedError, match=READ_BACK):
        attribution_maps(Graded(12), None, torch.rand(4, 3, 2, 2), batch_size=2)
    with pytest.raises(NotImplementedError, match=READ_BACK):
        attribution_maps(Graded(12), "body", torch.rand(4, 3, 2, 2), batch_size=2, attribution="norm")


# ---- style ----------------------------------------------------------------------------------------

def test_style_losses_take_the_images_to_the_loss_network():
    """The losses every style method reports (``result_losses``, ``StyleCriterion``) with images on one device
    and the loss network on another: the old criterion fed the images to the network as they were."""
    from sdb_core.style.loss_net import LossNetConfig, build_loss_net
    from sdb_core.style.losses import StyleCriterion

    net = build_loss_net(LossNetConfig(width=0.125, last="relu2_1")).to(META)
    style, content, x = torch.rand(3, 16, 16), torch.rand(3, 16, 16), torch.rand(2, 3, 16, 16)
    crit = StyleCriterion(net, style, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"))
    crit.set_content(content)
    c, s = crit.losses(x)
    assert c.device == s.device == META and c.shape == s.shape == ()
    with pytest.raises(RuntimeError, match=READ_BACK):  # the report's floats: computed there, read back
        crit.evaluate(x[0], content)

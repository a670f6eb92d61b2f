"""Hosted bundles read back into the teacher networks they were exported from (amalgamation)."""
from __future__ import annotations

import pytest
import torch

from sdb_core.amalgamate.afk import FilteredStudent
from sdb_core.amalgamate.multilabel import MultiLabelNet
from sdb_core.bundle import export_bundle
from sdb_core.models import create_model
from sdb_core.models.encdec import EncDec
from sdb_core.onnx_torch import teacher_from_bundle


def _perturb_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """Statistics and affine terms far from the identity, so that folding them matters."""
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _export(net, path, shape, mean, std, task, labels=()):
    return export_bundle(net, path, name=path.name, in_shape=shape, mean=mean, std=std, labels=labels, task=task)


def test_a_multilabel_bundle_becomes_its_network_with_the_normalisation_in_front(tmp_path):
    torch.manual_seed(0)
    net = _perturb_batchnorm(MultiLabelNet(1, 5, (8, 12, 16), stem_stride=1))
    path = _export(net, tmp_path / "ml", (1, 56, 56), (0.1,), (0.5,), "multilabel", [str(k) for k in range(5)])
    rebuilt, meta = teacher_from_bundle(path, "multilabel")
    assert meta["name"] == "ml"
    assert rebuilt.widths == (8, 12, 16) and rebuilt.stem_stride == 1 and rebuilt.num_labels == 5
    x = torch.rand(4, 1, 56, 56)
    with torch.no_grad():
        want = net((x - 0.1) / 0.5)
        torch.testing.assert_close(rebuilt(x), want, atol=1e-4, rtol=1e-4)
        # Stage by stage too: the recipes cut the teacher at every block.
        h = rebuilt.features(x)[0]
        torch.testing.assert_close(rebuilt.forward_from(h, 1), want, atol=1e-4, rtol=1e-4)


def test_an_afk_students_gated_head_is_read_as_the_linear_map_it_computes(tmp_path):
    torch.manual_seed(1)
    student = FilteredStudent(1, [2, 7, 9], [8, 8, 8]).eval()
    with torch.no_grad():
        for g in student.gate_logits:
            g.uniform_(-3, 3)  # gates well away from open, so the head really is filtered
    path = _export(student, tmp_path / "st.sdb", (1, 56, 56), (0.0,), (1.0,), "multilabel", ["2", "7", "9"])
    rebuilt, _ = teacher_from_bundle(path, "multilabel")
    x = torch.rand(3, 1, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), student(x), atol=1e-4, rtol=1e-4)


def test_an_encoder_decoder_bundle_becomes_its_staged_network(tmp_path):
    torch.manual_seed(2)
    net = _perturb_batchnorm(EncDec(3, 4, (4, 8, 8), convs=1))
    path = _export(net, tmp_path / "seg", (3, 32, 32), (0.0,) * 3, (1.0,) * 3, "segmentation")
    rebuilt, meta = teacher_from_bundle(path, "encdec")
    assert meta["task"] == "segmentation"
    assert rebuilt.widths == (4, 8, 8) and rebuilt.convs == 1 and rebuilt.stage_names == net.stage_names
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x), atol=1e-4, rtol=1e-4)
        k = rebuilt.index("dec2")
        torch.testing.assert_close(rebuilt.forward_from(net.forward_to(x, k), k), net(x), atol=1e-4, rtol=1e-4)


def test_graphs_of_other_families_are_refused_with_the_reason(tmp_path):
    cnn = _export(create_model("cnn", num_classes=10, in_shape=(1, 28, 28)).eval(), tmp_path / "cnn",
                  (1, 28, 28), (0.0,), (1.0,), "classification")
    seg = _export(EncDec(3, 2, (4, 8)).eval(), tmp_path / "seg", (3, 16, 16), (0.0,) * 3, (1.0,) * 3, "segmentation")
    with pytest.raises(ValueError, match="not a multilabel network"):
        teacher_from_bundle(cnn, "multilabel")
    with pytest.raises(ValueError, match="not an encoder-decoder"):
        teacher_from_bundle(cnn, "encdec")
    with pytest.raises(ValueError, match="not a multilabel network"):
        teacher_from_bundle(seg, "multilabel")
    with pytest.raises(ValueError, match="unknown teacher family"):
        teacher_from_bundle(seg, "resnet")

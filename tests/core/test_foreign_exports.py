"""Models as owners export and save them outside this project: an ONNX classifier answering (features, logits), a
Keras-style graph whose every input axis is free, and checkpoints as EMA, Lightning and timm training save them."""
from __future__ import annotations

import io
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdb_core.models import create_model
from sdb_core.onnx_torch import ChannelsLast, onnx_classifier
from sdb_core.tasks import ModelRef
from sdb_core.weights import WeightsError, load_weights
from tests.onnx_graphs import ViewNet, onnx_bytes, sklearn_mlp


# --------------------------------------------------------------------------- ONNX graphs of several outputs
class FeaturesAndLogits(nn.Module):
    """A classifier of 8x8 images answering its features (``width`` wide) beside its 10 logits, computed from them."""

    def __init__(self, width: int, logits_first: bool = False, aux: int | None = None):
        super().__init__()
        self.conv, self.feats, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 16, width), nn.Linear(width, 10)
        self.aux = nn.Linear(width, aux) if aux else None
        self.logits_first = logits_first

    def features(self, x):
        return F.relu(self.feats(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)))

    def forward(self, x):
        h = self.features(x)
        if self.aux is not None:  # no output of the data's classes: features and an auxiliary head
            return h, self.aux(h)
        z = self.fc(h)
        return (z, h) if self.logits_first else (h, z)


def exported(net: nn.Module, names: list[str], shape=(1, 8, 8), free: dict | None = None) -> bytes:
    """``net`` as torch.onnx.export writes it with named outputs, every one's batch axis free (``free``: the input's
    free axes, its batch by default)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(2, *shape),), buf, input_names=["input"], output_names=names,
                          dynamic_axes={"input": free or {0: "b"}, **{n: {0: "b"} for n in names}}, opset_version=17,
                          dynamo=False)
    return buf.getvalue()


@pytest.mark.parametrize(("width", "logits_first"), [(32, False), (10, False), (32, True)],
                         ids=["features_32_first", "features_10_first", "logits_first"])
def test_of_features_and_logits_the_output_of_the_datas_classes_is_read(width, logits_first):
    """The first output was read whatever its width: 32-wide features were refused as 'the teacher answers shape
    (2, 32)', 10-wide ones as 'classes in another order' (the features' argmax scored 1% on the labels)."""
    torch.manual_seed(0)
    net = FeaturesAndLogits(width, logits_first)
    names = ["logits", "feats"] if logits_first else ["feats", "logits"]
    graph = onnx_classifier(exported(net, names), (1, 8, 8), classes=10)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(graph(x), net.fc(net.features(x)), atol=1e-5)
    assert f"'feats' (N, {width})" in graph.why and "'logits' (N, 10)" in graph.why
    assert "'logits' is read as the scores" in graph.why
    assert ("computed from the others" in graph.why) is (width == 10)


def test_a_wraps_teacher_reference_reads_the_output_of_the_datas_classes(tmp_path):
    """The tasks' way to an ONNX teacher (ModelRef.network, what wrap, distill and audit call with the data's class
    count) passes the count on: it read the first output, the 10-wide features, whatever onnx_classifier could do."""
    torch.manual_seed(0)
    net = FeaturesAndLogits(10)
    (tmp_path / "two.onnx").write_bytes(exported(net, ["feats", "logits"]))
    teacher = ModelRef(weights=str(tmp_path / "two.onnx")).network(10, (1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(teacher(x), net.fc(net.features(x)), atol=1e-5)


def test_outputs_none_of_which_answers_the_classes_are_named_in_the_refusal():
    torch.manual_seed(0)
    model = exported(FeaturesAndLogits(32, aux=12), ["feats", "aux"])
    with pytest.raises(ValueError, match=r"output 'feats', read as its scores \(its first\), answers \(32,\) per "
                                         r"input, and the data has 10 classes: of its outputs, 'feats' \(N, 32\), "
                                         r"'aux' \(N, 12\), none declares \(N, 10\)"):
        onnx_classifier(model, (1, 8, 8), classes=10)


class TwoHeads(nn.Module):
    """Two heads of the data's 10 classes, neither computed from the other: which holds the logits is not known."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 10), nn.Linear(64, 10)

    def forward(self, x):
        return self.a(x.flatten(1)), self.b(x.flatten(1))


def test_of_several_outputs_of_the_datas_classes_the_first_is_read_and_the_log_names_them():
    torch.manual_seed(0)
    net = TwoHeads()
    graph = onnx_classifier(exported(net, ["coarse", "fine"]), (1, 8, 8), classes=10)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(graph(x), net.a(x.flatten(1)), atol=1e-5)
    assert "'coarse' (N, 10), 'fine' (N, 10): 'coarse' is read as the scores (its first)" in graph.why


def test_a_graph_of_one_output_and_a_zipmaps_probabilities_are_read_as_before():
    """The data's class count changes nothing where there is one float output: a classifier's own scores (one of
    another width is left to the teacher's check), skl2onnx's probabilities behind a ZipMap."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    for classes, net in ((10, ViewNet(10)), (10, ViewNet(12))):
        graph = onnx_classifier(onnx_bytes(net, (1, 8, 8)), (1, 8, 8), classes=classes)
        with torch.no_grad():
            assert torch.allclose(graph(x), net.eval()(x), atol=1e-5)
    zipped = onnx_classifier(sklearn_mlp(zipmap=True), (64,), classes=10)
    assert "ZipMap" in zipped.why and "ends in a Softmax" in zipped.why
    assert zipped(torch.randn(3, 64)).shape == (3, 10)


# --------------------------------------------------------------------------- a channels-last graph, every axis free
class TakesChannelsLast(nn.Module):
    """A network taking (N, H, W, C), as Keras' exports do."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(channels, 4, 3, padding=1), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x.permute(0, 3, 1, 2))).mean((2, 3)))


FREE = {0: "b", 1: "h", 2: "w", 3: "c"}


def test_a_channels_last_graph_whose_every_axis_is_free_gets_its_images_channels_last():
    """Its input (b, h, w, c) fits channels first as well: it was given (N, 1, 8, 8) and the owner saw ONNX Runtime's
    Conv error alone."""
    torch.manual_seed(0)
    net = TakesChannelsLast()
    graph = onnx_classifier(exported(net, ["logits"], (8, 8, 1), FREE), (1, 8, 8))
    assert isinstance(graph, ChannelsLast) and "channels last" in graph.why
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(graph(x), net(x.permute(0, 2, 3, 1)), atol=1e-5)


def test_a_graph_of_free_axes_that_runs_neither_way_says_the_layout_is_the_likely_cause():
    model = exported(TakesChannelsLast(channels=3), ["logits"], (8, 8, 3), FREE)
    with pytest.raises(ValueError, match=r"ONNX Runtime cannot run the graph .*leaves its axes free, so the layout is "
                                         r"the likely cause: .*\(N, 1, 8, 8\); given them channels last, "
                                         r"\(N, 8, 8, 1\), it fails too"):
        onnx_classifier(model, (1, 8, 8))


# --------------------------------------------------------------------------- checkpoints as training saves them
def cnn() -> nn.Module:
    return create_model("cnn", num_classes=10, in_shape=(1, 8, 8))


def same_weights(net: nn.Module, state: dict) -> bool:
    return all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_an_averaged_models_ema_state_dict_loads_its_averaged_network(tmp_path):
    """AveragedModel's state dict is 'module.*' and its count 'n_averaged': refused as 9 tensors the model lacks."""
    torch.manual_seed(0)
    net = cnn()
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update_parameters(net)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    loaded = ModelRef(arch="cnn", weights=str(tmp_path / "ema.pt")).network(10, (1, 8, 8))
    assert same_weights(loaded, ema.module.state_dict())
    assert "AveragedModel" in loaded.why and "'n_averaged' left out" in loaded.why


def test_a_lightning_checkpoint_with_a_loss_buffer_beside_the_network_loads_the_network(tmp_path):
    """A LightningModule holding nn.CrossEntropyLoss(weight=...) saves 'criterion.weight' beside 'model.*'."""
    torch.manual_seed(0)
    sd = cnn().state_dict()
    state = {**{"model." + k: v for k, v in sd.items()}, "criterion.weight": torch.ones(10)}
    torch.save({"epoch": 3, "global_step": 60, "state_dict": state, "hyper_parameters": {"lr": 0.1}},
               tmp_path / "lightning.ckpt")
    loaded = load_weights(cnn(), tmp_path / "lightning.ckpt")
    assert same_weights(loaded, sd)
    assert "under 'model.' are the network's" in loaded.why and "'criterion.weight' left out" in loaded.why
    # a part is taken only where it is exactly the network: one tensor missing, the whole file is refused as before
    del state["model.classifier.3.bias"]
    torch.save({"state_dict": state}, tmp_path / "short.ckpt")
    with pytest.raises(WeightsError, match="do not fit"):
        load_weights(cnn(), tmp_path / "short.ckpt")


def test_timms_checkpoint_with_an_ema_copy_reads_the_trained_weights_and_says_so(tmp_path):
    torch.manual_seed(0)
    trained, averaged = cnn().state_dict(), cnn().state_dict()
    torch.save({"state_dict": trained, "state_dict_ema": averaged, "epoch": 8}, tmp_path / "timm.pth.tar")
    loaded = load_weights(cnn(), tmp_path / "timm.pth.tar")
    assert same_weights(loaded, trained)
    assert "'state_dict' and 'state_dict_ema': 'state_dict' is read" in loaded.why
    plain = load_weights(cnn(), _saved(tmp_path / "plain.pt", trained))
    assert not hasattr(plain, "why")  # nothing taken from a checkpoint: nothing to say


def _saved(path, obj):
    torch.save(obj, path)
    return path


class HParams(dict):
    """A training script's hyper-parameters as a class of its own (Lightning's AttributeDict is one)."""


def test_a_checkpoint_holding_objects_beside_its_weights_is_not_called_a_whole_network(tmp_path, monkeypatch):
    """torch.load(weights_only=True) refuses the file for its hyper-parameters' class, not its weights: it was
    refused as 'a whole network saved with torch.save(model)?'."""
    sd = cnn().state_dict()
    torch.save({"state_dict": sd, "hyper_parameters": HParams(lr=0.1)}, tmp_path / "own.ckpt")
    with pytest.raises(WeightsError, match=r"holds pickled Python objects beside its weights \(tests.core."
                                           r"test_foreign_exports.HParams: classes torch.load\(weights_only=True\) "
                                           r"refuses\).*torch.save\(model.state_dict\(\)\)") as e:
        load_weights(cnn(), tmp_path / "own.ckpt")
    assert "whole network" not in str(e.value) and "Lightning" not in str(e.value)
    # Lightning's own class, as its save_hyperparameters() writes it (the module made here: Lightning is not installed)
    module = types.ModuleType("lightning.fabric.utilities.data")
    attribute_dict = type("AttributeDict", (dict,), {"__module__": module.__name__})
    module.AttributeDict = attribute_dict
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    torch.save({"state_dict": sd, "hyper_parameters": attribute_dict(lr=0.1)}, tmp_path / "lightning.ckpt")
    with pytest.raises(WeightsError, match=r"AttributeDict: a Lightning checkpoint's hyper_parameters saved as a "
                                           r"class"):
        load_weights(cnn(), tmp_path / "lightning.ckpt")
    torch.save(cnn(), tmp_path / "whole.pt")  # the network itself: its layers are torch.nn classes
    with pytest.raises(WeightsError, match=r"a whole network saved with torch.save\(model\) \(sdb_core.models"):
        load_weights(cnn(), tmp_path / "whole.pt")

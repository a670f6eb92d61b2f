"""Weights files as training scripts save them: wrapped in a checkpoint dict, with a wrapper's prefix on
every name (DataParallel/DDP ``module.``, ``torch.compile`` ``_orig_mod.``, Lightning ``model.``)."""
from __future__ import annotations

import pytest
import torch

from sdb_core.models import create_model
from sdb_core.weights import WeightsError, load_weights, save_weights


@pytest.mark.parametrize("saved", [
    lambda sd: sd,
    lambda sd: {"module." + k: v for k, v in sd.items()},
    lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},
    lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3, "global_step": 120},
    lambda sd: {"model": {k: v.half() for k, v in sd.items()}},
    lambda sd: {"epoch": 9, "model_state_dict": sd, "optimizer_state_dict": {}},  # PyTorch's tutorials
])
def test_a_checkpoint_as_training_scripts_save_it_loads(tmp_path, saved):
    torch.manual_seed(0)
    trained = create_model("resnet8", num_classes=10, in_shape=(1, 28, 28))
    torch.save(saved(trained.state_dict()), tmp_path / "w.pt")
    fresh = load_weights(create_model("resnet8", num_classes=10, in_shape=(1, 28, 28)), tmp_path / "w.pt")
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(fresh.eval()(x), trained.eval()(x), atol=0.05)  # half-precision copies round


def test_a_prefix_is_not_cut_when_the_names_still_do_not_fit(tmp_path):
    sd = create_model("resnet8", num_classes=10, in_shape=(1, 28, 28)).state_dict()
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"the first 'module.fc.weight' \('fc.weight' in the model\): \[10, \d+\] in "
                                           r"the file, \[3, \d+\] in the model") as e:
        load_weights(create_model("resnet8", num_classes=3, in_shape=(1, 28, 28)), tmp_path / "w.pt")
    assert "\n" not in str(e.value) and "number of classes" in str(e.value)  # one line, saying what to check
    torch.save({"encoder." + k: v for k, v in sd.items() if not k.startswith("fc.")}, tmp_path / "part.pt")
    with pytest.raises(WeightsError, match="of the model not in the file"):
        load_weights(create_model("resnet8", num_classes=10, in_shape=(1, 28, 28)), tmp_path / "part.pt")


def test_a_prefix_the_network_itself_has_is_kept(tmp_path):
    """A network whose own names all start with ``net.``: a state dict that misses one of them is refused
    with the names as saved, not cut to names that fit nothing."""
    wrapper = torch.nn.Sequential()
    wrapper.add_module("net", torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    state = {k: v for k, v in wrapper.state_dict().items() if k != "net.1.bias"}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="1 tensor\\(s\\) of the model not in the file, the first 'net.1.bias'"):
        load_weights(wrapper, tmp_path / "w.pt")


def test_a_file_of_other_names_says_so_with_the_files_own_names(tmp_path):
    """The wrapper's prefix was cut before the message named the file's tensors: 'net.1.bias' showed as '1.bias'."""
    mlp = torch.nn.Sequential()
    mlp.add_module("net", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))
    torch.save(mlp.state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="in the file the model lacks, the first 'net.1.weight'"):
        load_weights(create_model("resnet8", num_classes=10, in_shape=(1, 28, 28)), tmp_path / "w.pt")


def test_files_that_are_not_weights_are_named_for_what_they_are(tmp_path):
    """torch.load's own words were passed on: for a pickled module its advice to unpickle (with terminal colour
    codes), for a text file "101", for an ONNX model not named .onnx a pickle error."""
    net = create_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(WeightsError, match=r"pickled Python objects.*model.state_dict\(\)") as e:
        load_weights(net, tmp_path / "whole.pt")
    assert "weights_only=False" not in str(e.value) and "\x1b" not in str(e.value)
    (tmp_path / "notes.txt").write_text("epoch 3: 97.1%")
    with pytest.raises(WeightsError, match=r"neither a safetensors file nor a state dict saved by torch.save \(\w+"):
        load_weights(net, tmp_path / "notes.txt")
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 8, 8),), str(tmp_path / "model.bin"), dynamo=False)
    with pytest.raises(WeightsError, match=r"is an ONNX model, not weights: name it \*.onnx"):
        load_weights(net, tmp_path / "model.bin")


@pytest.mark.parametrize("name", ["teacher.pt", "student.pth", "weights"])
def test_weights_saved_under_any_name_load_back(tmp_path, name):
    """save_weights writes safetensors whatever the suffix (``sdb wrap --save-teacher t.pt``, ``sdb distill --out
    x.pt``); they were then read with torch.load for not being named .safetensors, and refused."""
    torch.manual_seed(0)
    trained = create_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    fresh = load_weights(create_model("cnn", num_classes=10, in_shape=(1, 8, 8)),
                         save_weights(trained, tmp_path / name))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), trained.eval()(x))

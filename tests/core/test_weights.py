"""Weights files as training scripts save them: wrapped in a checkpoint dict, with a wrapper's prefix on
every name (DataParallel/DDP ``module.``, ``torch.compile`` ``_orig_mod.``, Lightning ``model.``)."""
from __future__ import annotations

import pytest
import torch

from sdb_core.models import create_model
from sdb_core.weights import WeightsError, load_weights


@pytest.mark.parametrize("saved", [
    lambda sd: sd,
    lambda sd: {"module." + k: v for k, v in sd.items()},
    lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},
    lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3, "global_step": 120},
    lambda sd: {"model": {k: v.half() for k, v in sd.items()}},
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
    with pytest.raises(WeightsError, match=r"the first fc.weight: \[10, \d+\] in the file, \[3, \d+\] in the model") as e:
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

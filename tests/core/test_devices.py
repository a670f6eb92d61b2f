"""Devices without a GPU: one way to choose a device, and inputs that reach the network's device.

A network "elsewhere" keeps its weights on torch's ``meta`` device (shapes, no data): an op that mixes
them with a CPU tensor raises as it would with a CUDA one, so a helper that forgets to move its input
fails here as it failed on CUDA. Nothing can be copied out of ``meta``, so such a network answers with
zeros on the CPU: what these tests check is where the input goes, not the copy back.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from sdb_core.amalgamate.multilabel import predict_probs
from sdb_core.amalgamate.scene_tasks import predict_tasks
from sdb_core.distill.pose_metrics import predict_heatmaps
from sdb_core.protect.box import SafeDistillationBox
from sdb_core.train import device_of, pick_device, predict_logits

ROOT = Path(__file__).resolve().parents[2]
META = torch.device("meta")


class Elsewhere(nn.Module):
    """Weights on ``meta``; ``out`` is the per-sample output shape."""

    def __init__(self, in_features: int, out: tuple[int, ...]):
        super().__init__()
        self.w = nn.Parameter(torch.empty(in_features, device=META))
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1) * self.w  # raises when x is not on the weights' device (a matmul would not)
        return torch.zeros(len(h), *self.out)

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        return {"seg": self(x)}


def test_the_one_device_helper():
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda:0")
    assert device_of(Elsewhere(4, (3,))) == META and device_of(nn.ReLU()) == torch.device("cpu")


def test_predict_logits_moves_the_input_to_the_network_and_answers_on_the_inputs_device():
    x = torch.rand(7, 1, 2, 2)
    with pytest.raises(RuntimeError, match="device"):
        Elsewhere(4, (3,))(x)  # what every helper below must avoid
    for out in (predict_logits(Elsewhere(4, (3,)), x, batch_size=3), predict_probs(Elsewhere(4, (3,)), x)):
        assert out.shape == (7, 3) and out.device == x.device and out.dtype == torch.float32
    seen = []
    # Any other callable (a box's path, an API) gets the input where it is and places its work itself.
    predict_logits(lambda b: seen.append(b.device) or torch.zeros(len(b), 2), x, batch_size=4)
    assert seen == [x.device, x.device]


def test_a_box_runs_where_its_network_lives_and_answers_on_the_inputs_device():
    box = SafeDistillationBox(Elsewhere(4, (10,)), key=torch.rand(1, 2, 2), lam=0.5)
    x = torch.rand(5, 1, 2, 2)
    for out in (box.public_logits(x), box.distill_logits(x), box.predict(x)):
        assert out.shape == (5, 10) and out.device == x.device


def test_pose_and_scene_predictions_move_the_images_to_the_network():
    images = torch.rand(9, 1, 2, 2)
    heat = predict_heatmaps(Elsewhere(4, (17, 1, 1)), SimpleNamespace(images=images), batch_size=4)
    assert heat.shape == (9, 17, 1, 1) and heat.device == images.device
    tasks = predict_tasks(Elsewhere(4, (3, 2, 2)), images, batch_size=4)
    assert tasks["seg"].shape == (9, 3, 2, 2) and tasks["seg"].device == images.device


# A device is chosen by sdb_core.train.pick_device (a config's "auto" | "cpu" | "cuda:N") and read by
# device_of; nothing else in the library names one, asks torch.cuda, or reads a parameter's device itself.
CHOOSING = re.compile(r"torch\.cuda|\.cuda\(|device\s*=\s*[\"']|torch\.device\(|parameters\(\)\)?\)?(, [^)]*\))?\.device")


def test_sdb_core_chooses_devices_through_the_one_helper():
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in sorted((ROOT / "sdb_core").rglob("*.py")) if p.name != "train.py"
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if CHOOSING.search(line.split("#", 1)[0])]
    assert found == []

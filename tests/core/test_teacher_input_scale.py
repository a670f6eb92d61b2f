"""A given teacher is scored on the inputs the box gives it before any training, and under the usual other input
conventions when its normalisation was not given: one trained on pixels in [0, 1] (a ToTensor without Normalize)
and given without --teacher-mean/--teacher-std scored 54 % as the box fed it (96 % on its own scale), passed the
check (5 points above chance) and shipped a box of that crippled teacher."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sdb_core.bundle import export_onnx
from sdb_core.data import load_dataset
from sdb_core.progress import Hooks
from sdb_core.protect.teacher import Renormalized
from sdb_core.tasks.wrap import WrapTask, _require_learned, run
from sdb_core.train import TrainConfig, accuracy, seed_everything, train_classifier

# (mean, std) of (raw - mean) / std on pixels in [0, 1]: --teacher-mean/--teacher-std; None: the data's own
PIXELS, BYTES = ((0.0,), (1.0,)), ((0.0,), (1.0 / 255.0,))


class Pooled(nn.Module):
    """A small CNN without normalisation layers ending in a global average pool, as owners write them: unlike the
    zoo's BatchNorm networks, it answers well only on the scale it was trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class Checked(Exception):  # not an error: the wrap got past its teacher check
    """Raised from the wrap's log at its line after the teacher check: the check passed, no box is trained."""


@pytest.fixture(scope="module")
def teachers(digits, tmp_path_factory):
    """ONNX files of :class:`Pooled` trained on digits normalised each way, by (mean, std) (None: the data's own)."""
    root, made = tmp_path_factory.mktemp("scales"), {}

    def make(norm):
        if norm not in made:
            x, y = digits.train.tensors
            if norm is not None:  # the data's inputs back to pixels in [0, 1], then normalised as the owner did
                (dm, ds), (m, s) = ((torch.tensor(v).view(1, -1, 1, 1) for v in pair)
                                    for pair in ((digits.mean, digits.std), norm))
                x = ((x * ds + dm) - m) / s
            seed_everything(0)
            net = Pooled()
            train_classifier(net, TensorDataset(x, y), TrainConfig(epochs=10, lr=3e-3, optimizer="adam", seed=0,
                                                                   device="cpu"))
            path = root / f"teacher{len(made)}.onnx"
            path.write_bytes(export_onnx(net.eval(), digits.in_shape))
            made[norm] = str(path)
        return made[norm]

    return make


def _wrap_until_checked(path: str, tmp_path, **norm) -> str:
    """Run the wrap of the ONNX teacher ``path`` on digits (``norm``: its teacher_mean/teacher_std, as the CLI and
    a job give them) up to its teacher check: the line it logs after it, or its refusal (ValueError)."""
    def log(line: str) -> None:
        if line.startswith("teacher "):
            raise Checked(line)

    phases = []
    task = WrapTask.from_options("digits", None, teacher=path, epochs=1, **norm)
    try:
        run(task, tmp_path / "box", Hooks(phase=phases.append, log=log), master_key=b"k" * 32)
    except ValueError:
        assert phases == [] and not (tmp_path / "box").exists()  # refused before any epoch, nothing written
        raise
    except Checked as e:
        return str(e)
    raise AssertionError("the wrap went past its teacher check without logging it")


@pytest.mark.parametrize(("norm", "convention", "flags", "job"), [
    (PIXELS, r"pixels in \[0, 1\], not normalised", "--teacher-mean 0 --teacher-std 1",
     "teacher.mean [0], teacher.std [1]"),
    (BYTES, r"pixels in 0-255", "--teacher-mean 0 --teacher-std 0.0039215686",
     "teacher.mean [0], teacher.std [0.0039215686]"),
], ids=["pixels-0-1", "pixels-0-255"])
def test_a_teacher_trained_on_other_inputs_and_given_without_them_is_refused_naming_the_flags(
        teachers, tmp_path, norm, convention, flags, job):
    with pytest.raises(ValueError) as e:
        _wrap_until_checked(teachers(norm), tmp_path)
    message = str(e.value)
    scores = re.match(r"the teacher scores (\d+\.\d)% on the data's training inputs as the box gives them \(normalised "
                      r"per channel by the training split's mean and std \(0\.\d+\), \(0\.\d+\)\), (\d+\.\d)% given "
                      rf"{convention}", message)
    assert scores, message
    assert f"sdb wrap {flags} (a job's {job})" in message
    assert "If it does take the data's own normalisation, give that: --teacher-mean 0.30" in message
    given, right = (float(s) for s in scores.groups())
    assert right >= given + 15 and right > 70


def test_the_same_teacher_given_its_normalisation_is_accepted(teachers, tmp_path):
    line = _wrap_until_checked(teachers(PIXELS), tmp_path, teacher_mean=PIXELS[0], teacher_std=PIXELS[1])
    assert float(line.split("test accuracy ")[1].rstrip("%")) > 70, line


def test_a_teacher_trained_on_the_datas_own_normalisation_is_accepted(teachers, tmp_path):
    line = _wrap_until_checked(teachers(None), tmp_path)
    assert float(line.split("test accuracy ")[1].rstrip("%")) > 70, line


def test_a_tabular_teacher_of_raw_features_is_refused_naming_them_and_accepted_when_told(digits, tmp_path):
    # An owner's pipeline that standardises the raw features itself (a StandardScaler first), given the features the
    # box standardised: scaled twice, it answered 44 % where it scores 100 % on them raw.
    x, y = digits.train.tensors
    raw = (x * torch.tensor(digits.std) + torch.tensor(digits.mean)).flatten(1) * 16  # load_digits' 0..16
    np.savez(tmp_path / "features.npz", x=raw.numpy(), y=y.numpy())
    data = load_dataset(f"npz:{tmp_path / 'features.npz'}")
    mean, std = (torch.tensor(v) for v in (data.mean, data.std))
    own = nn.Linear(64, 10)  # the nearest class mean of the standardised features
    means = torch.stack([data.train.tensors[0][data.train.tensors[1] == c].mean(0) for c in range(10)])
    with torch.no_grad():
        own.weight.copy_(means)
        own.bias.copy_(-means.pow(2).sum(1) / 2)

    class Pipeline(nn.Module):
        def forward(self, features):
            return own((features - mean) / std)

    assert _require_learned(own.eval(), data) is not None  # on the box's inputs: accepted
    with pytest.raises(ValueError, match=r"the teacher scores \d+\.\d% on the data's training inputs .*, \d+\.\d% "
                                         r"given the data's raw values \(not standardised\).* sdb wrap --teacher-mean "
                                         r"0 --teacher-std 1 \(a job's teacher.mean \[0\], teacher.std \[1\]\)"):
        _require_learned(Pipeline().eval(), data)
    told = Renormalized(Pipeline(), (data.mean, data.std), ((0.0,), (1.0,)), data.in_shape)  # as ModelRef.network
    assert accuracy(_require_learned(told, data, normalisation_given=True), data.test) > 85

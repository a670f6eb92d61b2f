"""The training loop on a GPU: batches cut where the model trains, and no step that waits for the device.

Each read of a device value (``.item()``, ``bool(t)``, ``float(t)``, a copy to the host) makes the host wait
until the device has finished everything queued, so the device then idles while the host prepares the next
step. These tests run on the CPU, where nothing waits, and count the reads sdb_core's own code makes: a run of
three epochs may make a few more than a run of one (a read per epoch), never one more per step.
"""
import collections
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

import sdb_core
from sdb_core import train
from sdb_core.distill import DistillConfig, distill
from sdb_core.models import create_model
from sdb_core.protect import SDBConfig, random_keys, train_box
from sdb_core.train import TensorBatches, TrainConfig, fit, train_classifier

PACKAGE = str(Path(sdb_core.__file__).parent)
READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


class CountReads(TorchFunctionMode):
    """Counts reads of tensor values made by code of the sdb_core package (the optimizers' own reads of their
    step counters, host tensors on any device, are torch's)."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                self.where[f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


def _reads(run, epochs: int) -> int:
    with CountReads() as count:
        run(epochs)
    return sum(count.where.values())


@pytest.fixture
def no_timed_reports(monkeypatch):
    monkeypatch.setattr(train, "REPORT_SECONDS", float("inf"))  # reads at epoch ends only: counts that hold on any machine


def test_batches_of_a_tensor_set_are_those_a_shuffling_dataloader_gives():
    x, y = torch.randn(103, 3, 4, 4), torch.randint(0, 5, (103,))
    extra = torch.randn(103, 7).double()
    data = TensorDataset(x, y, extra)
    ours = TensorBatches(data, 16, torch.Generator().manual_seed(3), torch.device("cpu"))
    theirs = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert len(ours) == len(theirs) == 7
    for _ in range(3):  # epochs: each draws from the generator as DataLoader does
        pairs = list(zip(ours, theirs, strict=True))
        for a, b in pairs:
            assert all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(a, b, strict=True))
    assert [len(a[0]) for a, _ in pairs] == [16] * 6 + [7]


@pytest.mark.parametrize("recipe", ["train_classifier", "sdb", "distill"])
def test_no_step_reads_a_value_back(recipe, digits, digits_teacher, no_timed_reports):
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.01)  # ~45 steps an epoch
    key = random_keys(1, digits.in_shape, digits.mean, digits.std, generator=torch.Generator().manual_seed(7))[0]

    def run(epochs):
        c = TrainConfig(**{**cfg.__dict__, "epochs": epochs})
        if recipe == "train_classifier":
            train_classifier(create_model("cnn", num_classes=10, in_shape=digits.in_shape), digits.train, c, shift=1)
        elif recipe == "sdb":
            train_box(digits_teacher, digits, SDBConfig(train=c), key=key)
        else:
            distill(create_model("mlp", num_classes=10, in_shape=digits.in_shape), digits.train, digits_teacher,
                    DistillConfig(train=c))

    steps = len(digits.train) // 32
    one, three = _reads(run, 1), _reads(run, 3)
    assert steps >= 40
    assert three - one <= 2 * 6, f"{three - one} more reads for {2 * steps} more steps"


def test_a_loss_that_turns_nan_stops_training_and_names_its_step(no_timed_reports):
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    net = torch.nn.Linear(4, 2)
    calls = []

    def step(batch):
        calls.append(1)
        loss = F.cross_entropy(net(batch[0]), batch[1])
        return loss * float("nan") if len(calls) == 7 else loss

    with pytest.raises(FloatingPointError, match="loss became nan at epoch 2, step 3"):
        fit(net, TensorDataset(x, y), step, TrainConfig(epochs=3, batch_size=16))
    assert len(calls) == 8  # found at the end of the epoch it happened in: training stops there


def test_a_tensor_set_that_makes_its_own_samples_is_read_through_them():
    # a subclass that augments in __getitem__ is read sample by sample, as DataLoader reads it
    class Flipped(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return -x, y

    x, y = torch.ones(40, 3), torch.zeros(40, dtype=torch.long)
    seen = []
    net = torch.nn.Linear(3, 2)

    def step(batch):
        seen.append(batch[0])
        return F.cross_entropy(net(batch[0]), batch[1])

    fit(net, Flipped(x, y), step, TrainConfig(epochs=1, batch_size=16))
    assert len(seen) == 3 and all(bool((b == -1).all()) for b in seen)


@pytest.mark.parametrize("arch", ["cnn", "lenet", "mlp", "resnet8", "resnet8_gn", "vit_tiny", "wrn16_1"])
def test_the_recipes_three_batches_in_one_call_are_each_batchs_own_logits(arch, monkeypatch):
    # on a GPU the SDB step sends its plain, keyed and random-key batches through the network as one call; in eval
    # mode (how the box trains) each sample's logits are its own, so that is the three calls' answer
    from sdb_core.protect import sdb

    torch.manual_seed(0)
    net = create_model(arch, num_classes=10, in_shape=(3, 32, 32)).eval()
    for m in net.modules():  # running statistics a trained network would have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    batches = [torch.randn(5, 3, 32, 32) for _ in range(3)]
    apart = sdb.three_paths(net, *batches)
    monkeypatch.setattr(sdb, "ONE_CALL_DEVICES", ("cpu",))
    together = sdb.three_paths(net, *batches)
    assert len(together) == 3
    for a, b in zip(apart, together, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_a_box_trained_with_one_call_per_step_is_the_box_of_three(digits, digits_teacher, monkeypatch):
    from sdb_core.protect import sdb

    key = random_keys(1, digits.in_shape, digits.mean, digits.std, generator=torch.Generator().manual_seed(7))[0]
    cfg = SDBConfig(train=TrainConfig(epochs=1, lr=0.01))
    apart = train_box(digits_teacher, digits, cfg, key=key).box.model
    monkeypatch.setattr(sdb, "ONE_CALL_DEVICES", ("cpu",))
    together = train_box(digits_teacher, digits, cfg, key=key).box.model
    for (name, a), (_, b) in zip(apart.state_dict().items(), together.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def test_an_empty_training_set_is_an_error_not_a_run_that_learns_nothing():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="training set is empty"):
        fit(net, TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), lambda b: net(b[0]).sum(),
            TrainConfig(epochs=2))

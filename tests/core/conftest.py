"""Shared fixtures: the digits set and a teacher trained on it once (session-scoped), one torch thread, and the real
app serving a plain digits model."""
import contextlib

import pytest
import torch
from torch import nn

from sdb_core.data import load_dataset
from sdb_core.models import create_model
from sdb_core.train import TrainConfig, seed_everything, train_classifier


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for a test: tiny tensors gain nothing from more, and on a busy 2-core machine two threads
    spin against other processes (pytestmark = pytest.mark.usefixtures("one_torch_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.asynccontextmanager
async def serving_plain_digits(tmp_path, digits, network):
    """The real app on a real store, serving ``network`` as ``plain-digits``: a plain model (no keyed path)."""
    from sdb_core.bundle import export_bundle
    from sdb_core.protect.key import load_or_create_master_key
    from service.settings import Settings
    from tests.service.conftest import start_service

    master_file = tmp_path / "master.key"
    load_or_create_master_key(master_file)
    plain = export_bundle(network, tmp_path / "plain", name="plain-digits", in_shape=digits.in_shape,
                          mean=digits.mean, std=digits.std, labels=digits.labels)
    settings = Settings(data_dir=tmp_path / "data", master_key_file=master_file, ort_intra_op_threads=1,
                        ort_inter_op_threads=1)
    service, manager = await start_service(settings, plain)
    try:
        yield service
    finally:
        await service.client.aclose()
        await manager.__aexit__(None, None, None)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_teacher(digits):
    seed_everything(0)
    teacher = create_model("cnn", num_classes=digits.num_classes, in_shape=digits.in_shape)
    train_classifier(teacher, digits.train, TrainConfig(epochs=6, lr=0.02, seed=0))
    return teacher.eval()


class OutsideNet(nn.Module):
    """A classifier that is not in the zoo: no num_classes/in_shape attributes, odd layout."""

    def __init__(self, in_features: int = 64, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 48), nn.Tanh())
        self.head = nn.Linear(48, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

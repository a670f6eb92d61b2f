"""Shared, session-scoped fixtures: the digits set and a teacher trained on it once."""
import pytest
import torch
from torch import nn

from sdb_core.data import load_dataset
from sdb_core.models import create_model
from sdb_core.train import TrainConfig, seed_everything, train_classifier


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

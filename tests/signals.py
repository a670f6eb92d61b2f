"""Classifiers of inputs that are not images, built by hand as a user would: 1-D signals (C, L) and
feature vectors (D,), each with a network outside the zoo (normalisation layers and dropout included)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sdb_core.data.base import DataSplits


def _splits(name: str, x: np.ndarray, y: np.ndarray, n_test: int, classes: int) -> DataSplits:
    """Raw values in [0, 1] normalised per channel (the first dimension after the batch), as loaders do."""
    x = torch.from_numpy(x.astype(np.float32))
    dims = (0, *range(2, x.dim()))
    xtr, xte = x[n_test:], x[:n_test]
    mean, std = (xtr.mean(dim=dims), xtr.std(dim=dims)) if x.dim() > 2 else (xtr.mean(), xtr.std())
    shape = (-1, *([1] * (x.dim() - 2)))
    mean, std = mean.reshape(-1), std.reshape(-1)
    norm = lambda v: (v - mean.view(shape)) / std.view(shape)
    y = torch.from_numpy(y.astype(np.int64))
    return DataSplits(name, TensorDataset(norm(xtr), y[n_test:]), TensorDataset(norm(xte), y[:n_test]), classes,
                      tuple(x.shape[1:]), tuple(mean.tolist()), tuple(std.tolist()), [f"c{i}" for i in range(classes)])


def signal_splits(n: int = 1600, n_test: int = 400, channels: int = 2, length: int = 64, classes: int = 4,
                  seed: int = 0) -> DataSplits:
    """Noisy tones whose frequency says the class (channel 0), with a class-dependent second channel."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    t = np.arange(length) / length
    freq = 2.0 + 1.5 * y[:, None] + rng.normal(0.0, 0.6, (n, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1))
    tone = np.sin(2 * np.pi * freq * t + phase) + rng.normal(0.0, 1.6, (n, length))
    second = np.cos(2 * np.pi * 0.5 * freq * t + phase) * (y[:, None] % 2) + rng.normal(0.0, 1.6, (n, length))
    x = np.stack([tone, second][:channels], 1)
    return _splits("signals", (x - x.min()) / (x.max() - x.min()), y, n_test, classes)


def feature_splits(n: int = 1600, n_test: int = 400, features: int = 32, classes: int = 4,
                   seed: int = 0) -> DataSplits:
    """Overlapping Gaussian clusters, one per class, in ``features`` dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0.0, 0.55, (classes, features))
    x = centres[y] + rng.normal(0.0, 1.0, (n, features))
    return _splits("features", (x - x.min()) / (x.max() - x.min()), y, n_test, classes)


class SignalNet(nn.Module):
    """Conv1d, BatchNorm1d, dropout: a small 1-D CNN from outside the zoo."""

    def __init__(self, channels: int = 2, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(channels, 16, 7, padding=3), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.AdaptiveAvgPool1d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FeatureNet(nn.Module):
    """Linear, LayerNorm, dropout on a feature vector."""

    def __init__(self, features: int = 32, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 64), nn.LayerNorm(64), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


KINDS = {"signals": (signal_splits, SignalNet), "features": (feature_splits, FeatureNet)}


def trained(kind: str, epochs: int = 10) -> tuple[DataSplits, nn.Module]:
    """The ``kind``'s data and a teacher trained on it (seeded)."""
    from sdb_core.train import TrainConfig, seed_everything, train_classifier

    make, net = KINDS[kind]
    data = make()
    seed_everything(0)
    teacher = net()
    train_classifier(teacher, data.train, TrainConfig(epochs=epochs, lr=0.05, seed=0))
    return data, teacher.eval()

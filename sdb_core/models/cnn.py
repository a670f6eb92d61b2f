"""Small plain CNNs (no BatchNorm): fast on CPU, the default teacher for the MNIST-sized sets."""
from __future__ import annotations

import torch
from torch import nn

from sdb_core.models._factory import register_model


class SmallCNN(nn.Module):
    """conv32 - pool - conv64 - pool - fc128: ~99% on MNIST in a few CPU epochs."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], width: int = 32, fc: int = 128):
        super().__init__()
        self.num_classes, self.in_shape = num_classes, tuple(in_shape)
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        # Capping the grid at 7x7 keeps 28x28 inputs exact (identity pooling) while large
        # images do not blow up the first linear layer.
        grid = (min(h // 4, 7), min(w // 4, 7))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * grid[0] * grid[1], fc), nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class LeNet5(nn.Module):
    """LeNet-5 layout (6 and 16 maps of 5x5, then 120-84) with ReLU and max pooling."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]):
        super().__init__()
        self.num_classes, self.in_shape = num_classes, tuple(in_shape)
        # Both convolutions are padded and the second pooling is adaptive so the 16x5x5 map
        # of the original exists for any input >= 8 px, not only 32x32.
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def cnn(num_classes: int = 10, in_shape=(1, 28, 28), width: int = 32, fc: int = 128) -> SmallCNN:
    return SmallCNN(num_classes, in_shape, width, fc)


@register_model
def lenet(num_classes: int = 10, in_shape=(1, 28, 28)) -> LeNet5:
    return LeNet5(num_classes, in_shape)

"""Small plain CNNs (no BatchNorm): fast on CPU, the default teacher for the MNIST-sized sets."""
from __future__ import annotations

import torch
from torch import nn

from sdb_core.models._factory import register_model


def _divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (``n`` >= 1)."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


class _PadToMultiple(nn.Module):
    """Replicate the last row/column of an (h, w) map until each side is a multiple of ``m``."""

    def __init__(self, h: int, w: int, m: int) -> None:
        super().__init__()
        self.pad_h, self.pad_w = -h % m if h >= m else m - h, -w % m if w >= m else m - w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.pad_h or self.pad_w):
            return x
        return torch.nn.functional.pad(x, (0, self.pad_w, 0, self.pad_h), mode="replicate")


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
        # Capping the grid near 7x7 keeps 28x28 inputs exact (identity pooling) while large
        # images do not blow up the first linear layer; a divisor of the map keeps the pooling
        # a plain AveragePool, which ONNX exports (8x8 -> 7x7 has no export, 8x8 -> 4x4 has).
        grid = (_divisor_at_most(h // 4, 7), _divisor_at_most(w // 4, 7))
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
        # Both convolutions are padded and the second pooling is sized from the input so the
        # 16x5x5 map of the original exists for any input >= 8 px, not only 32x32: the map is
        # edge-padded up to a multiple of 5 (below 5 px, repeated up to it) and max-pooled by a
        # fixed window, which ONNX exports (an adaptive pooling of 14 -> 5 it does not).
        h, w = in_shape[1] // 2, in_shape[2] // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), _PadToMultiple(h, w, 5),
            nn.MaxPool2d((-(-h // 5), -(-w // 5))),
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

"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k, pre-activation blocks, widths 16k/32k/64k."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdb_core.models._factory import register_model


class WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = dropout
        # Widths change at every stage entry, so the skip needs a projection there.
        self.proj = None if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # The projection reads the pre-activated input, as in the authors' code, so the
        # BN-ReLU is shared by both paths.
        skip = x if self.proj is None else self.proj(pre)
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_shape: tuple[int, int, int],
                 dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.num_classes, self.in_shape = num_classes, tuple(in_shape)
        self.stem = nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)
        stages, c_in = [], 16
        for c_out, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            blocks = [WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        # Pre-activation blocks end on a conv, so the head normalises once more.
        self.head = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.stages(self.stem(x))))


@register_model
def wrn16_1(num_classes: int = 10, in_shape=(3, 32, 32), dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_shape, dropout)


@register_model
def wrn16_2(num_classes: int = 10, in_shape=(3, 32, 32), dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_shape, dropout)


@register_model
def wrn40_1(num_classes: int = 10, in_shape=(3, 32, 32), dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_shape, dropout)


@register_model
def wrn40_2(num_classes: int = 10, in_shape=(3, 32, 32), dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_shape, dropout)

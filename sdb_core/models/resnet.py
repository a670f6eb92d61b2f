"""CIFAR ResNets of He et al. (2016, section 4.2): 6n+2 layers, three stages of 16/32/64 channels.

``norm="gn"`` swaps every BatchNorm for GroupNorm (Wu & He 2018), which has no batch statistics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdb_core.models._factory import register_model

NORMS = ("bn", "gn")
GN_GROUPS = 8  # 2, 4 and 8 channels per group in the 16/32/64-channel stages


def norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "gn":
        return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str = "bn"):
        super().__init__()
        # Named bn1/bn2 whatever the norm: renaming would break stored BatchNorm weights.
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, c_out)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A of the paper: subsample and zero-pad channels, so depth adds no
        # parameters to the skip path. x[::2] keeps ceil(H/2), the same size as the
        # padded stride-2 conv, so odd input sizes line up.
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_shape: tuple[int, int, int], norm: str = "bn"):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        n = (depth - 2) // 6
        self.num_classes, self.in_shape = num_classes, tuple(in_shape)
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False), norm_layer(norm, 16),
                                  nn.ReLU())
        stages, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(c_in, c_out, stride, norm)]
            blocks += [BasicBlock(c_out, c_out, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@register_model
def resnet8(num_classes: int = 10, in_shape=(3, 32, 32)) -> CifarResNet:
    return CifarResNet(8, num_classes, in_shape)


@register_model
def resnet20(num_classes: int = 10, in_shape=(3, 32, 32)) -> CifarResNet:
    return CifarResNet(20, num_classes, in_shape)


@register_model
def resnet56(num_classes: int = 10, in_shape=(3, 32, 32)) -> CifarResNet:
    return CifarResNet(56, num_classes, in_shape)


@register_model
def resnet8_gn(num_classes: int = 10, in_shape=(3, 32, 32)) -> CifarResNet:
    return CifarResNet(8, num_classes, in_shape, norm="gn")

"""Multi-layer perceptron: the weakest student, used as the distillation baseline; it takes inputs of any
shape (images, signals, feature vectors), flattened."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sdb_core.models._factory import register_model


class MLP(nn.Module):
    def __init__(self, num_classes: int, in_shape: tuple[int, ...], hidden: Sequence[int] = (256, 128)):
        super().__init__()
        if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
        self.num_classes, self.in_shape = num_classes, tuple(in_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model(any_shape=True)
def mlp(num_classes: int = 10, in_shape=(1, 28, 28), hidden: Sequence[int] = (256, 128)) -> MLP:
    return MLP(num_classes, in_shape, tuple(hidden))

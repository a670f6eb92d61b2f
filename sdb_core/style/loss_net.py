"""The loss network: a VGG-19-style feature extractor, seeded random weights or a user's VGG-19.

No ImageNet weights exist offline, so the default is a *random* VGG-19 (Kaiming-normal
convolutions, zero biases, a fixed seed): random multi-scale filters still give Gram
statistics that describe texture and colour (Ustyuzhaninov et al. 2016; He et al. 2016,
"A powerful generative model using random weights"). ``width`` shrinks every layer's
channels so that pixel optimisation and training stay cheap on a CPU; a user's weights
(``weights=``) need the full width, and must be a VGG-19 ``state_dict`` in torchvision's
layout (``features.<index>.weight|bias``; ``classifier.*`` is ignored).

The module's ``features`` is an ``nn.Sequential`` with torchvision's indices, so a
torchvision state dict loads into it as is. Inputs are images in [0, 1]; the network
normalises them with the ImageNet statistics the torchvision weights expect.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..weights import WeightsError, read_state_dict
from .config import LAYERS, STYLE_LAYERS, VGG19, LossNetConfig  # noqa: F401 (re-exported: callers import them here)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LossNet(nn.Module):
    """Frozen VGG-19-style features; ``forward(x, layers)`` returns ``{name: activation}``."""

    def __init__(self, cfg: LossNetConfig):
        super().__init__()
        self.cfg = cfg
        depth = LAYERS.index(cfg.last) + 1
        layers: list[nn.Module] = []
        c_in = 3
        for c in VGG19:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2) if cfg.pool == "max" else nn.AvgPool2d(2, 2))
            else:
                c_out = max(4, round(c * cfg.width))
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = c_out
        self.features = nn.Sequential(*layers[:depth])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.source = "random"
        self.weights_sha256: str | None = None

    def channels(self, layer: str) -> int:
        """Channels of the activation named ``layer``."""
        idx = LAYERS.index(layer)
        convs = [m for m in list(self.features)[: idx + 1] if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def forward(self, x: Tensor, layers: tuple[str, ...] | list[str]) -> dict[str, Tensor]:
        want = set(layers)
        unknown = want - set(LAYERS[: len(self.features)])
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} are not in this loss network (built up to {self.cfg.last})")
        last = max(LAYERS.index(n) for n in want)
        h = (x - self.mean) / self.std
        out = {}
        for i, m in enumerate(self.features[: last + 1]):
            h = m(h)
            if LAYERS[i] in want:
                out[LAYERS[i]] = h
        return out

    def describe(self) -> dict:
        """What every report records about the loss network."""
        d = {"kind": "vgg19-weights" if self.source != "random" else "random-vgg19", "width": self.cfg.width,
             "pool": self.cfg.pool, "last": self.cfg.last}
        if self.source == "random":
            d["seed"] = self.cfg.seed
        else:
            d.update(weights=self.source, sha256=self.weights_sha256)
        return d


def _init_random(net: LossNet, seed: int) -> None:
    # Kaiming-normal (fan-in, ReLU gain) keeps each layer's activations at the scale of the last,
    # so no layer's Gram matrix vanishes or explodes with depth.
    g = torch.Generator().manual_seed(seed)
    for m in net.features:
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.zero_()


def load_vgg19_features(net: LossNet, path: str | os.PathLike) -> None:
    """Load the ``features.*`` tensors of a torchvision VGG-19 state dict; WeightsError if it is not one."""
    state = read_state_dict(path)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    found = {k: v for k, v in state.items() if k.startswith("features.")}
    missing = sorted(k for k in expected if k not in found)
    wrong = sorted(f"{k}: {tuple(found[k].shape)} (VGG-19 has {tuple(s)})"
                   for k, s in expected.items() if k in found and found[k].shape != s)
    if missing or wrong:
        sample = ", ".join(sorted(state)[:4]) + (", ..." if len(state) > 4 else "")
        problem = (f"missing {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}" if missing
                   else f"wrong shapes {'; '.join(wrong[:3])}")
        raise WeightsError(
            f"{path} is not a VGG-19 state dict in torchvision's layout (features.0.weight [64, 3, 3, 3], "
            f"features.2.weight, ..., features.34.weight): {problem}; the file has {sample}")
    net.load_state_dict({k: found[k].float() for k in expected})


def build_loss_net(cfg: LossNetConfig | None = None) -> LossNet:
    """The frozen loss network in eval mode: random (seeded) or the user's VGG-19 weights."""
    cfg = cfg or LossNetConfig()
    net = LossNet(cfg)
    if cfg.weights is None:
        _init_random(net, cfg.seed)
    else:
        load_vgg19_features(net, cfg.weights)
        net.source = str(Path(cfg.weights).name)
        net.weights_sha256 = hashlib.sha256(Path(cfg.weights).read_bytes()).hexdigest()
    net.requires_grad_(False)
    return net.eval()

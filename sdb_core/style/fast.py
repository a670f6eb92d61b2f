"""Per-style feed-forward networks (Johnson et al., arXiv 1603.08155): train an image
transformation network once for one style; stylizing is then one forward pass.

The network follows the paper's design at a smaller width: a 9x9 convolution, two strided
3x3 downsampling convolutions, residual blocks, two upsampling stages and a 9x9 output
convolution, with reflection padding and instance normalisation (Ulyanov et al.'s fix for
feed-forward stylization). Upsampling is nearest-neighbour followed by a convolution rather
than a transposed convolution, which avoids checkerboard artefacts (Odena et al. 2016). The
output goes through a sigmoid, so it is always an image in [0, 1].

Training goes through :func:`sdb_core.train.fit` on random content crops
(:class:`~sdb_core.style.images.ContentCrops`); the loss is the content loss against each
crop plus the Gram style loss against the one style image (and total variation).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..progress import Progress
from ..train import History, TrainConfig, fit, pick_device, seed_everything
from .config import FastConfig
from .images import ContentCrops, content_images, fit_square, load_image
from .loss_net import LossNet, build_loss_net
from .losses import StyleCriterion, result_losses, tv_loss


def conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    """Reflection padding then convolution: no zero border for the network to learn around."""
    return nn.Sequential(nn.ReflectionPad2d(k // 2), nn.Conv2d(c_in, c_out, k, stride))


class ConvIN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, upsample: bool = False):
        layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")] if upsample else []
        layers += [conv(c_in, c_out, k, stride), nn.InstanceNorm2d(c_out, affine=True), nn.ReLU()]
        super().__init__(*layers)


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv(c, c, 3), nn.InstanceNorm2d(c, affine=True), nn.ReLU(),
                                  conv(c, c, 3), nn.InstanceNorm2d(c, affine=True))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class TransformerNet(nn.Module):
    """Image (N, 3, H, W) in [0, 1] → stylized image of the same size (H, W multiples of 4)."""

    def __init__(self, channels: int = 16, res_blocks: int = 5):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            ConvIN(3, c, 9), ConvIN(c, 2 * c, 3, 2), ConvIN(2 * c, 4 * c, 3, 2),
            *[Residual(4 * c) for _ in range(res_blocks)],
            ConvIN(4 * c, 2 * c, 3, upsample=True), ConvIN(2 * c, c, 3, upsample=True),
            conv(c, 3, 9), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class FastResult:
    net: TransformerNet
    image: Tensor  # the stylized evaluation image (3, size, size)
    content: Tensor
    style: Tensor
    losses: dict[str, float]  # content_loss, style_loss, style_loss_content, style_loss_cut
    history: History
    seconds: float
    loss_net: dict


def train(cfg: FastConfig, *, style: Tensor | None = None, content: Tensor | None = None,
          net: LossNet | None = None, progress: Callable[[Progress], None] | None = None,
          should_cancel: Callable[[], bool] | None = None, checkpoint: str | None = None) -> FastResult:
    """Train a transformation network for one style; ``style``/``content`` tensors override the names
    (``content`` is only the evaluation image: training crops come from ``cfg.content``).

    Trains on ``cfg.device`` (the loss network is moved there) and hands the network back there;
    the result's images are on the given content's device (the CPU for a named image).
    """
    # Built before seeding: constructing it draws from the global generator, so a run with and
    # without a prebuilt loss network would otherwise start from different initialisations.
    loss_net = net or build_loss_net(cfg.loss_net)
    device = pick_device(cfg.device)
    loss_net.to(device)
    seed_everything(cfg.seed)
    style = fit_square(style if style is not None else load_image(cfg.style), cfg.size).to(device)
    evaluation = fit_square(content if content is not None else load_image(cfg.eval_content), cfg.size)
    home = evaluation.device
    evaluation = evaluation.to(device)
    crit = StyleCriterion(loss_net, style, content_layers=cfg.content_layers, style_layers=cfg.style_layers)
    crops = ContentCrops(content_images(cfg.content), cfg.crop, cfg.samples)
    model = TransformerNet(cfg.channels, cfg.res_blocks)

    def step(batch):
        (x,) = batch
        y = model(x)
        c, s = crit.losses(y, crit.content_targets(x))
        loss = cfg.content_weight * c + cfg.style_weight * s + cfg.tv_weight * tv_loss(y)
        return loss, {"content": c.detach(), "style": s.detach()}

    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adam", weight_decay=0.0,
                     schedule="cosine", seed=cfg.seed, device=cfg.device)
    t0 = time.perf_counter()
    history = fit(model, crops, step, tc, progress=progress, should_cancel=should_cancel, checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        image = model.eval()(evaluation[None])[0]
    losses = result_losses(loss_net, style, image, evaluation)
    return FastResult(model, image.to(home), evaluation.to(home), style.to(home), losses, history, seconds,
                      loss_net.describe())

"""Arbitrary style transfer with adaptive instance normalisation (Huang & Belongie,
arXiv 1703.06868): a frozen encoder, an AdaIN layer and a trained decoder; any style image
works at inference without retraining, and ``alpha`` trades content for style.

The encoder is the loss network's prefix up to ``layer`` (relu3_1 here, see below), so the
loss network that judges the result is the one that encodes it. The decoder mirrors the
encoder with nearest upsampling instead of pooling and reflection padding, without
normalisation layers (the paper found they hurt). Training goes through
:func:`sdb_core.train.fit`: content crops from the training images, style crops from the
style images; the loss is ``‖f(g(t)) − t‖²/‖t‖² + λ·Σ_l (‖μ_l(g(t)) − μ_l(s)‖² + ‖σ_l(g(t)) − σ_l(s)‖²)``
with ``t = AdaIN(f(c), f(s))``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..progress import Progress
from ..train import History, TrainConfig, fit, seed_everything
from .fast import conv
from .images import STYLE_IMAGES, ContentCrops, content_images, fit_square, load_image
from .loss_net import LAYERS, STYLE_LAYERS, LossNet, LossNetConfig, build_loss_net
from .losses import adain, mean_std_loss, relative_mse, result_losses


@dataclass
class AdaINConfig:
    styles: tuple[str, ...] = STYLE_IMAGES  # training styles: embedded names or files
    content: str = "embedded"  # training crops: embedded | name,name,... | imagefolder:PATH
    eval_content: str = "chelsea"
    eval_style: str = "flower"
    alpha: float = 1.0  # for the evaluation image
    # The encoder's last layer, where AdaIN acts. The paper's relu4_1 needs a decoder trained far
    # longer than a CPU allows: after 300 steps here its results had a *higher* style loss than the
    # content image (cut −24%); relu3_1's decoder, one pooling shallower, reached +32% (+55% with
    # the identity term below) in the same steps.
    layer: str = "relu3_1"
    size: int = 256
    crop: int = 96
    epochs: int = 4
    samples: int = 400
    batch_size: int = 4
    lr: float = 2e-3
    style_weight: float = 10.0
    # Pixel identity term ‖g(f(c)) − c‖² (Park & Lee's SANet uses one): the paper trains its
    # decoder for 160k steps; with a few hundred here, a direct pixel signal is what teaches it
    # to invert the encoder at all. 0 gives the paper's loss.
    identity_weight: float = 10.0
    # The mean/std style loss's layers; None: relu1_1 up to the AdaIN layer, the paper's rule. All
    # five (STYLE_LAYERS, which the Gram loss counts) measured: cut 64.7% at SSIM 0.247 against
    # 59.8% at 0.266 (600 steps, the benchmark's pair): more style, less content, no target met.
    style_layers: tuple[str, ...] | None = None
    loss_net: LossNetConfig = field(default_factory=LossNetConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.styles:
            raise ValueError("styles must name at least one style image")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.layer not in ("relu2_1", "relu3_1", "relu4_1", "relu5_1"):
            raise ValueError(f"layer must be relu2_1|relu3_1|relu4_1|relu5_1, got {self.layer!r}")
        if not 32 <= self.crop <= 1024 or self.crop % 16:
            raise ValueError(f"crop must be a multiple of 16 in [32, 1024], got {self.crop}")
        if self.epochs < 1 or self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, samples and batch_size must be >= 1, got "
                             f"{self.epochs}, {self.samples}, {self.batch_size}")


def stats_layers(layer: str, style_layers: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The mean/std loss's layers: ``style_layers``, or relu1_1 up to the AdaIN layer."""
    if style_layers is not None:
        return tuple(n for n in LAYERS if n in style_layers)
    return tuple(n for n in STYLE_LAYERS if LAYERS.index(n) <= LAYERS.index(layer))


class Encoder(nn.Module):
    """The loss network's prefix, frozen: image in [0, 1] → features at ``layer``."""

    def __init__(self, net: LossNet, layer: str):
        super().__init__()
        self.net, self.layer = net, layer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, (self.layer,))[self.layer]


def decoder_for(net: LossNet, layer: str) -> nn.Sequential:
    """The encoder mirrored: its convolutions in reverse, each pool replaced by 2x nearest upsampling."""
    convs = [n for n in LAYERS[: LAYERS.index(layer) + 1] if n.startswith("conv")]
    chans = [net.channels(n) for n in convs]
    block = [n.split("_")[0] for n in convs]  # "conv3_2" → "conv3": the resolution it works at
    layers: list[nn.Module] = []
    for i in range(len(convs) - 1, 0, -1):
        layers += [conv(chans[i], chans[i - 1], 3), nn.ReLU()]
        if block[i - 1] != block[i]:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    layers.append(conv(chans[0], 3, 3))
    return nn.Sequential(*layers)


class AdaINNet(nn.Module):
    """``(content, style, alpha)`` → stylized content in [0, 1]; H and W multiples of the pooling
    factor. ``style`` may be one image for a batch of contents; ``alpha`` is (N,) or (1,)."""

    def __init__(self, encoder: Encoder, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, content: Tensor, style: Tensor, alpha: Tensor) -> Tensor:
        fc = self.encoder(content)
        t = adain(fc, self.encoder(style))
        a = alpha.reshape(-1, 1, 1, 1)  # one alpha per sample (or one for all)
        return self.decoder(a * t + (1 - a) * fc).clamp(0, 1)


@dataclass
class AdaINResult:
    net: AdaINNet
    image: Tensor  # the evaluation content stylized with the evaluation style at cfg.alpha
    content: Tensor
    style: Tensor
    losses: dict[str, float]  # in the loss network's Gram terms, as for every method
    history: History
    seconds: float
    loss_net: dict
    multiple: int  # H and W must be multiples of this


def train(cfg: AdaINConfig, *, content: Tensor | None = None, style: Tensor | None = None,
          net: LossNet | None = None, progress: Callable[[Progress], None] | None = None,
          should_cancel: Callable[[], bool] | None = None, checkpoint: str | None = None) -> AdaINResult:
    """Train the decoder; ``content``/``style`` tensors override the evaluation pair's names."""
    # Built before seeding: constructing it draws from the global generator, so a run with and
    # without a prebuilt loss network would otherwise start from different initialisations.
    loss_net = net or build_loss_net(cfg.loss_net)
    seed_everything(cfg.seed)
    encoder = Encoder(loss_net, cfg.layer)
    decoder = decoder_for(loss_net, cfg.layer)
    model = AdaINNet(encoder, decoder)
    styled = stats_layers(cfg.layer, cfg.style_layers)
    layers = tuple(n for n in LAYERS if n in styled or n == cfg.layer)
    crops = ContentCrops(content_images(cfg.content), cfg.crop, cfg.samples)
    # Style crops at a larger scale than content crops: a crop should hold the style's texture.
    styles = ContentCrops([load_image(s) for s in cfg.styles], cfg.crop, 1, scale=2.5, jitter=0.0)

    def step(batch):
        (x,) = batch
        s = torch.stack([styles[0][0] for _ in range(len(x))])
        with torch.no_grad():
            fc, fs = loss_net(x, (cfg.layer,)), loss_net(s, layers)
            t = adain(fc[cfg.layer], fs[cfg.layer])
        g = decoder(t)
        fg = loss_net(g, layers)
        lc = relative_mse(fg[cfg.layer], t)
        ls = mean_std_loss([fg[k] for k in styled], [fs[k] for k in styled])
        loss = lc + cfg.style_weight * ls
        metrics = {"content": lc.item(), "style": ls.item()}
        if cfg.identity_weight:
            li = (decoder(fc[cfg.layer]) - x).pow(2).mean()
            loss = loss + cfg.identity_weight * li
            metrics["identity"] = li.item()
        return loss, metrics

    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adam", weight_decay=0.0,
                     schedule="cosine", seed=cfg.seed, device="cpu")
    t0 = time.perf_counter()
    history = fit(decoder, crops, step, tc, progress=progress, should_cancel=should_cancel, checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    model.eval()
    evaluation = fit_square(content if content is not None else load_image(cfg.eval_content), cfg.size)
    style_img = fit_square(style if style is not None else load_image(cfg.eval_style), cfg.size)
    with torch.no_grad():
        image = model(evaluation[None], style_img[None], torch.tensor([cfg.alpha]))[0]
    multiple = 2 ** sum(1 for n in LAYERS[: LAYERS.index(cfg.layer)] if n.startswith("pool"))
    return AdaINResult(model, image, evaluation, style_img, result_losses(loss_net, style_img, image, evaluation), history,
                       seconds, loss_net.describe(), multiple)

"""Arbitrary style transfer with adaptive instance normalisation (Huang & Belongie,
arXiv 1703.06868): a frozen encoder, an AdaIN layer and a trained decoder; any style image
works at inference without retraining, and ``alpha`` trades content for style.

The encoder is the loss network's prefix up to ``layer`` (relu3_1 here, see below), so the
loss network that judges the result is the one that encodes it. The decoder mirrors the
encoder with nearest upsampling instead of pooling and reflection padding, without
normalisation layers (the paper found they hurt). Beyond the paper, it also receives the AdaIN
outputs at relu1_1 and relu2_1 where its activations reach those resolutions (skip connections
of an hourglass, as Avatar-Net, Sheng et al. 2018, fuses several scales); ``skips=()`` gives the
paper's single-level decoder. Training goes through :func:`sdb_core.train.fit`: content crops
from the training images, style crops from many style images (channels permuted at random); the
loss is ``‖f(g(t)) − t‖²/‖t‖² + λ·Σ_l (‖μ_l(g(t)) − μ_l(s)‖² + ‖σ_l(g(t)) − σ_l(s)‖²)`` with
``t = AdaIN(f(c), f(s))`` at every level the decoder takes, plus a pixel identity term.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..progress import Progress
from ..train import History, TrainConfig, fit, pick_device, seed_everything
from .config import AdaINConfig
from .fast import conv
from .images import ContentCrops, content_images, fit_square, load_image
from .loss_net import LAYERS, STYLE_LAYERS, LossNet, build_loss_net
from .losses import adain, mean_std_loss, relative_mse, result_losses


def stats_layers(layer: str, style_layers: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The mean/std loss's layers: ``style_layers``, or relu1_1 up to the AdaIN layer."""
    if style_layers is not None:
        return tuple(n for n in LAYERS if n in style_layers)
    return tuple(n for n in STYLE_LAYERS if LAYERS.index(n) <= LAYERS.index(layer))


class Encoder(nn.Module):
    """The loss network's prefix, frozen: image in [0, 1] → ``{layer: features}`` at ``layers``."""

    def __init__(self, net: LossNet, layers: str | tuple[str, ...]):
        super().__init__()
        self.net = net
        self.layers = (layers,) if isinstance(layers, str) else tuple(layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x, self.layers)


class Decoder(nn.Module):
    """The encoder mirrored: its convolutions in reverse, each pool replaced by 2x nearest
    upsampling, reflection padding, no normalisation. ``width`` scales every channel count but the
    input's. Each layer in ``skips`` (a relu<b>_1 shallower than ``layer``) is concatenated to the
    decoder's activations where they reach that layer's resolution."""

    def __init__(self, net: LossNet, layer: str, width: float = 1.0, skips: tuple[str, ...] = ()):
        super().__init__()
        convs = [n for n in LAYERS[: LAYERS.index(layer) + 1] if n.startswith("conv")]
        chans = [max(4, round(net.channels(n) * width)) for n in convs[:-1]] + [net.channels(convs[-1])]
        block = [n.split("_")[0][4:] for n in convs]  # "conv3_2" → "3": the resolution it works at
        bad = [k for k in skips if k not in LAYERS or not k.endswith("_1") or LAYERS.index(k) >= LAYERS.index(layer)]
        if bad:
            raise ValueError(f"skips must be relu<b>_1 layers shallower than {layer}, got {bad}")
        self.layer, self.skips = layer, tuple(skips)
        stages: list[nn.Sequential] = []
        entries: list[str | None] = []  # the skip concatenated after each stage, or None
        current: list[nn.Module] = []
        extra = 0  # channels a skip added to the next convolution's input
        for i in range(len(convs) - 1, 0, -1):
            current += [conv(chans[i] + extra, chans[i - 1], 3), nn.ReLU()]
            extra = 0
            if block[i - 1] != block[i]:
                current.append(nn.Upsample(scale_factor=2, mode="nearest"))
                skip = f"relu{block[i - 1]}_1"
                if skip in self.skips:
                    stages.append(nn.Sequential(*current))
                    entries.append(skip)
                    current, extra = [], net.channels(skip)
        current.append(conv(chans[0] + extra, 3, 3))
        stages.append(nn.Sequential(*current))
        entries.append(None)
        self.stages = nn.ModuleList(stages)
        self.entries = entries

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        h = feats[self.layer]
        for stage, skip in zip(self.stages, self.entries):
            h = stage(h)
            if skip is not None:
                h = torch.cat([h, feats[skip]], dim=1)
        return h


class AdaINNet(nn.Module):
    """``(content, style, alpha)`` → stylized content in [0, 1]; H and W multiples of the pooling
    factor. ``style`` may be one image for a batch of contents; ``alpha`` is (N,) or (1,)."""

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, content: Tensor, style: Tensor, alpha: Tensor) -> Tensor:
        fc, fs = self.encoder(content), self.encoder(style)
        a = alpha.reshape(-1, 1, 1, 1)  # one alpha per sample (or one for all)
        t = {k: a * adain(fc[k], fs[k]) + (1 - a) * fc[k] for k in fc}
        return self.decoder(t).clamp(0, 1)


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
    """Train the decoder; ``content``/``style`` tensors override the evaluation pair's names.

    Trains on ``cfg.device`` (the loss network, the encoder, is moved there) and hands the network
    back there; the result's images are on the given content's device (the CPU for a named image).
    """
    # Built before seeding: constructing it draws from the global generator, so a run with and
    # without a prebuilt loss network would otherwise start from different initialisations.
    loss_net = net or build_loss_net(cfg.loss_net)
    device = pick_device(cfg.device)
    loss_net.to(device)
    seed_everything(cfg.seed)
    decoder = Decoder(loss_net, cfg.layer, cfg.decoder_width, tuple(cfg.skips))
    enc_layers = (*decoder.skips, cfg.layer)
    encoder = Encoder(loss_net, enc_layers)
    model = AdaINNet(encoder, decoder)
    styled = stats_layers(cfg.layer, cfg.style_layers)
    layers = tuple(n for n in LAYERS if n in styled or n in enc_layers)
    crops = ContentCrops(content_images(cfg.content), cfg.crop, cfg.samples)
    # Style crops at a larger scale than content crops: a crop should hold the style's texture.
    styles = ContentCrops([load_image(s) for s in cfg.styles], cfg.crop, 1, scale=2.5, jitter=0.0,
                           shuffle_channels=cfg.shuffle_style_channels)

    def step(batch):
        (x,) = batch
        s = torch.stack([styles[0][0] for _ in range(len(x))]).to(x.device)
        with torch.no_grad():
            fc, fs = loss_net(x, enc_layers), loss_net(s, layers)
            t = {k: adain(fc[k], fs[k]) for k in enc_layers}
        g = decoder(t)
        fg = loss_net(g, layers)
        lc = relative_mse(fg[cfg.layer], t[cfg.layer])
        ls = mean_std_loss([fg[k] for k in styled], [fs[k] for k in styled])
        loss = lc + cfg.style_weight * ls
        metrics = {"content": lc.detach(), "style": ls.detach()}
        if cfg.identity_weight:
            li = (decoder(fc) - x).pow(2).mean()
            loss = loss + cfg.identity_weight * li
            metrics["identity"] = li.detach()
        return loss, metrics

    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adam", weight_decay=0.0,
                     schedule="cosine", seed=cfg.seed, device=cfg.device)
    t0 = time.perf_counter()
    history = fit(decoder, crops, step, tc, progress=progress, should_cancel=should_cancel, checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    model.eval()
    evaluation = fit_square(content if content is not None else load_image(cfg.eval_content), cfg.size)
    home = evaluation.device
    evaluation = evaluation.to(device)
    style_img = fit_square(style if style is not None else load_image(cfg.eval_style), cfg.size).to(device)
    with torch.no_grad():
        image = model(evaluation[None], style_img[None], torch.tensor([cfg.alpha], device=device))[0]
    multiple = 2 ** sum(1 for n in LAYERS[: LAYERS.index(cfg.layer)] if n.startswith("pool"))
    losses = result_losses(loss_net, style_img, image, evaluation)
    return AdaINResult(model, image.to(home), evaluation.to(home), style_img.to(home), losses, history,
                       seconds, loss_net.describe(), multiple)

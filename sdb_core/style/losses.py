"""Style-transfer losses, defined once: content, Gram style, total variation, AdaIN mean/std.

Every method reports its losses through :class:`StyleCriterion`, so "style loss" means the
same number for Gatys, the feed-forward network and AdaIN (and in the benchmark).

- Gram matrix ``G = F·Fᵀ / (C·H·W)`` of a (C, H·W) feature map (Gatys et al.).
- Style loss: per layer ``‖G(x) − G(s)‖² / ‖G(s)‖²``, averaged over layers. Dividing by the
  style's own Gram energy is the per-layer normalisation the random loss network needs: the
  layers of a random VGG have Gram matrices of very different magnitudes, and without it one
  layer would decide the loss alone. It also makes the number comparable across networks.
- Content loss: ``‖F(x) − F(c)‖² / ‖F(c)‖²`` at the content layers (relative feature MSE).
- Total variation: mean squared difference of neighbouring pixels.
- AdaIN (Huang & Belongie): ``σ(s)·(c − μ(c))/σ(c) + μ(s)`` per channel, and its style loss,
  the squared differences of the per-channel means and standard deviations.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..train import device_of

EPS = 1e-5


def gram(f: Tensor) -> Tensor:
    """(N, C, H, W) → (N, C, C), normalised by C·H·W."""
    n, c, h, w = f.shape
    flat = f.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def relative_mse(x: Tensor, target: Tensor) -> Tensor:
    """‖x − target‖² / ‖target‖², means over all elements (target broadcast over the batch)."""
    return (x - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def tv_loss(x: Tensor) -> Tensor:
    """Total variation: mean squared difference between vertical and horizontal neighbours."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
    return dh + dw


def mean_std(f: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and standard deviation over H, W; shapes (N, C, 1, 1)."""
    mu = f.mean(dim=(2, 3), keepdim=True)
    sigma = (f.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return mu, sigma


def adain(content: Tensor, style: Tensor, eps: float = EPS) -> Tensor:
    """Adaptive instance normalisation: content features with the style's channel statistics."""
    mc, sc = mean_std(content, eps)
    ms, ss = mean_std(style, eps)
    return ss * (content - mc) / sc + ms


def mean_std_loss(x_feats: Sequence[Tensor], s_feats: Sequence[Tensor]) -> Tensor:
    """AdaIN's style loss: Σ_layers MSE(μ(x), μ(s)) + MSE(σ(x), σ(s))."""
    total = x_feats[0].new_zeros(())
    for fx, fs in zip(x_feats, s_feats):
        mx, sx = mean_std(fx)
        ms, ss = mean_std(fs)
        total = total + (mx - ms).pow(2).mean() + (sx - ss).pow(2).mean()
    return total


FeatureFn = Callable[[Tensor, Sequence[str]], dict[str, Tensor]]


class StyleCriterion:
    """Content and style losses of images against one content target and one style image.

    ``net(x, layers)`` returns feature maps by layer name (a :class:`LossNet`). The style
    targets are computed once; the content target is given per call (a batch of crops) or
    fixed with :meth:`set_content`. Images may be on any device: a network (an ``nn.Module``) sees
    them on its own, and the losses are there too.
    """

    def __init__(self, net: FeatureFn, style: Tensor, *, content_layers: Sequence[str] = ("relu4_1",),
                 style_layers: Sequence[str] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")):
        self.net, self.content_layers, self.style_layers = net, tuple(content_layers), tuple(style_layers)
        self.layers = tuple(dict.fromkeys(self.content_layers + self.style_layers))
        with torch.no_grad():
            feats = self._features(style.unsqueeze(0) if style.dim() == 3 else style, self.style_layers)
            self.style_grams = {k: gram(v)[:1] for k, v in feats.items()}  # (1, C, C): broadcast over a batch
        self.content_feats: dict[str, Tensor] | None = None

    def _features(self, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """The network's features of ``x``, computed where the network lives (differentiable in ``x``)."""
        if isinstance(self.net, nn.Module):
            x = x.to(device_of(self.net))
        return self.net(x, layers)

    def content_targets(self, content: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return self._features(content.unsqueeze(0) if content.dim() == 3 else content, self.content_layers)

    def set_content(self, content: Tensor) -> None:
        self.content_feats = self.content_targets(content)

    def losses(self, x: Tensor, content_feats: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(content loss, style loss) of the images ``x`` (N, 3, H, W) in [0, 1]."""
        targets = content_feats if content_feats is not None else self.content_feats
        if targets is None:
            raise ValueError("no content target: pass content_feats or call set_content first")
        feats = self._features(x, self.layers)
        content = sum(relative_mse(feats[k], targets[k]) for k in self.content_layers) / len(self.content_layers)
        style = sum(relative_mse(gram(feats[k]), self.style_grams[k]) for k in self.style_layers)
        return content, style / len(self.style_layers)

    @torch.no_grad()
    def evaluate(self, x: Tensor, content: Tensor) -> dict[str, float]:
        """The report's numbers for one result image against its content image."""
        x = x.unsqueeze(0) if x.dim() == 3 else x
        c, s = self.losses(x.clamp(0, 1), self.content_targets(content))
        return {"content_loss": float(c), "style_loss": float(s)}


def result_losses(net: FeatureFn, style: Tensor, image: Tensor, content: Tensor) -> dict[str, float]:
    """The figures every method reports, always at the default layers (content relu4_1, style
    relu1_1..relu5_1) whatever a method trained with: the losses of the result, the style loss
    of the content image itself, and the cut ``1 − style(result) / style(content)`` (0 when the content
    image already has the style exactly, as when the style image is the content image: nothing to cut)."""
    crit = StyleCriterion(net, style)
    out = crit.evaluate(image, content)
    start = crit.evaluate(content, content)["style_loss"]
    out.update(style_loss_content=start, style_loss_cut=1.0 - out["style_loss"] / start if start > 0 else 0.0)
    return out

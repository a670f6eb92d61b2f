"""Gatys et al. (arXiv 1508.06576): optimise the pixels of one image so that its features
keep the content image's and its Gram matrices take the style image's.

Adam runs through :func:`sdb_core.train.fit` (the image is the one parameter of a tiny
module, one "batch" per step), so it gets the loop's progress, cancel and timing. L-BFGS
cannot: it re-evaluates the loss several times per step through a closure, which ``fit``'s
one-backward-per-batch loop has no place for; it runs in the short loop below instead, with
the same progress and cancel callbacks.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..progress import Cancelled, Progress
from ..train import TrainConfig, fit, pick_device, seed_everything
from .config import GatysConfig
from .images import fit_square, load_image
from .loss_net import LossNet, build_loss_net
from .losses import StyleCriterion, result_losses, tv_loss


@dataclass
class GatysResult:
    image: Tensor  # (3, H, W) in [0, 1]
    content: Tensor
    style: Tensor
    losses: dict[str, float]  # content_loss, style_loss, style_loss_content, style_loss_cut
    history: list[dict[str, float]]
    seconds: float
    loss_net: dict


class _Canvas(nn.Module):
    """The image being optimised, as the only parameter of a module (what ``fit`` trains)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.image = nn.Parameter(init.clone().unsqueeze(0))


def stylize(cfg: GatysConfig, *, content: Tensor | None = None, style: Tensor | None = None,
            net: LossNet | None = None, progress: Callable[[Progress], None] | None = None,
            should_cancel: Callable[[], bool] | None = None) -> GatysResult:
    """Optimise an image; ``content``/``style`` tensors (3, H, W) override the config's names.

    Runs on ``cfg.device`` (the loss network is moved there); the result's images are on the
    given content's device (the CPU for a named image).
    """
    # Built before seeding: constructing it draws from the global generator, so a run with and
    # without a prebuilt loss network would otherwise start from different initialisations.
    net = net or build_loss_net(cfg.loss_net)
    device = pick_device(cfg.device)
    net.to(device)
    seed_everything(cfg.seed)
    content = fit_square(content if content is not None else load_image(cfg.content), cfg.size)
    home = content.device
    content = content.to(device)
    style = fit_square(style if style is not None else load_image(cfg.style), cfg.size).to(device)
    crit = StyleCriterion(net, style, content_layers=cfg.content_layers, style_layers=cfg.style_layers)
    crit.set_content(content)
    # Noise from a CPU generator: the same start on every device.
    init = content if cfg.init == "content" else torch.rand(content.shape, generator=torch.Generator().manual_seed(cfg.seed))
    canvas = _Canvas(init.to(device))

    def objective(img: Tensor) -> tuple[Tensor, dict[str, float]]:
        c, s = crit.losses(img)
        loss = cfg.content_weight * c + cfg.style_weight * s
        if cfg.tv_weight:
            loss = loss + cfg.tv_weight * tv_loss(img)
        return loss, {"content": c.detach(), "style": s.detach()}  # read back by fit about once a second

    t0 = time.perf_counter()
    if cfg.optimizer == "adam":
        history = _adam(canvas, objective, cfg, progress, should_cancel)
    else:
        history = _lbfgs(canvas, objective, cfg, progress, should_cancel)
    seconds = time.perf_counter() - t0
    image = canvas.image.detach()[0].clamp(0, 1)
    losses = result_losses(net, style, image, content)
    return GatysResult(image.to(home), content.to(home), style.to(home), losses, history, seconds, net.describe())


def _adam(canvas: _Canvas, objective, cfg: GatysConfig, progress, should_cancel) -> list[dict[str, float]]:
    def step(_batch):
        with torch.no_grad():  # projected gradient: the image stays a valid image
            canvas.image.clamp_(0, 1)
        return objective(canvas.image)

    # One item, one epoch per step: fit's history then holds every step's losses.
    tc = TrainConfig(epochs=cfg.steps, batch_size=1, lr=cfg.lr or 0.02, optimizer="adam", weight_decay=0.0,
                     schedule="constant", seed=cfg.seed, device=cfg.device)
    hist = fit(canvas, TensorDataset(torch.zeros(1, 1)), step, tc, progress=progress, should_cancel=should_cancel)
    return hist.epochs


def _lbfgs(canvas: _Canvas, objective, cfg: GatysConfig, progress, should_cancel) -> list[dict[str, float]]:
    opt = torch.optim.LBFGS([canvas.image], lr=cfg.lr or 1.0, max_iter=cfg.steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    history: list[dict[str, float]] = []

    def closure() -> Tensor:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled after {len(history)} evaluations")
        opt.zero_grad(set_to_none=True)
        loss, metrics = objective(canvas.image)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} after {len(history)} evaluations")
        loss.backward()
        history.append({"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}})  # L-BFGS reads it anyway
        if progress is not None:
            n = len(history)
            progress(Progress(1, 1, min(n, cfg.steps), cfg.steps, min(n / cfg.steps, 1.0), history[-1]))
        return loss

    opt.step(closure)
    return history

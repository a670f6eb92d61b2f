"""The ``style`` task: neural style transfer by one of three methods, its images and (for a network) a bundle.

- ``gatys``: optimise the pixels of one image (no network to keep);
- ``fast``: train a feed-forward network for the one style image (Johnson et al.);
- ``adain``: train an AdaIN decoder on several style images; any style works afterwards.

Images are embedded names (``chelsea``, ``flower``, ...; see :mod:`sdb_core.style.config`) or image
files. ``run`` writes ``stylized.png``, ``sheet.png`` (content, style, result side by side) and, for
``fast`` and ``adain``, ``bundle.sdb`` (task ``style``, what ``POST /v1/style/{name}`` serves).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..progress import Hooks
from ..style.config import AdaINConfig, FastConfig, GatysConfig

METHODS = ("gatys", "fast", "adain")


@dataclass(frozen=True)
class StyleTask:
    """The method and its recipe's config (only the running method's is read). The recipes' defaults
    are their configs' (embedded, never copied); ``seed`` seeds the recipe and the loss network."""

    method: str
    gatys: GatysConfig = field(default_factory=GatysConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    adain: AdaINConfig = field(default_factory=AdaINConfig)
    name: str | None = None  # the bundle's model name; default style-METHOD-STYLE
    version: str = "1"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @property
    def recipe(self) -> GatysConfig | FastConfig | AdaINConfig:
        """The running method's config, seeded."""
        cfg = getattr(self, self.method)
        return replace(cfg, seed=self.seed, loss_net=replace(cfg.loss_net, seed=self.seed))

    @property
    def style_image(self) -> str:
        """The style image the result shows (AdaIN: the evaluation style)."""
        return self.adain.eval_style if self.method == "adain" else getattr(self, self.method).style

    @property
    def model_name(self) -> str:
        stem = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in self.style_image.rsplit("/", 1)[-1])
        return self.name or f"style-{self.method}-{stem.rsplit('.', 1)[0]}"[:100]

    @classmethod
    def from_options(cls, method: str, *, content: str | None = None, style: str | None = None,
                     styles: list[str] | None = None, train_content: str | None = None, weights: str | None = None,
                     size: int | None = None, steps: int | None = None, optimizer: str | None = None,
                     epochs: int | None = None, samples: int | None = None, crop: int | None = None,
                     batch_size: int | None = None, style_weight: float | None = None, alpha: float | None = None,
                     **task) -> StyleTask:
        """The task from the flat options the job's params give (each method reads those it has); ``None``
        keeps a default. ``content`` is the image stylized at the end, ``train_content`` the fast and AdaIN
        training crops; AdaIN trains on ``styles``, by default its embedded set plus ``style``."""
        given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
        common = given(size=size, style_weight=style_weight)
        if method == "gatys":
            base = GatysConfig()
            cfg = replace(base, **common, **given(content=content, style=style, steps=steps, optimizer=optimizer),
                          loss_net=replace(base.loss_net, weights=weights))
        elif method == "fast":
            base = FastConfig()
            cfg = replace(base, **common, **given(style=style, content=train_content, eval_content=content, crop=crop,
                                                  epochs=epochs, samples=samples, batch_size=batch_size),
                          loss_net=replace(base.loss_net, weights=weights))
        else:
            base = AdaINConfig()
            eval_style = style or base.eval_style
            trained = tuple(styles) if styles else tuple(dict.fromkeys((*base.styles, eval_style)))
            cfg = replace(base, **common, **given(content=train_content, eval_content=content, alpha=alpha, crop=crop,
                                                  epochs=epochs, samples=samples, batch_size=batch_size),
                          styles=trained, eval_style=eval_style, loss_net=replace(base.loss_net, weights=weights))
        return cls(method, **{method: cfg}, **task)


def run(cfg: StyleTask, out: str | os.PathLike, hooks: Hooks | None = None, *,
        work: str | os.PathLike | None = None) -> dict:
    """Stylize (or train, then stylize) and write the images and any bundle to the directory ``out``;
    ``work`` keeps a trained network's resumable checkpoint. Returns the report: losses, timings, the
    loss network, and ``result`` (the artifacts; for a network, the bundle's model name and version)."""
    import time

    from ..style import adain, fast, gatys
    from ..style.images import save_png, sheet
    from ..style.loss_net import build_loss_net

    t0 = time.perf_counter()
    from ..outputs import out_dir

    out_dir(out)  # before any work: a path it cannot write is refused now
    hooks = hooks or Hooks()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = cfg.recipe
    loss_net = build_loss_net(recipe.loss_net)
    hooks.log(f"loss network: {loss_net.describe()}")
    phase = "optimise" if cfg.method == "gatys" else "train"
    common = {"net": loss_net, "progress": hooks.phase(phase), "should_cancel": hooks.should_cancel}
    checkpoint = None if work is None else str(Path(work) / "checkpoint.pt")
    if cfg.method == "gatys":
        result = gatys.stylize(recipe, **common)
    elif cfg.method == "fast":
        result = fast.train(recipe, checkpoint=checkpoint, **common)
    else:
        result = adain.train(recipe, checkpoint=checkpoint, **common)
    hooks.log("writing images")
    save_png(result.image, out / "stylized.png")
    sheet([result.content, result.style, result.image], ["content", "style", f"{cfg.method}"]).save(out / "sheet.png")
    losses = {k: round(float(v), 6) for k, v in result.losses.items()}
    timings = {"optimise_or_train_seconds": round(result.seconds, 3)}
    report = {"summary": f"{cfg.method}: style loss cut {100 * losses['style_loss_cut']:.1f}%",
              "metrics": losses, "losses": losses, "loss_network": result.loss_net,
              "result": {"method": cfg.method, "stylized": "stylized.png", "sheet": "sheet.png"}}
    if cfg.method != "gatys":
        from ..bundle import load_bundle
        from ..style.export import export_style_bundle

        hooks.log("exporting the bundle")
        bundle = export_style_bundle(result, out / "bundle.sdb", name=cfg.model_name, size=recipe.size,
                                     style_name=cfg.style_image.rsplit("/", 1)[-1], version=cfg.version)
        timings["inference_seconds_onnx"] = round(_time_bundle(load_bundle(bundle), result), 4)
        report["result"].update(bundle="bundle.sdb", model=cfg.model_name, version=cfg.version, deployed=False)
    timings["total_seconds"] = round(time.perf_counter() - t0, 3)
    report["timings"] = timings
    hooks.log(f"losses {losses}; timings {timings}")
    return report


def _time_bundle(bundle, result) -> float:
    """Seconds for one stylization of the result's content image in ONNX Runtime (best of 3)."""
    import time

    import numpy as np

    feeds = {"input": result.content[None].detach().cpu().numpy()}
    if bundle.meta["style"]["method"] == "adain":
        feeds.update(style=result.style[None].detach().cpu().numpy(), alpha=np.ones(1, np.float32))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        bundle.session.run(None, feeds)
        best = min(best, time.perf_counter() - t)
    return best

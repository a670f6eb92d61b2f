"""``style``: neural style transfer as a job, by one of three methods.

- ``gatys``: optimise the pixels of one image (no network to keep);
- ``fast``: train a feed-forward network for the one style image (Johnson et al.);
- ``adain``: train an AdaIN decoder on several style images; any style works afterwards.

Images are embedded names (``chelsea``, ``flower``, ...; see ``sdb_core.style.images``) or
PNG/JPEG files under the data directory. Artifacts: ``stylized.png``, ``sheet.png`` (content,
style, result side by side), ``bundle.sdb`` (task ``style``, for ``fast`` and ``adain``), and
the job's ``report.json`` with the losses, timings and the loss network. ``deploy: true``
serves the bundle, the way the ``wrap`` kind does, for ``POST /v1/style/{name}``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...errors import invalid
from .base import NAME_PATTERN, JobParams, Submission, job_kind, under


class StyleParams(JobParams):
    method: Literal["gatys", "fast", "adain"]
    content: str = Field("chelsea", description="content image: an embedded name or a file under the data dir")
    style: str = Field("flower", description="style image: an embedded name or a file under the data dir")
    styles: list[str] | None = Field(None, min_length=1, max_length=64,
                                     description="adain: the training styles (default: the embedded set plus style)")
    train_content: str = Field("embedded", description="fast/adain crops: embedded | imagefolder:PATH (data dir)")
    weights: str | None = Field(None, description="VGG-19 state dict (torchvision layout) under the data dir; "
                                "absent: the seeded random VGG-19")
    size: int = Field(256, ge=32, le=1024, description="result size (shorter side, centre square)")
    steps: int = Field(200, ge=1, le=5000, description="gatys: optimisation steps")
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    epochs: int = Field(4, ge=1, le=1000, description="fast/adain: epochs")
    samples: int = Field(400, ge=4, le=1_000_000, description="fast/adain: crops per epoch")
    crop: int = Field(96, ge=32, le=512, description="fast/adain: training crop size (multiple of 16)")
    batch_size: int = Field(4, ge=1, le=256)
    style_weight: float | None = Field(None, ge=0, le=1e6)
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="adain: content-style trade-off of the result")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="bundle name (default style-METHOD-STYLE)")
    deploy: bool = False

    @field_validator("crop")
    @classmethod
    def _crop(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"crop must be a multiple of 16, got {v}")
        return v

    @model_validator(mode="after")
    def _method_fits(self):
        if self.method == "gatys" and self.deploy:
            raise ValueError("gatys optimises one image: there is no network to deploy")
        if self.method != "adain" and self.styles is not None:
            raise ValueError("styles (several training styles) is for method adain")
        return self

    @property
    def model_name(self) -> str:
        stem = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in self.style.rsplit("/", 1)[-1])
        return self.name or f"style-{self.method}-{stem.rsplit('.', 1)[0]}"[:100]


def _image(value: str, settings, what: str) -> str:
    from sdb_core.style.images import EMBEDDED

    if value in EMBEDDED:
        return value
    path = under(settings.data_dir, value, what)
    if not path.is_file():
        raise ValueError(f"{what} {value!r} is neither an embedded image ({', '.join(EMBEDDED)}) "
                         "nor a file under the data directory")
    return str(path)


def check(p: StyleParams, sub: Submission) -> StyleParams:
    s = sub.settings
    try:
        update = {"content": _image(p.content, s, "content"), "style": _image(p.style, s, "style")}
        if p.styles is not None:
            update["styles"] = [_image(v, s, "styles") for v in p.styles]
        if p.weights is not None:
            path = under(s.data_dir, p.weights, "weights")
            if not path.is_file():
                raise ValueError(f"no weights file at {p.weights!r} under the data directory")
            update["weights"] = str(path)
        kind, sep, folder = p.train_content.partition(":")
        if p.train_content != "embedded":
            if kind != "imagefolder" or not sep or not folder:
                raise ValueError(f"train_content must be 'embedded' or 'imagefolder:PATH', got {p.train_content!r}")
            root = under(s.data_dir, folder, "train_content")
            if not root.is_dir():
                raise ValueError(f"no folder {folder!r} under the data directory")
            update["train_content"] = f"imagefolder:{root}"
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None
    return p.model_copy(update=update)


@job_kind("style", StyleParams, check)
def run(ctx, p: StyleParams) -> dict:
    import time

    from sdb_core.style import adain, fast, gatys
    from sdb_core.style.images import STYLE_IMAGES, save_png, sheet
    from sdb_core.style.loss_net import LossNetConfig, build_loss_net

    t0 = time.perf_counter()
    loss_net = build_loss_net(LossNetConfig(weights=p.weights, seed=p.seed))
    ctx.log(f"loss network: {loss_net.describe()}")
    extra = {"style_weight": p.style_weight} if p.style_weight is not None else {}
    phase = "optimise" if p.method == "gatys" else "train"
    ctx.plan(**{phase: 1})
    common = {"net": loss_net, "progress": ctx.phase(phase), "should_cancel": ctx.should_cancel}
    if p.method == "gatys":
        cfg = gatys.GatysConfig(content=p.content, style=p.style, size=p.size, steps=p.steps, optimizer=p.optimizer,
                                seed=p.seed, **extra)
        result = gatys.stylize(cfg, **common)
    elif p.method == "fast":
        cfg = fast.FastConfig(style=p.style, content=p.train_content, eval_content=p.content, size=p.size,
                              crop=p.crop, epochs=p.epochs, samples=p.samples, batch_size=p.batch_size, seed=p.seed,
                              **extra)
        result = fast.train(cfg, checkpoint=str(ctx.workdir / "checkpoint.pt"), **common)
    else:
        styles = tuple(p.styles) if p.styles else tuple(dict.fromkeys((*STYLE_IMAGES, p.style)))
        cfg = adain.AdaINConfig(styles=styles, content=p.train_content, eval_content=p.content, eval_style=p.style,
                                alpha=p.alpha, size=p.size, crop=p.crop, epochs=p.epochs, samples=p.samples,
                                batch_size=p.batch_size, seed=p.seed, **extra)
        result = adain.train(cfg, checkpoint=str(ctx.workdir / "checkpoint.pt"), **common)
    ctx.step("writing images")
    save_png(result.image, ctx.artifacts / "stylized.png")
    sheet([result.content, result.style, result.image], ["content", "style", f"{p.method}"]).save(
        ctx.artifacts / "sheet.png")
    losses = {k: round(float(v), 6) for k, v in result.losses.items()}
    timings = {"optimise_or_train_seconds": round(result.seconds, 3)}
    out = {"summary": f"{p.method}: style loss cut {100 * losses['style_loss_cut']:.1f}%",
           "metrics": losses, "losses": losses, "loss_network": result.loss_net,
           "result": {"method": p.method, "stylized": "stylized.png", "sheet": "sheet.png"}}
    if p.method != "gatys":
        from sdb_core.bundle import load_bundle
        from sdb_core.style.export import export_style_bundle

        ctx.step("exporting the bundle")
        version = _version(ctx, p)
        bundle = export_style_bundle(result, ctx.artifacts / "bundle.sdb", name=p.model_name, size=p.size,
                                     style_name=p.style.rsplit("/", 1)[-1], version=version)
        timings["inference_seconds_onnx"] = round(_time_bundle(load_bundle(bundle), result), 4)
        out["result"].update(bundle="bundle.sdb", model=p.model_name, version=version, deployed=False)
        if p.deploy:
            from .wrap import deploy

            ctx.step("deploying")
            out["result"].update(deploy(ctx, bundle, p.model_name, version))
    timings["total_seconds"] = round(time.perf_counter() - t0, 3)
    out["timings"] = timings
    ctx.log(f"losses {losses}; timings {timings}")
    return out


def _version(ctx, p: StyleParams) -> str:
    from .wrap import _next_version

    return _next_version(ctx.queue.store, p.model_name) if p.deploy else "1"


def _time_bundle(bundle, result) -> float:
    """Seconds for one stylization of the result's content image in ONNX Runtime (best of 3)."""
    import time

    import numpy as np

    feeds = {"input": result.content[None].numpy()}
    if bundle.meta["style"]["method"] == "adain":
        feeds.update(style=result.style[None].numpy(), alpha=np.ones(1, np.float32))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        bundle.session.run(None, feeds)
        best = min(best, time.perf_counter() - t)
    return best

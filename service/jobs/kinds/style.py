"""``style``: neural style transfer as a job, by one of three methods (``gatys``, ``fast``, ``adain``;
:mod:`sdb_core.tasks.style` does the work).

Images are embedded names (``chelsea``, ``flower``, ...; see ``sdb_core.style.config``) or
PNG/JPEG files under the data directory. Artifacts: ``stylized.png``, ``sheet.png`` (content,
style, result side by side), ``bundle.sdb`` (task ``style``, for ``fast`` and ``adain``), and
the job's ``report.json`` with the losses, timings and the loss network. ``deploy: true``
serves the bundle, the way the ``wrap`` kind does, for ``POST /v1/style/{name}``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdb_core.style.config import EMBEDDED, AdaINConfig, FastConfig, GatysConfig
from sdb_core.tasks import style
from sdb_core.tasks.style import METHODS, StyleTask

from ...errors import invalid
from .base import NAME_PATTERN, JobParams, Submission, job_kind, under

_G, _F, _A = GatysConfig(), FastConfig(), AdaINConfig()  # the recipes' defaults; shared options agree on them


class StyleParams(JobParams):
    method: Literal[METHODS]
    content: str = Field(_G.content, description="content image: an embedded name or a file under the data dir")
    style: str = Field(_G.style, description="style image: an embedded name or a file under the data dir")
    styles: list[str] | None = Field(None, min_length=1, max_length=64,
                                     description="adain: the training styles (default: the embedded set plus style)")
    train_content: str = Field(_F.content, description="fast/adain crops: embedded | imagefolder:PATH (data dir)")
    weights: str | None = Field(None, description="VGG-19 state dict (torchvision layout) under the data dir; "
                                "absent: the seeded random VGG-19")
    size: int = Field(_G.size, ge=32, le=1024, description="result size (shorter side, centre square)")
    steps: int = Field(_G.steps, ge=1, le=5000, description="gatys: optimisation steps")
    optimizer: Literal["lbfgs", "adam"] = _G.optimizer
    # AdaIN's default serves fast too: one more epoch than FastConfig's own 3.
    epochs: int = Field(_A.epochs, ge=1, le=1000, description="fast/adain: epochs")
    samples: int = Field(_F.samples, ge=4, le=1_000_000, description="fast/adain: crops per epoch")
    crop: int = Field(_F.crop, ge=32, le=512, description="fast/adain: training crop size (multiple of 16)")
    batch_size: int = Field(_F.batch_size, ge=1, le=256)
    style_weight: float | None = Field(None, ge=0, le=1e6)
    alpha: float = Field(_A.alpha, ge=0.0, le=1.0, description="adain: content-style trade-off of the result")
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


def _image(value: str, settings, what: str) -> str:
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
    task = StyleTask.from_options(
        p.method, content=p.content, style=p.style, styles=p.styles, train_content=p.train_content, weights=p.weights,
        size=p.size, steps=p.steps, optimizer=p.optimizer, epochs=p.epochs, samples=p.samples, crop=p.crop,
        batch_size=p.batch_size, style_weight=p.style_weight, alpha=p.alpha, name=p.name, seed=p.seed)
    if p.deploy:  # the version this bundle will be served as
        from .wrap import _next_version

        task = replace(task, version=_next_version(ctx.queue.store, task.model_name))
    report = style.run(task, ctx.artifacts, ctx.hooks, work=ctx.workdir)
    if p.deploy:
        from .wrap import deploy

        ctx.step("deploying")
        report["result"].update(deploy(ctx, ctx.artifacts / "bundle.sdb", task.model_name, task.version))
    return report

"""``style``: neural style transfer as a job, by one of three methods (``gatys``, ``fast``, ``adain``;
:mod:`sdb_core.tasks.style` does the work).

Images are embedded names (``chelsea``, ``flower``, ...; see ``sdb_core.style.config``) or uploaded
PNG/JPEG files (``file-…`` ids of purpose ``image``); fast and AdaIN crops come from the embedded
photographs or an uploaded ImageFolder dataset's id; the loss network's VGG-19 weights, when given,
are a ``weights`` file id. An admin key may name paths under the data dir instead. Artifacts:
``stylized.png``, ``sheet.png`` (content, style, result side by side), ``bundle.sdb`` (task
``style``, for ``fast`` and ``adain``), and the job's ``report.json`` with the losses, timings and
the loss network. ``deploy: true`` serves the bundle, the way the ``wrap`` kind does, for ``POST
/v1/style/{name}``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdb_core.style.config import EMBEDDED, AdaINConfig, FastConfig, GatysConfig
from sdb_core.tasks import style
from sdb_core.tasks.style import METHODS, StyleTask

from ...errors import invalid
from .base import NAME_PATTERN, JobParams, Submission, data_set, input_file, job_kind

_G, _F, _A = GatysConfig(), FastConfig(), AdaINConfig()  # the recipes' defaults; shared options agree on them


class StyleParams(JobParams):
    method: Literal[METHODS]
    content: str = Field(_G.content, description="content image: an embedded name or an image file id")
    style: str = Field(_G.style, description="style image: an embedded name or an image file id")
    styles: list[str] | None = Field(None, min_length=1, max_length=64,
                                     description="adain: the training styles (default: the embedded set plus style)")
    train_content: str = Field(_F.content, description="fast/adain crops: embedded, or an uploaded ImageFolder "
                               "dataset's file id")
    weights: str | None = Field(None, description="the loss network: a weights file id of a VGG-19 state dict "
                                "(torchvision layout); absent: the seeded random VGG-19")
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


def _image(value: str, who, what: str) -> str:
    """An embedded image's name, or an uploaded image (its id) as its file for the recipe."""
    return value if value in EMBEDDED else str(input_file(value, "image", who, what))


def _inputs(p: StyleParams, who) -> dict:
    """The recipe's images, crops and loss-network weights, each file resolved for the job's key."""
    out = {"content": _image(p.content, who, "content"), "style": _image(p.style, who, "style"),
           "styles": None if p.styles is None else [_image(v, who, f"styles[{i}]") for i, v in enumerate(p.styles)],
           "weights": None if p.weights is None else str(input_file(p.weights, "weights", who, "weights")),
           "train_content": p.train_content}
    if p.train_content != "embedded":
        crops = data_set(p.train_content, who, "train_content")
        if not crops.startswith("imagefolder:"):
            raise invalid(f"train_content must be 'embedded' or an ImageFolder dataset, got {p.train_content!r}",
                          "invalid_params")
        out["train_content"] = crops
    return out


def check(p: StyleParams, sub: Submission) -> StyleParams:
    _inputs(p, sub)  # every file resolved for this key now: a 404 or 422 before anything is queued
    if p.deploy:  # early (name, allowlist, owner); the deploy checks again, the owner in its transaction
        from ...deploy import check_deploy_rights

        check_deploy_rights(sub.queue.store, _model_name(p), sub.key)
    return p


def _model_name(p: StyleParams) -> str:
    """The bundle's model name: ``name``, or style-METHOD-STYLE (an uploaded style by its id: its stored
    file is always "image.png")."""
    return StyleTask.from_options(p.method, style=p.style, name=p.name or (
        None if p.style in EMBEDDED else f"style-{p.method}-{p.style}")).model_name


@job_kind("style", StyleParams, check)
def run(ctx, p: StyleParams) -> dict:
    name = _model_name(p)
    task = StyleTask.from_options(
        p.method, **_inputs(p, ctx), size=p.size, steps=p.steps, optimizer=p.optimizer, epochs=p.epochs,
        samples=p.samples, crop=p.crop, batch_size=p.batch_size, style_weight=p.style_weight, alpha=p.alpha,
        name=name, seed=p.seed)
    if p.deploy:  # the version this bundle will be served as
        from .wrap import _next_version

        task = replace(task, version=_next_version(ctx.queue.store, task.model_name))
    report = style.run(task, ctx.artifacts, ctx.hooks, work=ctx.workdir)
    if p.deploy:
        from .wrap import deploy

        ctx.step("deploying")
        report["result"].update(deploy(ctx, ctx.artifacts / "bundle.sdb", task.model_name))
    return report

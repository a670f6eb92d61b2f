"""``okdhp``: online pose distillation (OKDHP) on the synthetic pose set or, for an admin key, a
COCO-keypoints set under the data dir (no upload purpose holds one); the target branch is exported
alone as a plain bundle of task ``pose``.

Artifacts: ``bundle.sdb`` (serve it with ``sdb models add``: ``predict`` then returns keypoints),
``predictions.png`` (test crops with the target's keypoints, left joints orange, right blue, the
ground truth as white dots), and the runner's ``report.json`` and ``curves.png``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sdb_core.tasks import pose
from sdb_core.tasks.pose import PoseTask

from ...errors import invalid
from .base import NAME_PATTERN, JobParams, Submission, job_kind, server_path

_D = PoseTask()  # the defaults: benchmarks/okdhp.py's setting (sdb_core.tasks.pose.measured)


class OKDHPParams(JobParams):
    data: str = Field(_D.okdhp.data.data,
                      description="synthetic-pose, or (admin keys) coco-keypoints:PATH under the data dir")
    n_train: int = Field(_D.okdhp.data.n_train, ge=1, le=100_000, description="synthetic set: training people")
    n_test: int = Field(_D.okdhp.data.n_test, ge=1, le=100_000, description="synthetic set: test people")
    input_size: int = Field(_D.okdhp.data.input_size, ge=16, le=512, multiple_of=16)
    width: int = Field(_D.okdhp.width, ge=4, le=512)
    shared_stacks: int = Field(_D.okdhp.shared_stacks, ge=0, le=8)
    branch_stacks: list[int] = Field(list(_D.okdhp.branch_stacks), min_length=2, max_length=8,
                                     description="stacks per branch; different depths: unbalanced OKDHP")
    target_branch: int = Field(_D.okdhp.target_branch, ge=0)
    ensemble: Literal["fau", "mean"] = _D.okdhp.ensemble
    w_kd: float = Field(_D.okdhp.w_kd, ge=0, le=100)
    w_ens: float = Field(_D.okdhp.w_ens, ge=0, le=100)
    epochs: int = Field(_D.okdhp.train.epochs, ge=1, le=1000)
    lr: float = Field(_D.okdhp.train.lr, gt=0, le=1)
    batch_size: int = Field(_D.okdhp.train.batch_size, ge=1, le=1024)
    name: str = Field(_D.name, pattern=NAME_PATTERN, description="the bundle's model name")

    @model_validator(mode="after")
    def _branches(self):
        if min(self.branch_stacks) < 1 or max(self.branch_stacks) > 8:
            raise ValueError("every branch needs 1 to 8 stacks")
        if self.target_branch >= len(self.branch_stacks):
            raise ValueError(f"target_branch {self.target_branch} is not one of {len(self.branch_stacks)} branches")
        return self


def pose_data(value: str, who) -> str:
    """The pose set: the synthetic one by name, or an admin key's COCO-keypoints folder under the data dir."""
    kind, sep, path = value.partition(":")
    if kind == "coco-keypoints" and sep and path:
        return f"coco-keypoints:{server_path(path, who, 'data')}"
    if value != "synthetic-pose":
        raise invalid(f"unknown pose data {value[:100]!r}; known: synthetic-pose, coco-keypoints:PATH (admin keys)",
                      "invalid_params")
    return value


def check(p: OKDHPParams, sub: Submission) -> OKDHPParams:
    pose_data(p.data, sub)
    return p


@job_kind("okdhp", OKDHPParams, check)
def run(ctx, p: OKDHPParams) -> dict:
    task = PoseTask.from_options(
        data=pose_data(p.data, ctx), root=str(ctx.settings.data_dir / "pose-data"), n_train=p.n_train, n_test=p.n_test,
        input_size=p.input_size, width=p.width, shared_stacks=p.shared_stacks, branch_stacks=p.branch_stacks,
        target_branch=p.target_branch, ensemble=p.ensemble, w_kd=p.w_kd, w_ens=p.w_ens, epochs=p.epochs, lr=p.lr,
        batch_size=p.batch_size, name=p.name, seed=p.seed)
    return pose.run(task, ctx.artifacts, ctx.hooks)

"""``okdhp``: online pose distillation (OKDHP) on the synthetic pose set or a COCO-keypoints set under
the data dir; the target branch is exported alone as a plain bundle of task ``pose``.

Artifacts: ``bundle.sdb`` (serve it with ``sdb models add``: ``predict`` then returns keypoints),
``predictions.png`` (test crops with the target's keypoints, left joints orange, right blue, the
ground truth as white dots), and the runner's ``report.json`` and ``curves.png``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...errors import invalid
from .base import NAME_PATTERN, JobParams, Submission, job_kind, under


class OKDHPParams(JobParams):
    data: str = Field("synthetic-pose", description="synthetic-pose, or coco-keypoints:PATH (under the data dir)")
    n_train: int = Field(600, ge=1, le=100_000, description="synthetic set: training people")
    n_test: int = Field(200, ge=1, le=100_000, description="synthetic set: test people")
    input_size: int = Field(64, ge=16, le=512, multiple_of=16)
    width: int = Field(32, ge=4, le=512)
    # The defaults are benchmarks/okdhp.py's: the stem shared, three 2-stack branches (the authors'
    # main model), Adam 5e-3 at batch 8 (the paper's 2.5e-4 does not learn in a few hundred steps).
    shared_stacks: int = Field(0, ge=0, le=8)
    branch_stacks: list[int] = Field([2, 2, 2], min_length=2, max_length=8,
                                     description="stacks per branch; different depths: unbalanced OKDHP")
    target_branch: int = Field(0, ge=0)
    ensemble: Literal["fau", "mean"] = "fau"
    w_kd: float = Field(2.0, ge=0, le=100)
    w_ens: float = Field(1.0, ge=0, le=100)
    epochs: int = Field(6, ge=1, le=1000)
    lr: float = Field(5e-3, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=1024)
    name: str = Field("pose-okdhp", pattern=NAME_PATTERN, description="the bundle's model name")

    @model_validator(mode="after")
    def _branches(self):
        if min(self.branch_stacks) < 1 or max(self.branch_stacks) > 8:
            raise ValueError("every branch needs 1 to 8 stacks")
        if self.target_branch >= len(self.branch_stacks):
            raise ValueError(f"target_branch {self.target_branch} is not one of {len(self.branch_stacks)} branches")
        return self


def check(p: OKDHPParams, sub: Submission) -> OKDHPParams:
    kind, sep, path = p.data.partition(":")
    try:
        if kind == "coco-keypoints" and sep and path:
            return p.model_copy(update={"data": f"coco-keypoints:{under(sub.settings.data_dir, path, 'data')}"})
        if p.data != "synthetic-pose":
            raise ValueError(f"unknown pose data {p.data!r}; known: synthetic-pose, coco-keypoints:PATH")
    except ValueError as e:
        raise invalid(str(e), "invalid_params") from None
    return p


@job_kind("okdhp", OKDHPParams, check)
def run(ctx, p: OKDHPParams) -> dict:
    from sdb_core.distill.okdhp import (
        OKDHPConfig,
        PoseDataConfig,
        export_pose_bundle,
        okdhp,
        pose_train_config,
        predict_keypoints,
    )
    from sdb_core.distill.pose_metrics import draw_pose_grid

    data_cfg = PoseDataConfig(data=p.data, root=str(ctx.settings.data_dir / "pose-data"), n_train=p.n_train,
                              n_test=p.n_test, input_size=p.input_size)
    cfg = OKDHPConfig(data=data_cfg, width=p.width, shared_stacks=p.shared_stacks,
                      branch_stacks=tuple(p.branch_stacks), target_branch=p.target_branch, ensemble=p.ensemble,
                      w_kd=p.w_kd, w_ens=p.w_ens,
                      train=pose_train_config(epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, schedule="cosine",
                                              seed=p.seed))
    ctx.step(f"loading {p.data}")
    data = data_cfg.load()
    ctx.log(f"{p.data}: {len(data.train)} training and {len(data.test)} test people, {p.input_size}px crops")
    ctx.plan(okdhp=p.epochs)
    res = okdhp(cfg, data, progress=ctx.phase("okdhp"), should_cancel=ctx.should_cancel)
    m = res.metrics
    ctx.log(f"target branch {p.target_branch}: PCK {m['pck']:.2f}, AP {m['ap']:.2f}; ensemble PCK "
            f"{m['ensemble_pck']:.2f}; plain mean of branches {m['mean_ensemble_pck']:.2f}")
    ctx.step("exporting the target branch")
    export_pose_bundle(res.target, data, ctx.artifacts / "bundle.sdb", name=p.name,
                       metrics={k: round(v, 4) for k, v in m.items()})
    points, _ = predict_keypoints(res.target, data.test, data.test.stride)
    draw_pose_grid(data.test, points, ctx.artifacts / "predictions.png")
    return {"summary": f"OKDHP {p.name}: PCK {m['pck']:.1f}, AP {m['ap']:.1f} (target branch {p.target_branch})",
            "metrics": {k: round(v, 4) for k, v in m.items()},
            "result": {"model": p.name, "bundle": "bundle.sdb", "predictions": "predictions.png",
                       "gflops": res.gflops, "seconds": round(res.seconds, 2)},
            "config": {"branch_stacks": list(p.branch_stacks), "shared_stacks": p.shared_stacks, "width": p.width,
                       "ensemble": p.ensemble, "w_kd": p.w_kd, "w_ens": p.w_ens, "epochs": p.epochs}}

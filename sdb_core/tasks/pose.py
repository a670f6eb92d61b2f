"""The ``pose`` task: online pose distillation (OKDHP) on the synthetic pose set or a COCO-keypoints set; the
target branch is exported alone as a plain bundle of task ``pose``, beside a figure of its predictions."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..distill.okdhp_config import OKDHPConfig, PoseDataConfig, pose_train_config
from ..progress import Hooks


def measured() -> OKDHPConfig:
    """The setting benchmarks/okdhp.py measures: the stem shared, three 2-stack branches (the authors' main
    model), Adam 5e-3 at batch 8 on a cosine schedule (the paper's 2.5e-4 does not learn in a few hundred
    steps), 6 epochs on 600 synthetic people. The rest is the recipe's."""
    return OKDHPConfig(data=PoseDataConfig(n_train=600), shared_stacks=0, branch_stacks=(2, 2, 2),
                       train=pose_train_config(epochs=6, lr=5e-3, batch_size=8, schedule="cosine"))


@dataclass(frozen=True)
class PoseTask:
    okdhp: OKDHPConfig = field(default_factory=measured)
    name: str = "pose-okdhp"  # the bundle's model name
    seed: int = 0  # of the training (the synthetic set has its own, ``okdhp.data.data_seed``)

    @classmethod
    def from_options(cls, *, data: str | None = None, root: str | None = None, n_train: int | None = None,
                     n_test: int | None = None, input_size: int | None = None, width: int | None = None,
                     shared_stacks: int | None = None, branch_stacks: list[int] | None = None,
                     target_branch: int | None = None, ensemble: str | None = None, w_kd: float | None = None,
                     w_ens: float | None = None, epochs: int | None = None, lr: float | None = None,
                     batch_size: int | None = None, **task) -> PoseTask:
        """The task from the flat options the job's params give; ``None`` keeps a default."""
        given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
        base = measured()
        cfg = replace(base, data=replace(base.data, **given(data=data, root=root, n_train=n_train, n_test=n_test,
                                                            input_size=input_size)),
                      train=replace(base.train, **given(epochs=epochs, lr=lr, batch_size=batch_size)),
                      **given(width=width, shared_stacks=shared_stacks, target_branch=target_branch,
                              ensemble=ensemble, w_kd=w_kd, w_ens=w_ens,
                              branch_stacks=None if branch_stacks is None else tuple(branch_stacks)))
        return cls(okdhp=cfg, **task)


def run(cfg: PoseTask, out: str | os.PathLike, hooks: Hooks | None = None) -> dict:
    """Load the data, train the branches online, and write ``bundle.sdb`` (the target branch) and
    ``predictions.png`` (test crops with its keypoints) to the directory ``out``. Returns the report."""
    from ..distill.okdhp import export_pose_bundle, okdhp, predict_keypoints
    from ..distill.pose_metrics import draw_pose_grid
    from ..outputs import out_dir

    out_dir(out)  # before any work: a path it cannot write is refused now
    hooks = hooks or Hooks()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ok = replace(cfg.okdhp, train=replace(cfg.okdhp.train, seed=cfg.seed))
    d = ok.data
    hooks.log(f"loading {d.data}")
    data = d.load()
    hooks.log(f"{d.data}: {len(data.train)} training and {len(data.test)} test people, {d.input_size}px crops")
    res = okdhp(ok, data, progress=hooks.phase("okdhp"), should_cancel=hooks.should_cancel)
    m = res.metrics
    hooks.log(f"target branch {ok.target_branch}: PCK {m['pck']:.2f}, AP {m['ap']:.2f}; ensemble PCK "
              f"{m['ensemble_pck']:.2f}; plain mean of branches {m['mean_ensemble_pck']:.2f}")
    hooks.log("exporting the target branch")
    export_pose_bundle(res.target, data, out / "bundle.sdb", name=cfg.name,
                       metrics={k: round(v, 4) for k, v in m.items()})
    points, _ = predict_keypoints(res.target, data.test, data.test.stride)
    draw_pose_grid(data.test, points, out / "predictions.png")
    return {"summary": f"OKDHP {cfg.name}: PCK {m['pck']:.1f}, AP {m['ap']:.1f} (target branch {ok.target_branch})",
            "metrics": {k: round(v, 4) for k, v in m.items()},
            "result": {"model": cfg.name, "bundle": "bundle.sdb", "predictions": "predictions.png",
                       "gflops": res.gflops, "seconds": round(res.seconds, 2)},
            "config": {"branch_stacks": list(ok.branch_stacks), "shared_stacks": ok.shared_stacks, "width": ok.width,
                       "ensemble": ok.ensemble, "w_kd": ok.w_kd, "w_ens": ok.w_ens, "epochs": ok.train.epochs}}

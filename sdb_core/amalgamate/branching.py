"""Task branching: one student for scene parsing + depth (+ more) from heterogeneous teachers.

After "Student Becoming the Master" (Ye et al., CVPR 2019, arXiv 1904.10167). Each teacher is
an :class:`~sdb_core.models.encdec.EncDec` trained on its own task. The student is one shared
encoder-decoder; for every task it *branches out* after some stage: its features there go
through a per-teacher adaptor (a 1x1 conv) into the rest of that teacher's network, which is
frozen. The loss is computed in the teacher's domain, against the teacher's own output on the
same image: cross-entropy to the segmentation teacher's argmax, L1 to the depth teacher's map
(BCE to the edge teacher's probabilities for a third task). No human label reaches the student.

Branch-out points are chosen automatically: during the first part of training every batch
samples one candidate point per task and trains through it; the point with the lowest teacher
loss (averaged over the second half of that search) is kept per task, the student's stages
past the deepest kept point and the unused adaptors are dropped, and training goes on with
the kept points only.

``branching(config)`` trains the teachers on the scene labels when none are given, amalgamates,
and also trains a multi-task network of the student's shape from scratch *with* labels for
comparison. Every training run goes through :func:`sdb_core.train.fit`. The tasks themselves (output
channels, ground truth, losses, metrics) are in :mod:`sdb_core.amalgamate.scene_tasks`.
"""
from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from sdb_core.amalgamate.config import TASKS, BranchingConfig
from sdb_core.amalgamate.scene_tasks import (
    depth_errors,  # noqa: F401 (re-exported, as are edge_f1 and miou: callers import the metrics from here)
    edge_f1,  # noqa: F401
    evaluate,
    label_loss,
    miou,  # noqa: F401
    predict_tasks,
    task_channels,
    task_labels,
    teacher_loss,
)
from sdb_core.data.scenes import Scenes, edge_map, make_scenes
from sdb_core.models.encdec import EncDec, count_params
from sdb_core.progress import Progress
from sdb_core.train import TrainConfig, fit, pick_device, seed_everything

Phase = Callable[[str], Callable[[Progress], None] | None]


@dataclass
class BranchingResult:
    branch_points: dict[str, str]             # task -> stage after which it branches out
    search_losses: dict[str, dict[str, float | None]]  # task -> candidate -> mean teacher loss in the search
    # (None: the candidate was never sampled, so it has no loss; JSON has no Infinity)
    teachers: dict[str, dict[str, float]]      # task -> metrics (and "params")
    student: dict[str, float]                  # metrics of every task, "params"
    scratch: dict[str, float] | None           # the labelled multi-task baseline, same metrics
    teacher_params: int
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    student_model: BranchedStudent | None = field(default=None, repr=False)
    teacher_models: dict[str, EncDec] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("student_model", None)
        d.pop("teacher_models", None)
        return d


# ---- modules -------------------------------------------------------------------------------------

class _Frozen(nn.Module):
    """A copy of a teacher held fixed: no gradients to its weights, BatchNorm always in eval mode.

    A copy, so that pruning the stages the student replaces leaves the caller's teacher whole.
    """

    def __init__(self, net: EncDec):
        super().__init__()
        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # a frozen teacher never trains, whatever its parent does
        return super().train(False)


class BranchedStudent(nn.Module):
    """Shared stages, then per task an adaptor into the rest of that (frozen) teacher.

    ``adaptors`` holds one 1x1 conv per (task, candidate point) while the points are searched;
    :meth:`settle` keeps one per task and drops the shared stages no task needs any more.
    """

    def __init__(self, trunk: EncDec, teachers: dict[str, EncDec], candidates: Sequence[str]):
        super().__init__()
        self.trunk = trunk
        self.teachers = nn.ModuleDict({t: _Frozen(net) for t, net in teachers.items()})
        self.tasks = list(teachers)
        s_ch, names = trunk.stage_channels, trunk.stage_names
        self.adaptors = nn.ModuleDict()
        for t, net in teachers.items():
            t_ch = net.stage_channels
            for c in candidates:
                i = names.index(c)
                self.adaptors[f"{t}@{c}"] = nn.Conv2d(s_ch[i], t_ch[i], 1)
        self.branch: dict[str, str] = {}
        self.keep = len(names)  # shared stages actually run

    def settle(self, branch: dict[str, str]) -> None:
        """Fix each task's branch point; drop unused adaptors and trunk stages past the deepest point."""
        names = self.trunk.stage_names
        self.branch = dict(branch)
        self.adaptors = nn.ModuleDict({f"{t}@{c}": self.adaptors[f"{t}@{c}"] for t, c in self.branch.items()})
        self.keep = max(names.index(c) for c in self.branch.values()) + 1
        self.trunk.stages = nn.ModuleDict(dict(list(self.trunk.stages.items())[:self.keep]))
        # The teacher stages up to the branch point are the student's job now: empty them, so
        # that the student's weights and parameter count hold only what it runs.
        for t, c in self.branch.items():
            teacher = self.teachers[t].net
            for name in teacher.stage_names[:names.index(c) + 1]:
                teacher.stages[name] = nn.Identity()

    def through(self, task: str, point: str, h: Tensor) -> Tensor:
        """Project the shared features ``h`` (output of stage ``point``) into the teacher's rest."""
        start = self.trunk.stage_names.index(point) + 1
        return self.teachers[task].net.forward_from(self.adaptors[f"{task}@{point}"](h), start)

    def shared(self, x: Tensor, points: set[str]) -> dict[str, Tensor]:
        """Run the shared stages once, keeping the outputs at ``points``."""
        out: dict[str, Tensor] = {}
        last = max(self.trunk.stage_names.index(p) for p in points)
        for i, (name, stage) in enumerate(self.trunk.stages.items()):
            if i > last:
                break
            x = stage(x)
            if name in points:
                out[name] = x
        return out

    def forward_tasks(self, x: Tensor, points: dict[str, str] | None = None) -> dict[str, Tensor]:
        points = points or self.branch
        feats = self.shared(x, set(points.values()))
        return {t: self.through(t, p, feats[p]) for t, p in points.items()}

    def forward(self, x: Tensor) -> Tensor:
        """All task outputs concatenated on the channel axis, in ``self.tasks`` order (one ONNX output)."""
        outs = self.forward_tasks(x)
        return torch.cat([outs[t] for t in self.tasks], 1)


class MultiTaskNet(nn.Module):
    """The labelled baseline: one encoder-decoder whose head has every task's channels."""

    def __init__(self, tasks: Sequence[str], num_classes: int, widths: Sequence[int], convs: int):
        super().__init__()
        self.tasks = list(tasks)
        self.split = [task_channels(t, num_classes) for t in self.tasks]
        self.net = EncDec(3, sum(self.split), widths, convs)

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.tasks, torch.split(self.net(x), self.split, 1), strict=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Single(nn.Module):
    """One teacher seen as a multi-task model with one task (so evaluation has one path)."""

    def __init__(self, task: str, net: nn.Module):
        super().__init__()
        self.task, self.net = task, net

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        return {self.task: self.net(x)}


# ---- training ------------------------------------------------------------------------------------

def _train_cfg(cfg: BranchingConfig, epochs: int, schedule: str = "cosine", seed_offset: int = 0) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adam", weight_decay=0.0,
                       schedule=schedule, seed=cfg.seed + seed_offset, device=cfg.device)


def _start_at_mean(head: nn.Conv2d, channel: int, target: Tensor) -> None:
    """Start a regression channel at the mean target: with L1 and Adam the bias otherwise
    needs hundreds of steps just to climb from 0 to a depth near 1."""
    with torch.no_grad():
        head.bias[channel] = target.float().mean()


def train_teacher(task: str, scenes: Scenes, cfg: BranchingConfig, *, progress=None, should_cancel=None) -> EncDec:
    """A teacher for ``task`` trained on the scenes' labels."""
    seed_everything(cfg.seed + 1 + TASKS.index(task))
    net = EncDec(3, task_channels(task, cfg.num_classes), cfg.teacher_widths, cfg.convs)
    data = TensorDataset(torch.from_numpy(scenes.images), task_labels(task, scenes))
    if task == "depth":
        _start_at_mean(net.stages["head"], 0, data.tensors[1])

    def step(batch):
        x, y = batch
        return label_loss(task, net(x), y)

    fit(net, data, step, _train_cfg(cfg, cfg.teacher_epochs, seed_offset=1 + TASKS.index(task)),
        progress=progress, should_cancel=should_cancel)
    return net.eval()


def default_candidates(trunk: EncDec) -> list[str]:
    """From the bottleneck (last encoder stage) to the last decoder stage."""
    names = trunk.stage_names
    return names[len(trunk.widths) - 1:-1]


def amalgamate(teachers: dict[str, EncDec], images: Tensor, cfg: BranchingConfig, *, phase: Phase | None = None,
               should_cancel=None, log=print) -> tuple[BranchedStudent, dict, dict]:
    """Train the branched student on ``images`` against ``teachers``; returns it, the search
    losses per task and candidate, and the training histories. ``images`` carry no labels."""
    phase = phase or (lambda name: None)
    seed_everything(cfg.seed)
    trunk = EncDec(3, 1, cfg.widths, cfg.convs)
    candidates = list(cfg.candidates or default_candidates(trunk))
    student = BranchedStudent(trunk, teachers, candidates)
    tasks = list(teachers)
    student.to(pick_device(cfg.device))

    # The teachers' outputs are fixed: computed once, they become the training targets (by the student's copies of
    # the teachers, whole until settle() prunes them, and on its device: the caller's may be on the CPU).
    targets = {t: predict_tasks(_Single(t, student.teachers[t].net), images)[t] for t in tasks}
    data = TensorDataset(images, *[targets[t] for t in tasks])

    search_epochs = cfg.search_epochs
    rng = random.Random(cfg.seed)
    # (step, loss) of each sampled candidate; the losses stay on the device until the search ends (a read-back a step
    # would wait for the GPU every step)
    record: dict[str, dict[str, list]] = {t: {c: [] for c in candidates} for t in tasks}
    counter = [0]

    def search_step(batch):
        x, *ys = batch
        points = {t: rng.choice(candidates) for t in tasks}
        outs = student.forward_tasks(x, points)
        losses = {t: teacher_loss(t, outs[t], y) for t, y in zip(tasks, ys, strict=True)}
        for t, loss in losses.items():
            record[t][points[t]].append((counter[0], loss.detach()))
        counter[0] += 1
        return sum(losses.values()), {f"loss_{t}": v.detach() for t, v in losses.items()}

    log(f"branch-point search over {candidates} for {search_epochs} of {cfg.epochs} epochs")
    h_search = fit(student, data, search_step, _train_cfg(cfg, search_epochs, "constant"),
                   params=[p for p in student.parameters() if p.requires_grad],
                   progress=phase("search"), should_cancel=should_cancel)

    # Compare candidates on the second half of the search, when the shared stages are no
    # longer random; a candidate never sampled there falls back to its whole record.
    half = counter[0] // 2
    taken = [v for t in tasks for rows in record[t].values() for _, v in rows]
    values = iter(torch.stack(taken).tolist() if taken else [])  # one read-back, in the order taken
    record = {t: {c: [(step, next(values)) for step, _ in rows] for c, rows in record[t].items()} for t in tasks}
    search_losses: dict[str, dict[str, float | None]] = {}
    branch: dict[str, str] = {}
    for t in tasks:
        means: dict[str, float | None] = {}
        for c, rows in record[t].items():
            late = [v for s, v in rows if s >= half] or [v for _, v in rows]
            means[c] = float(np.mean(late)) if late else None
        search_losses[t] = means
        branch[t] = min(candidates, key=lambda c, m=means: math.inf if m[c] is None else m[c])
    student.settle(branch)
    log("chosen branch points: " + ", ".join(f"{t} after {c}" for t, c in branch.items()))

    def tune_step(batch):
        x, *ys = batch
        outs = student.forward_tasks(x)
        losses = {t: teacher_loss(t, outs[t], y) for t, y in zip(tasks, ys, strict=True)}
        return sum(losses.values()), {f"loss_{t}": v.detach() for t, v in losses.items()}

    h_tune = fit(student, data, tune_step, _train_cfg(cfg, cfg.epochs - search_epochs, seed_offset=100),
                 params=[p for p in student.parameters() if p.requires_grad],
                 progress=phase("finetune"), should_cancel=should_cancel)
    return student.eval(), search_losses, {"search": h_search.epochs, "finetune": h_tune.epochs}


def train_scratch(scenes: Scenes, cfg: BranchingConfig, *, progress=None, should_cancel=None) -> MultiTaskNet:
    """The comparison: the student's encoder-decoder with every task's head, trained on labels."""
    seed_everything(cfg.seed + 50)
    net = MultiTaskNet(cfg.tasks, cfg.num_classes, cfg.widths, cfg.convs)
    data = TensorDataset(torch.from_numpy(scenes.images), *[task_labels(t, scenes) for t in cfg.tasks])
    if "depth" in cfg.tasks:
        layout = output_layout(cfg.tasks, cfg.num_classes)
        _start_at_mean(net.net.stages["head"], layout["depth"][0], task_labels("depth", scenes))

    def step(batch):
        x, *ys = batch
        outs = net.forward_tasks(x)
        return sum(label_loss(t, outs[t], y) for t, y in zip(cfg.tasks, ys, strict=True))

    fit(net, data, step, _train_cfg(cfg, cfg.epochs, seed_offset=50), progress=progress,
        should_cancel=should_cancel)
    return net.eval()


def branching(cfg: BranchingConfig, *, teachers: dict[str, EncDec] | None = None,
              train: Scenes | None = None, test: Scenes | None = None, phase: Phase | None = None,
              should_cancel=None, log: Callable[[str], None] = print) -> BranchingResult:
    """Teachers (given, or trained on scene labels), the amalgamated student, the scratch baseline; the
    networks are trained on ``cfg.device`` and handed back there (the given teachers are copied, not moved)."""
    import time

    t0 = time.perf_counter()
    phase = phase or (lambda name: None)
    train = train if train is not None else make_scenes(cfg.n_train, size=cfg.size, num_classes=cfg.num_classes,
                                                        seed=1000 + cfg.seed)
    test = test if test is not None else make_scenes(cfg.n_test, size=cfg.size, num_classes=cfg.num_classes,
                                                     seed=2000 + cfg.seed)
    teachers = dict(teachers or {})
    for t in cfg.tasks:
        if t not in teachers:
            log(f"training the {t} teacher on labelled scenes")
            teachers[t] = train_teacher(t, train, cfg, progress=phase(f"teacher_{t}"), should_cancel=should_cancel)
    teachers = {t: teachers[t].eval() for t in cfg.tasks}
    teacher_metrics = {t: {**evaluate(_Single(t, net), test, cfg.num_classes), "params": count_params(net)}
                       for t, net in teachers.items()}

    student, search_losses, history = amalgamate(teachers, torch.from_numpy(train.images), cfg, phase=phase,
                                                 should_cancel=should_cancel, log=log)
    student_metrics = {**evaluate(student, test, cfg.num_classes), "params": count_params(student)}
    scratch_metrics = None
    if cfg.scratch:
        log("training the multi-task network from scratch with labels")
        scratch = train_scratch(train, cfg, progress=phase("scratch"), should_cancel=should_cancel)
        scratch_metrics = {**evaluate(scratch, test, cfg.num_classes), "params": count_params(scratch)}
    return BranchingResult(
        branch_points=dict(student.branch), search_losses=search_losses, teachers=teacher_metrics,
        student=student_metrics, scratch=scratch_metrics,
        teacher_params=sum(count_params(n) for n in teachers.values()), history=history,
        seconds=time.perf_counter() - t0, student_model=student, teacher_models=teachers)


# ---- artifacts -----------------------------------------------------------------------------------

def output_layout(tasks: Sequence[str], num_classes: int) -> dict[str, list[int]]:
    """Channel range [start, stop) of each task in the student's single concatenated output."""
    layout, start = {}, 0
    for t in tasks:
        stop = start + task_channels(t, num_classes)
        layout[t] = [start, stop]
        start = stop
    return layout


def export_student(student: BranchedStudent, out, *, name: str, size: int, num_classes: int,
                   class_names: Sequence[str], metrics: dict | None = None, extra: dict | None = None):
    """The student as an ONNX bundle (mode plain) of task ``segmentation-depth``.

    One graph output: every task's maps concatenated on the channel axis; ``meta.json``'s
    ``outputs`` says which channels are whose (seg logits, then depth, then edges logits).
    """
    from sdb_core.bundle import export_bundle

    task = "-".join({"seg": "segmentation", "depth": "depth", "edges": "edges"}[t] for t in student.tasks)
    layout = output_layout(student.tasks, num_classes)
    with torch.no_grad():
        return export_bundle(student.cpu().eval(), out, name=name, in_shape=(3, size, size), mean=(0.0, 0.0, 0.0),
                             std=(1.0, 1.0, 1.0), labels=["background", *class_names], task=task,
                             metrics=metrics or {},
                             extra={"outputs": layout, "branch_points": dict(student.branch), **(extra or {})})


def prediction_figure(student: nn.Module, teachers: dict[str, nn.Module], scenes: Scenes, out, n: int = 4,
                      num_classes: int = 4):
    """A PNG: per scene, the image, then for each task the ground truth, each teacher and the student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(scenes))
    x = torch.from_numpy(scenes.images[:n])
    s_out = predict_tasks(student, x)
    t_out = {t: predict_tasks(_Single(t, net), x)[t] for t, net in teachers.items()}
    columns: list[tuple[str, Callable[[int], np.ndarray], dict]] = [
        ("image", lambda i: scenes.images[i].transpose(1, 2, 0), {})]
    seg_kw = {"cmap": "tab10", "vmin": 0, "vmax": 9, "interpolation": "nearest"}
    for t in s_out:
        if t == "seg":
            show = {"label": scenes.seg, "teacher": t_out[t].argmax(1).numpy(), "student": s_out[t].argmax(1).numpy()}
            kw = seg_kw
        elif t == "depth":
            show = {"label": scenes.depth, "teacher": t_out[t][:, 0].numpy(), "student": s_out[t][:, 0].numpy()}
            kw = {"cmap": "viridis", "vmin": 0.2, "vmax": 1.0}
        else:
            show = {"label": edge_map(scenes.seg[:n]), "teacher": torch.sigmoid(t_out[t][:, 0]).numpy(),
                    "student": torch.sigmoid(s_out[t][:, 0]).numpy()}
            kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
        for who, arr in show.items():
            columns.append((f"{t} {who}", lambda i, a=arr: a[i], kw))
    fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), 1.6 * n), squeeze=False)
    for i in range(n):
        for j, (title, get, kw) in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(get(i), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out

"""AFK: amalgamating filtered knowledge (Ye et al., IJCAI 2019, arXiv 1905.11569).

Several multi-label teachers, each expert on its own labels ("tasks"), teach one student the
tasks a user names (any subset of their union), with no labels. The knowledge is *filtered*
twice, so the student spends its capacity on the requested tasks only:

- teacher side: the feature maps a student block imitates are weighted per channel by how
  much that channel drives the teacher's requested outputs (|activation x gradient| of the
  requested logits, measured once on the transfer set), so channels serving tasks nobody
  asked for are not copied; the teacher's predictions are kept for requested tasks only;
- student side: every block has a channel gate per task (a sigmoid, L1-penalised so each
  task keeps the channels it needs); a teacher's adaptor sees the student's features through
  the gates of that teacher's requested tasks, and each task's head reads the last block
  through its own gate.

Training is layer-wise, as in the paper: block ``l`` of the student is trained with the
blocks before it frozen, so that (through a learned 1x1 adaptor per teacher, which also bridges
different widths) it reproduces each teacher's block-``l`` features and, pushed through the rest
of that teacher (``forward_from``), the teacher's sigmoid outputs on the requested tasks. The
last stage also trains the task heads against the teachers' filtered outputs. Then the whole
student is fine-tuned end to end against those outputs. Every stage is one call of ``fit``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from sdb_core.amalgamate.config import AFKConfig, TeacherSpec
from sdb_core.amalgamate.multilabel import (
    MultiLabelNet,
    count_params,
    mean_average_precision,
    predict_probs,
    reported_aps,
    reported_map,
)
from sdb_core.progress import Progress
from sdb_core.train import History, TrainConfig, fit, pick_device, seed_everything

GATE_INIT = 2.0  # sigmoid(2) = 0.88: every channel starts open; the L1 term closes the unused ones


# ---- result (the config and TeacherSpec are in sdb_core.amalgamate.config) ----------------------

@dataclass
class AFKResult:
    student: FilteredStudent
    tasks: list[int]
    params: int
    teacher_params: dict[str, int]
    map: float | None                      # student mAP (percent) on the requested tasks, test composites
    ap: dict[int, float | None]            # per requested task (None: no positive among the test composites)
    teacher_map: float | None              # the teachers' mAP on the same tasks (each task by its teacher)
    teacher_ap: dict[int, float | None]
    active_channels: dict[int, int]        # per task: last-block channels its gate keeps open (> 0.5)
    history: dict[str, History]            # one per stage: "block0", ..., "finetune"

    def report(self) -> dict:
        return {
            "tasks": self.tasks, "params": self.params, "teacher_params": self.teacher_params,
            "map": self.map, "ap": {str(k): v for k, v in self.ap.items()},
            "teacher_map": self.teacher_map, "teacher_ap": {str(k): v for k, v in self.teacher_ap.items()},
            "active_channels": {str(k): v for k, v in self.active_channels.items()},
            "widths": list(self.student.widths),
            "history": {k: h.to_dict() for k, h in self.history.items()},
        }


# ---- the student --------------------------------------------------------------------------------

class FilteredStudent(MultiLabelNet):
    """A ``MultiLabelNet`` trunk with a channel gate per task on every block; one output per requested task.

    ``gate_logits[l]`` is (tasks, width_l); the gate is ``sigmoid(gate_scale * logit)``. The head
    of task k reads the max-pooled last block through task k's gate, so the outputs are exactly
    the requested tasks, in ``tasks`` order. ``gate_scale`` > 1 makes the gates move that much
    faster under Adam (whose steps do not depend on the gradient's size), so that the L1 term can
    close channels within a short training; it is a buffer, saved with the weights.
    """

    def __init__(self, in_channels: int, tasks: Sequence[int], widths: Sequence[int], *, stem_stride: int = 2,
                 gate_scale: float = 1.0):
        super().__init__(in_channels, len(tasks), widths, stem_stride=stem_stride)
        if not gate_scale > 0:
            raise ValueError(f"gate_scale must be > 0, got {gate_scale}")
        self.tasks = [int(k) for k in tasks]
        self.register_buffer("gate_scale", torch.tensor(float(gate_scale)))
        self.gate_logits = nn.ParameterList(
            nn.Parameter(torch.full((len(self.tasks), w), GATE_INIT / gate_scale)) for w in self.widths)

    def gates(self, level: int) -> Tensor:
        return torch.sigmoid(self.gate_scale * self.gate_logits[level])

    def task_gate(self, level: int, rows: Sequence[int]) -> Tensor:
        """The channel mask of a group of tasks (a teacher's): a channel open for any of them is open."""
        return self.gates(level)[list(rows)].amax(dim=0)

    def head_logits(self, h: Tensor) -> Tensor:
        pooled = torch.amax(h, dim=(2, 3))                       # (N, C)
        weight = self.head.fc.weight * self.gates(len(self.blocks) - 1)  # (K, C): task k sees its channels
        return pooled @ weight.t() + self.head.fc.bias

    def forward_from(self, h: Tensor, start: int) -> Tensor:
        for block in self.blocks[start:]:
            h = block(h)
        return self.head_logits(h)


def default_student_widths(teachers: Sequence[TeacherSpec], tasks: Sequence[int], scale: float) -> list[int]:
    """Width per block so that the student's size follows the share of each teacher's tasks requested.

    A conv block's parameters grow with width squared, so width_l = scale * sqrt(sum_t w_tl^2 *
    requested_t / labels_t): asking for all tasks gives about scale^2 of the teachers' total,
    asking for a few gives proportionally less. Rounded up to a multiple of 4, at least 8.
    """
    wanted = set(tasks)
    share = [len(wanted & set(t.labels)) / len(t.labels) for t in teachers]
    depth = len(teachers[0].model.blocks)
    out = []
    for level in range(depth):
        w = scale * math.sqrt(sum(s * t.model.widths[level] ** 2 for s, t in zip(share, teachers)))
        out.append(max(8, 4 * math.ceil(w / 4)))
    return out


# ---- the recipe ---------------------------------------------------------------------------------

@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, device: torch.device, batch_size: int = 256) -> Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def _channel_relevance(teacher: MultiLabelNet, x: Tensor, level: int, outputs: list[int],
                       device: torch.device) -> Tensor:
    """Per channel of the teacher's block-``level`` output: mean |activation x gradient| of the
    requested logits, normalised to mean 1. Channels that only serve other tasks get ~0."""
    total = None
    for i in range(0, len(x), 128):
        with torch.no_grad():
            h = x[i:i + 128].to(device)
            for block in teacher.blocks[:level + 1]:
                h = block(h)
        with torch.enable_grad():  # called from inside the recipe's no_grad caching block
            h = h.detach().requires_grad_(True)
            teacher.forward_from(h, level + 1)[:, outputs].sum().backward()
        r = (h * h.grad).abs().sum(dim=(0, 2, 3)).cpu()
        total = r if total is None else total + r
    return total / total.mean().clamp_min(1e-12)


def _soft_targets(teachers: Sequence[TeacherSpec], probs: dict[str, Tensor], tasks: Sequence[int]) -> Tensor:
    """(N, K) teacher probability of every requested task; a task two teachers know gets their mean."""
    cols = []
    for k in tasks:
        cols.append(torch.stack([probs[t.name][:, t.labels.index(k)] for t in teachers if k in t.labels]).mean(0))
    return torch.stack(cols, dim=1)


def check_teachers(cfg: AFKConfig, teachers: Sequence[TeacherSpec]) -> None:
    """Raise ``ValueError`` unless the teachers can teach ``cfg``: named apart, the tasks among their
    labels, one depth (layer-wise training), and ``cfg.student_widths`` (if given) of that depth."""
    if not teachers:
        raise ValueError("at least one teacher is needed")
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be distinct, got {names}")
    union = sorted({k for t in teachers for k in t.labels})
    unknown = [k for k in cfg.tasks if k not in union]
    if unknown:
        raise ValueError(f"tasks {unknown} are not taught by any teacher (their labels: {union})")
    depth = {len(t.model.blocks) for t in teachers}
    if len(depth) != 1:
        raise ValueError(f"teachers must have the same number of blocks for layer-wise training, got {depth}")
    if cfg.student_widths is not None and len(cfg.student_widths) != depth.pop():
        raise ValueError(f"student_widths needs one width per teacher block, got {list(cfg.student_widths)}")


def afk(
    cfg: AFKConfig,
    teachers: Sequence[TeacherSpec],
    images: Tensor | None = None,
    *,
    progress: Callable[[str, Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> AFKResult:
    """Train a task-customised student from ``teachers`` without labels; see the module docstring.

    ``images``: the unlabeled transfer images; None draws ``cfg.n_transfer`` digit composites.
    ``progress`` receives the stage name ("block0", ..., "finetune") with fit's progress. Runs on
    ``cfg.train.device``: the teachers are moved there, and the student is handed back there.
    """
    from sdb_core.data.composites import make_composites

    check_teachers(cfg, teachers)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    if images is not None:
        x = images.float()
    else:
        x = torch.from_numpy(make_composites(cfg.n_transfer, split="train", grid=cfg.grid, seed=cfg.data_seed)[0])
    # Only teachers that know a requested task take part; their outputs are filtered to those tasks.
    active = [t for t in teachers if set(t.labels) & set(cfg.tasks)]
    rows = {t.name: [i for i, k in enumerate(cfg.tasks) if k in t.labels] for t in active}   # student rows
    outs = {t.name: [t.labels.index(k) for k in cfg.tasks if k in t.labels] for t in active}  # teacher cols
    for t in teachers:
        t.model.to(device).eval().requires_grad_(False)

    widths = list(cfg.student_widths) if cfg.student_widths is not None else \
        default_student_widths(active, cfg.tasks, cfg.width_scale)
    student = FilteredStudent(x.shape[1], cfg.tasks, widths, stem_stride=active[0].model.stem_stride,
                              gate_scale=cfg.gate_scale)
    student.to(device)
    depth = len(student.blocks)
    with torch.no_grad():
        probs = {t.name: _batched(lambda b, m=t.model: torch.sigmoid(m(b)), x, device) for t in active}
    target = _soft_targets(active, probs, cfg.tasks)
    teacher_out = {t.name: probs[t.name][:, outs[t.name]] for t in active}
    adaptors = nn.ModuleList(
        nn.ModuleDict({t.name: nn.Conv2d(widths[level], t.model.widths[level], 1) for t in active})
        for level in range(depth))
    trainable = nn.ModuleDict({"student": student, "adaptors": adaptors}).to(device)
    history: dict[str, History] = {}

    def report(stage: str):
        return None if progress is None else (lambda p: progress(stage, p))

    # ---- layer-wise: block l against the teachers' block-l features and their filtered outputs ----
    for level in range(depth):
        if cfg.layer_epochs == 0:
            break
        with torch.no_grad():
            student.eval()
            s_in = _batched(lambda b, lv=level: _run(student, b, lv), x, device)
            feats, weights = [], []
            for t in active:
                f = _batched(lambda b, m=t.model, lv=level: _run(m, b, lv + 1), x, device)
                rel = _channel_relevance(t.model, x[:cfg.relevance_samples], level, outs[t.name], device) \
                    if cfg.relevance_samples else torch.ones(f.shape[1])
                # Normalised by the feature energy so that the blocks' losses are on one scale.
                weights.append((rel / f.pow(2).mean().clamp_min(1e-12)).view(1, -1, 1, 1).to(device))
                feats.append(f)
        last = level == depth - 1
        params = [*student.blocks[level].parameters(), student.gate_logits[level], *adaptors[level].parameters()]
        if last:
            params += list(student.head.parameters())

        def step(batch, level=level, last=last, weights=weights):
            h_in, *t_feats, t_outs_flat, soft = batch
            h = student.blocks[level](h_in)
            loss = cfg.gate_l1 * student.gates(level).sum(1).mean()
            col = 0
            metrics = {}
            for t, f, w in zip(active, t_feats, weights):
                n = len(outs[t.name])
                a = adaptors[level][t.name](h * student.task_gate(level, rows[t.name]).view(1, -1, 1, 1))
                feat = (w * (a - f).pow(2)).mean()
                pred = t.model.forward_from(a, level + 1)[:, outs[t.name]]
                kd = F.binary_cross_entropy_with_logits(pred, t_outs_flat[:, col:col + n])
                col += n
                loss = loss + cfg.feature_weight * feat + kd
                metrics[f"feat_{t.name}"] = feat.detach()
                metrics[f"kd_{t.name}"] = kd.detach()
            if last:
                head = F.binary_cross_entropy_with_logits(student.head_logits(h), soft)
                loss = loss + head
                metrics["head"] = head.detach()
            return loss, metrics

        data = TensorDataset(s_in, *feats, torch.cat([teacher_out[t.name] for t in active], 1), target)
        stage_cfg = _with_epochs(cfg.train, cfg.layer_epochs)
        history[f"block{level}"] = fit(trainable, data, step, stage_cfg, params=params,
                                       progress=report(f"block{level}"), should_cancel=should_cancel)
        del s_in, feats, data

    # ---- end to end: the whole student against the teachers' filtered outputs ----
    if cfg.finetune_epochs:
        def ft_step(batch):
            xb, soft = batch
            kd = F.binary_cross_entropy_with_logits(student(xb), soft)
            gates = sum(student.gates(lv).sum(1).mean() for lv in range(depth))
            return kd + cfg.gate_l1 * gates, {"kd": kd.detach()}

        history["finetune"] = fit(student, TensorDataset(x, target), ft_step, _with_epochs(cfg.train, cfg.finetune_epochs),
                                  progress=report("finetune"), should_cancel=should_cancel)
    student.eval()
    return _evaluate(cfg, teachers, student, history)


def _run(net: MultiLabelNet, x: Tensor, n_blocks: int) -> Tensor:
    """The output of the first ``n_blocks`` blocks (the input of block ``n_blocks``)."""
    for block in net.blocks[:n_blocks]:
        x = block(x)
    return x


def _with_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    return replace(cfg, epochs=epochs)


def teacher_scores(teachers: Sequence[TeacherSpec], x: Tensor, tasks: Sequence[int]) -> Tensor:
    """(N, K) probability of every requested task by the teacher(s) that know it."""
    probs = {t.name: predict_probs(t.model, x) for t in teachers if set(t.labels) & set(tasks)}
    return _soft_targets([t for t in teachers if t.name in probs], probs, tasks)


def _evaluate(cfg: AFKConfig, teachers: Sequence[TeacherSpec], student: FilteredStudent,
              history: dict[str, History]) -> AFKResult:
    ap: dict[int, float | None] = {}
    teacher_ap: dict[int, float | None] = {}
    smap = tmap = None
    if cfg.eval_n:
        from sdb_core.data.composites import make_composites

        xt, yt = make_composites(cfg.eval_n, split="test", grid=cfg.grid, seed=cfg.data_seed)
        xt, y = torch.from_numpy(xt), yt[:, cfg.tasks]
        s = predict_probs(student, xt).numpy()
        tsc = teacher_scores(teachers, xt, cfg.tasks).numpy()
        ap, teacher_ap = dict(zip(cfg.tasks, reported_aps(s, y))), dict(zip(cfg.tasks, reported_aps(tsc, y)))
        smap, tmap = reported_map(s, y), reported_map(tsc, y)  # None: no positive drawn, as with eval_n 0
    gates = student.gates(len(student.blocks) - 1).detach()
    return AFKResult(
        student=student, tasks=list(cfg.tasks), params=count_params(student),
        teacher_params={t.name: count_params(t.model) for t in teachers},
        map=smap, ap=ap, teacher_map=tmap, teacher_ap=teacher_ap,
        active_channels={k: int((gates[i] > 0.5).sum()) for i, k in enumerate(cfg.tasks)},
        history=history,
    )


def untrained_map(cfg: AFKConfig, teachers: Sequence[TeacherSpec], seed: int = 0) -> float:
    """mAP of a freshly initialised student of the same size: the floor a trained one must beat."""
    from sdb_core.data.composites import make_composites

    check_teachers(cfg, teachers)
    torch.manual_seed(seed)
    active = [t for t in teachers if set(t.labels) & set(cfg.tasks)]
    widths = list(cfg.student_widths) if cfg.student_widths is not None else \
        default_student_widths(active, cfg.tasks, cfg.width_scale)
    xt, yt = make_composites(cfg.eval_n or 500, split="test", grid=cfg.grid, seed=cfg.data_seed)
    student = FilteredStudent(xt.shape[1], cfg.tasks, widths, stem_stride=active[0].model.stem_stride)
    return mean_average_precision(predict_probs(student, torch.from_numpy(xt)).numpy(), np.asarray(yt)[:, cfg.tasks])

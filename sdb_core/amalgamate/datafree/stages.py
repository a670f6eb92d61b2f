"""The data-free recipe's training stages, each one :func:`sdb_core.train.fit` run.

The generator stage by stage (:func:`train_generator`), the dual student block by block and
its end-to-end or adversarial fine-tune (:func:`train_dual`), a student from any image source
(:func:`distill_student`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from sdb_core.train import TrainConfig, device_of, fit, pick_device

from .config import DataFreeConfig, PhaseFn, TeacherSpec, label_plan, label_union
from .images import augment, save_grid
from .losses import bn_statistics_loss, generator_loss, one_hot_loss, run_teacher, soft_bce
from .networks import GroupStackGenerator, MultiBranchStudent, build_generator, build_student, regroup


def _sampler_data(n: int) -> TensorDataset:
    """Step counter for ``fit``: the batches only say how many fresh samples to draw."""
    return TensorDataset(torch.zeros(n))


def _ckpt(cfg: DataFreeConfig, name: str) -> Path | None:
    return Path(cfg.checkpoint_dir) / f"{name}.pt" if cfg.checkpoint_dir else None


def _train_cfg(cfg: DataFreeConfig, epochs: int, lr: float) -> TrainConfig:
    # Adam without weight decay, as GAN generators and data-free students are trained.
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=lr, optimizer="adam", weight_decay=0.0,
                       schedule="cosine", seed=cfg.seed, device=cfg.device)


def _teachers_to(teachers: Sequence[TeacherSpec], device: torch.device) -> None:
    """The generator and dual-student stages backpropagate through the teachers' blocks, so the teachers live on
    the training device (``datafree`` moves them there first; a direct caller's are moved here)."""
    for t in teachers:
        t.model.to(device)


class _GenStage(nn.Module):
    """What ``fit`` trains and checkpoints in a generator stage: the generator and every filter."""

    def __init__(self, generator: GroupStackGenerator, filters: nn.ModuleList):
        super().__init__()
        self.generator, self.filters = generator, filters


def train_generator(cfg: DataFreeConfig, teachers: Sequence[TeacherSpec], device: torch.device, *,
                    phase: PhaseFn | None = None, should_cancel: Callable[[], bool] | None = None,
                    grids: list[Path] | None = None, history: dict | None = None) -> GroupStackGenerator:
    _teachers_to(teachers, device)
    gen, filters = build_generator(cfg, teachers)
    holder = _GenStage(gen, filters)
    n_blocks = len(gen.blocks)
    image_epochs = cfg.gen_epochs if cfg.image_epochs is None else cfg.image_epochs
    if cfg.variant == "single_generator":
        plan = [(n_blocks, cfg.gen_epochs * (n_blocks - 1) + image_epochs, False, "generator")]
    else:
        plan = [(k, cfg.gen_epochs if k < n_blocks else image_epochs, True, f"generator_stage{k}")
                for k in range(1, n_blocks + 1)]
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed + 7)
    grid_z, grid_y = gen.draw(32)  # the same images shown after every stage
    torch.random.set_rng_state(state)
    for stages, epochs, intermediate, name in plan:
        def step(batch, stages=stages, intermediate=intermediate):
            z, y = gen.draw(len(batch[0]), device)
            return generator_loss(gen, filters, teachers, z, stages, cfg, intermediate=intermediate, y=y)

        hist = fit(holder, _sampler_data(cfg.gen_samples), step, _train_cfg(cfg, epochs, cfg.gen_lr),
                   progress=phase(name) if phase else None, should_cancel=should_cancel, checkpoint=_ckpt(cfg, name))
        if history is not None:
            history[name] = hist.epochs
        if cfg.grid_dir and grids is not None:
            gen.eval()
            with torch.no_grad():
                shown = gen(grid_z.to(device), stages, None if grid_y is None else grid_y.to(device))[-1]
            grids.append(save_grid(shown, Path(cfg.grid_dir) / f"grid_{name}.png"))
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return gen


def _targets(teachers: Sequence[nn.Module], cols: list[list[int]], order: list[int], x: Tensor) -> Tensor:
    """The teachers' logits on the target labels, in target order, on ``x``'s device (each teacher runs where it
    lives: nothing flows back through them here)."""
    with torch.no_grad():
        outs = [t(x.to(device_of(t))).to(x.device).index_select(1, torch.as_tensor(c, device=x.device))
                for t, c in zip(teachers, cols) if c]
        return torch.cat(outs, 1).index_select(1, torch.as_tensor(order, device=x.device))


def distill_student(student: MultiBranchStudent, teachers: Sequence[TeacherSpec], cfg: DataFreeConfig,
                    source: Tensor | Callable[[int], Tensor], *, epochs: int, name: str = "finetune",
                    phase: PhaseFn | None = None, should_cancel: Callable[[], bool] | None = None) -> list[dict]:
    """Train ``student`` end to end to the teachers' target-label probabilities on ``source``.

    ``source`` is a tensor of images (real ones, for the data-driven bound) or a function
    drawing ``n`` fresh images (noise, a generator), on any device: the student trains on
    ``cfg.device`` and the images are moved there; the teachers run where they live.
    """
    cols, order = label_plan(teachers, cfg.target)
    nets = [t.model for t in teachers]
    if isinstance(source, Tensor):
        data = TensorDataset(source)

        def images(batch):
            return batch[0]
    else:
        data = _sampler_data(cfg.student_samples)

        def images(batch):  # batch[0] is the step counter, already on the training device
            return source(len(batch[0])).to(batch[0].device)

    def step(batch):
        x = images(batch)
        return soft_bce(student(x), _targets(nets, cols, order, x))

    hist = fit(student, data, step, _train_cfg(cfg, epochs, cfg.student_lr),
               progress=phase(name) if phase else None, should_cancel=should_cancel, checkpoint=_ckpt(cfg, name))
    return hist.epochs


class _BlockStage(nn.Module):
    """What ``fit`` checkpoints in a student stage: all student blocks and that stage's filters."""

    def __init__(self, blocks: nn.ModuleList, filters: nn.ModuleList):
        super().__init__()
        self.blocks, self.filters = blocks, filters


def _dual_step(blocks: nn.ModuleList, filters: nn.ModuleList, teachers: Sequence[nn.Module], cols: list[list[int]],
               b: int, sample: Callable[[int], Tensor]):
    """Step of student block ``b``: its output → filter → the rest of teacher m ≈ teacher m on m's target labels."""
    index = [torch.as_tensor(c, dtype=torch.long) for c in cols]

    def step(batch):
        x = sample(len(batch[0])).to(batch[0].device)  # a sampler's images, on the training device
        with torch.no_grad():
            wanted = [t(x) if c else None for t, c in zip(teachers, cols)]
            h = x
            for blk in blocks[:b]:  # earlier blocks are done: fixed, BN statistics included
                blk.eval()
                h = blk(h)
        h = blocks[b](h)
        loss, metrics = h.new_zeros(()), {}
        for m, c in enumerate(cols):
            if not c:
                continue  # the task-level filter: a teacher holding no target label teaches nothing
            ix = index[m].to(h.device)
            _, out = run_teacher(teachers[m], filters[b][m](h), b + 1)
            part = soft_bce(out.index_select(1, ix), wanted[m].index_select(1, ix))
            metrics[f"bce_t{m}"] = part.detach()
            loss = loss + part
        return loss, metrics

    return step


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; the gradient comes back multiplied by ``-scale`` (the generator ascends what the student descends)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


class _AdvStage(nn.Module):
    """What ``fit`` trains and checkpoints in the adversarial fine-tune: the student and the generator."""

    def __init__(self, student: MultiBranchStudent, generator: GroupStackGenerator):
        super().__init__()
        self.student, self.generator = student, generator


def adversarial_finetune(student: MultiBranchStudent, gen: GroupStackGenerator,
                         teachers: Sequence[TeacherSpec], cfg: DataFreeConfig, *, epochs: int,
                         name: str = "student_finetune",
                         phase: PhaseFn | None = None, should_cancel: Callable[[], bool] | None = None) -> list[dict]:
    """The student's end-to-end fine-tune with the generator trained against it (``cfg.w_adv`` > 0).

    One loss, one optimizer: the student minimises its BCE to the teachers' probabilities on
    fresh generated images; the generator gets the reversed gradient of that BCE through the
    student (scaled by ``w_adv``), plus the teachers' one-hot and BN-prior terms on the image,
    so that it seeks images the student gets wrong without leaving what the teachers recognise.
    """
    cols, order = label_plan(teachers, cfg.target)
    union_cols = label_union(teachers)[1]
    _teachers_to(teachers, pick_device(cfg.device))
    nets = [t.model for t in teachers]
    for p in gen.parameters():
        p.requires_grad_(True)

    def step(batch):
        z, y = gen.draw(len(batch[0]), batch[0].device)
        x = augment(gen(z, y=y)[-1], cfg)
        gen_loss, picked = x.new_zeros(()), []
        for m, t in enumerate(nets):
            _, logits, bn = bn_statistics_loss(t, x, 0) if cfg.w_bn > 0 else (*run_teacher(t, x, 0), 0.0)
            oh = one_hot_loss(logits, cfg.threshold, None if y is None else y[:, union_cols[m]])
            gen_loss = gen_loss + cfg.w_onehot * oh + cfg.w_bn * bn
            if cols[m]:
                picked.append(logits.detach().index_select(1, torch.as_tensor(cols[m], device=x.device)))
        wanted = torch.cat(picked, 1).index_select(1, torch.as_tensor(order, device=x.device))
        kd = soft_bce(student(_ReverseGrad.apply(x, cfg.w_adv)), wanted)
        return kd + gen_loss, {"kd": kd.detach(), "gen": gen_loss.detach()}

    hist = fit(_AdvStage(student, gen), _sampler_data(cfg.student_samples), step,
               _train_cfg(cfg, epochs, cfg.student_lr), progress=phase(name) if phase else None,
               should_cancel=should_cancel, checkpoint=_ckpt(cfg, name))
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return hist.epochs


def train_dual(cfg: DataFreeConfig, teachers: Sequence[TeacherSpec], sample: Callable[[int], Tensor], *,
               phase: PhaseFn | None = None, should_cancel: Callable[[], bool] | None = None,
               history: dict | None = None, generator: GroupStackGenerator | None = None) -> MultiBranchStudent:
    """The dual generator: block by block through the teachers' remaining blocks, then regrouped and fine-tuned."""
    device = pick_device(cfg.device)
    _teachers_to(teachers, device)
    blocks, filters, cols, order = build_student(cfg, teachers)
    blocks.to(device)
    filters.to(device)
    for b in range(len(blocks)):
        name = f"student_block{b + 1}"
        hist = fit(_BlockStage(blocks, filters[b]), _sampler_data(cfg.student_samples),
                   _dual_step(blocks, filters, [t.model for t in teachers], cols, b, sample),
                   _train_cfg(cfg, cfg.block_epochs, cfg.student_lr),
                   params=list(blocks[b].parameters()) + list(filters[b].parameters()),
                   progress=phase(name) if phase else None, should_cancel=should_cancel, checkpoint=_ckpt(cfg, name))
        if history is not None:
            history[name] = hist.epochs
    student = regroup(blocks, filters, teachers, cols, order, cfg.target)
    if cfg.w_adv > 0 and generator is not None:
        ft = adversarial_finetune(student, generator, teachers, cfg, epochs=cfg.finetune_epochs, phase=phase,
                                  should_cancel=should_cancel)
    else:
        ft = distill_student(student, teachers, cfg, sample, epochs=cfg.finetune_epochs, name="student_finetune",
                             phase=phase, should_cancel=should_cancel)
    if history is not None:
        history["student_finetune"] = ft
    return student.eval()

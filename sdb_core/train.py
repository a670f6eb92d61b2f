"""The one training loop every recipe uses.

A recipe builds its networks, writes a *step function* that turns a batch into a loss
(and optional metrics), and hands both to :func:`fit`. The loop owns everything that is
not the method: device, seeding, optimizer and schedule, progress, cooperative cancel,
checkpoints and step timing.

Devices, everywhere in ``sdb_core``: :func:`pick_device` is the one way a device is chosen (a
config's ``device``: ``auto`` is CUDA when there is one, else the CPU) and :func:`device_of` says
where a network lives. A recipe trains on its config's device and hands back the networks it
trained there, as ``fit`` leaves its model (``.cpu()`` or :func:`device_of` when that matters); a
teacher it is given runs where it lives, or moves there (the amalgamation recipes move theirs; a wrap
copies the owner's model and leaves it alone). What maps tensors to tensors (a box's paths,
:func:`predict_logits` and the evaluation helpers, a style recipe's images) runs where its network
lives and returns on its *input's* device, the torch convention: CPU in, CPU out, on any machine.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .progress import Cancelled, Progress
from .train_config import TrainConfig, check_device

StepOutput = Tensor | tuple[Tensor, dict[str, float]]
StepFn = Callable[[Sequence[Tensor]], StepOutput]


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: float = 0.0  # mean wall time of one step: batch, forward, backward, update, the device's work

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's and torch's global generators (every recipe, through :func:`fit`); they are
    left so: a caller who draws numbers of its own after a recipe re-seeds them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(pref: str = "auto") -> torch.device:
    """The device a run asked for: ``auto`` is CUDA when there is one, else the CPU; a missing CUDA is an error,
    and so is anything but ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (a config changed after it was made)."""
    check_device(pref)
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {pref!r} asked for, but CUDA is not available here")
    return torch.device(pref)


def device_of(module: nn.Module) -> torch.device:
    """Where a network lives: its first parameter's device, else its first buffer's (a network whose weights are
    all buffers, as :class:`~sdb_core.onnx_torch.OnnxModule`'s), else the CPU (one that holds no tensor)."""
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def _optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    if cfg.schedule == "step":  # /10 at 50% and 75% of training
        return 0.1 ** sum(step >= total * m for m in (0.5, 0.75))
    return 1.0


# A TensorDataset's batches are cut from its tensors where the model trains: on a GPU the set moves there once, when
# it is at most this many bytes, so that no step copies from the host (a copy from pageable memory waits for the
# device, and the device then idles while the next step is prepared). A larger set is cut on the host.
DEVICE_DATA_MAX = 2**32
REPORT_SECONDS = 1.0  # how often fit reads its losses back (progress, the finiteness check): not every step


class TensorBatches:
    """Shuffled batches of a ``TensorDataset``, in exactly the order ``DataLoader(data, batch_size, shuffle=True,
    generator=generator)`` gives them (the same draws from ``generator``), as tensors cut by index on ``device``
    (the host for a set past ``DEVICE_DATA_MAX``: :func:`fit` moves its batches) rather than stacked sample by
    sample on the host."""

    def __init__(self, data: TensorDataset, batch_size: int, generator: torch.Generator, device: torch.device):
        size = sum(t.numel() * t.element_size() for t in data.tensors)
        self.device = device if device.type == "cpu" or size <= DEVICE_DATA_MAX else torch.device("cpu")
        self.tensors = [t.to(self.device) for t in data.tensors]
        self.batch_size, self.generator = batch_size, generator
        self.n = len(self.tensors[0]) if self.tensors else 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        # DataLoader's draws, in its order: a base seed for workers, the permutation, and a second one that its
        # sampler draws (and drops) as it runs out
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(self.n, generator=self.generator)
        torch.randperm(self.n, generator=self.generator)
        order = order.to(self.device)
        for i in range(0, self.n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield [t[idx] for t in self.tensors]


class _Losses:
    """A run's per-step losses and metrics, kept on the device and read back together (progress, the end of an
    epoch), so that a step never waits for the device: each read of a GPU value would."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.unread, self.first_unread = epoch, [], 0
        self.sums: dict[str, Tensor | float] = {}
        self.n = 0

    def add(self, loss: Tensor, metrics: Mapping[str, Tensor | float], size: int) -> None:
        loss = loss.detach().float().reshape(())
        self.unread.append(loss)
        self.n += size
        for k, v in (("loss", loss), *metrics.items()):
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v * size

    def means(self) -> dict[str, float]:
        """Every loss so far checked finite (``FloatingPointError`` names the first step that was not), and the
        epoch's means so far."""
        if self.unread:
            values = torch.stack(self.unread).float().cpu()
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):
                i = int(bad[0])
                raise FloatingPointError(f"loss became {values[i].item()} at epoch {self.epoch + 1}, "
                                         f"step {self.first_unread + i + 1}")
            self.first_unread += len(self.unread)
            self.unread = []
        return {k: float(v) / max(self.n, 1) for k, v in self.sums.items()}


def refuse_inference_tensors(*modules: nn.Module, does: str = "trains networks") -> None:
    """Raise ``ValueError`` when a network's parameters are inference tensors (made under
    ``torch.inference_mode()``): autograd can never differentiate through them, whatever mode is entered later."""
    if any(p.is_inference() for m in modules for p in m.parameters()):
        raise ValueError(f"the network's parameters are inference tensors (made under torch.inference_mode()): "
                         f"call it outside torch.inference_mode(): it {does}")


@torch.inference_mode(False)
@torch.enable_grad()
def fit(
    model: nn.Module,
    data: Dataset,
    step: StepFn,
    cfg: TrainConfig,
    *,
    params: Iterable[nn.Parameter] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint: str | os.PathLike | None = None,
    train_mode: bool = True,
) -> History:
    """Train ``model`` by minimising ``step(batch)`` over ``data`` for ``cfg.epochs``.

    ``step`` receives the batch already on the model's device; the model is in train
    mode, or with ``train_mode=False`` in eval mode throughout: normalisation layers keep
    their running statistics and dropout is off, so the model learns exactly the function
    it will serve (fine-tuning a trained network). ``params`` defaults to the model's
    parameters. With ``checkpoint`` the model and optimizer state are saved after every
    epoch and a run resumes from the file.

    A step's metrics may be tensors (``loss.detach()``) or numbers: tensors stay on the device, and the loop reads
    the losses back about once a second and at the end of each epoch, never once a step; a loss that is NaN or
    Inf there is a ``FloatingPointError`` naming its step.

    It trains with gradients on, under a caller's ``torch.no_grad()`` or ``torch.inference_mode()`` too; a
    network made under ``torch.inference_mode()`` (inference tensors) is a ``ValueError``. It seeds Python's,
    NumPy's and torch's global generators with ``cfg.seed`` (:func:`seed_everything`) and leaves them so.
    """
    refuse_inference_tensors(model)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    opt = _optimizer(params if params is not None else model.parameters(), cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    # a TensorDataset's samples are its tensors' rows, unless a subclass says otherwise (one that augments in
    # __getitem__ keeps the DataLoader, which calls it)
    rows = isinstance(data, TensorDataset) and type(data).__getitem__ is TensorDataset.__getitem__
    loader = (TensorBatches(data, cfg.batch_size, gen, device) if rows
              else DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=False))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("nothing to train on: the training set is empty")
    total = steps_per_epoch * cfg.epochs
    history = History()
    start_epoch = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        # Our own file, but still loaded the safe way: tensors and plain containers only. Onto the CPU: the load_state_dicts
        # move weights and moments to the parameters' device, but keep Adam's step counters where they were loaded,
        # and on a GPU a counter there is read back (.item()) for each parameter at every step.
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        gen.manual_seed(cfg.seed + start_epoch)

    t0 = time.perf_counter()
    loop_time, step_count = 0.0, 0
    last_report = 0.0  # the first step reports at once
    for epoch in range(start_epoch, cfg.epochs):
        model.train(train_mode)
        losses = _Losses(epoch)
        te = time.perf_counter()
        for i, batch in enumerate(loader):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled at epoch {epoch + 1}, step {i + 1}")
            global_step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(cfg, global_step, total)
            batch = [b.to(device, non_blocking=True) for b in batch]
            out = step(batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            step_count += 1
            losses.add(loss, metrics, len(batch[0]))
            now = time.perf_counter()
            if now - last_report > REPORT_SECONDS:
                last_report = now
                means = losses.means()
                if progress is not None and i + 1 < steps_per_epoch:
                    progress(Progress(epoch + 1, cfg.epochs, i + 1, steps_per_epoch,
                                      (global_step + 1) / max(total, 1), means))
        means = losses.means()
        loop_time += time.perf_counter() - te
        history.epochs.append(means)
        if progress is not None:
            progress(Progress(epoch + 1, cfg.epochs, steps_per_epoch, steps_per_epoch,
                              (epoch + 1) * steps_per_epoch / max(total, 1), means))
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(ckpt.suffix + ".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1}, tmp)
            os.replace(tmp, ckpt)
    history.seconds = time.perf_counter() - t0
    history.step_seconds = loop_time / max(step_count, 1)
    model.eval()
    return history


def logits_of(out):
    """A forward's logits: ``out`` itself, or the ``logits`` tensor of a mapping (``{"logits": z}``) or of an object
    that has one (a HuggingFace ``ModelOutput``, a dataclass); anything else as it is."""
    if isinstance(out, Tensor):
        return out
    z = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    return z if isinstance(z, Tensor) else out


@contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode for the block, then every module back in the mode it had, module by module (a
    train-mode model with frozen, eval-mode BatchNorm stays so; an owner's model comes back as handed over)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def float32_default():
    """torch's default dtype float32 for the block, then back to the caller's: the networks a recipe makes for
    itself (a check's students) are float32, as its data and its box are, under ``torch.set_default_dtype``."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@torch.no_grad()
def predict_logits(fn: Callable[[Tensor], Tensor] | nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Run ``fn`` over ``x`` in batches, in eval mode; float32 outputs on ``x``'s device.

    A module runs on its own device (the batches are moved there) and is left in the modes it was found in,
    module by module; any other callable (a box's path, an API) gets the batches where ``x`` is and places its
    work itself. An output with a ``logits`` tensor (:func:`logits_of`) answers that tensor.
    """
    module = isinstance(fn, nn.Module)
    device = device_of(fn) if module else x.device
    with evaluating(fn) if module else nullcontext():
        return torch.cat([torch.as_tensor(logits_of(fn(x[i:i + batch_size].to(device)))).float().to(x.device)
                          for i in range(0, len(x), batch_size)])


def accuracy(fn: Callable[[Tensor], Tensor] | nn.Module, data: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``fn`` on a ``TensorDataset``-like ``(x, y)`` set."""
    x, y = data.tensors[0], data.tensors[1]
    return 100.0 * (predict_logits(fn, x, batch_size).argmax(1) == y).float().mean().item()


def chance_of(labels: Tensor) -> float:
    """Accuracy (%) of the best constant answer on ``labels``: its most common class's share (an unbalanced set's)."""
    return 100.0 * torch.bincount(labels).max().item() / len(labels)


def random_shift(x: Tensor, pixels: int) -> Tensor:
    """Each image moved by up to ``pixels`` in each direction (edges replicated), independently."""
    if pixels <= 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pixels,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * pixels + 1, (n, 1), device=x.device) + torch.arange(h, device=x.device)
    dx = torch.randint(0, 2 * pixels + 1, (n, 1), device=x.device) + torch.arange(w, device=x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, dy.view(n, 1, h, 1), dx.view(n, 1, 1, w)]


def train_classifier(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    label_smoothing: float = 0.0,
    shift: int = 0,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> History:
    """Plain supervised training with cross-entropy (how an owner's teacher is made).

    ``shift``: random translations of up to that many pixels (augmentation for small sets).
    """

    def step(batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(random_shift(x, shift)), y, label_smoothing=label_smoothing)

    return fit(model, data, step, cfg, progress=progress, should_cancel=should_cancel)

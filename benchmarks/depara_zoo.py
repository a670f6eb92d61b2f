"""The DEPARA benchmark's harness: a zoo of source models, generated here, and their ground-truth transfer.

Every model is a ``ZooNet`` (``sdb_core.transfer.task_models``: one small encoder of five conv blocks
with a task head) trained on one task over two image domains that share one input format,
3 x 32 x 32 pixels in [0, 1] normalised by ``ZOO_MEAN``/``ZOO_STD``: the embedded MNIST digits (padded
to 32, grey in all three channels) and the project's synthetic scenes (``sdb_core.data.scenes``). Tasks:

- digits: ``digit`` (10 classes), ``parity`` (odd/even), ``big`` (digit >= 5), ``rotation``
  (the digit turned by k x 90 degrees: k);
- scenes: ``where`` (the quadrant of the nearest shape), ``nearest`` (the nearest shape's class),
  ``count`` (how many shapes: 2..5), ``seg`` (per-pixel class), ``depth`` (per-pixel depth);
- both: ``edges`` (per-pixel boundaries);
- added to have more targets: ``loops`` (a digit drawn with a closed loop: 0, 6, 8, 9), ``mod3`` (the
  digit mod 3), ``flip`` (the digit mirrored left-right or not), ``colours`` (how many shape classes are
  visible: 1..4), ``majority`` (the class that covers the most pixels).

Ground-truth transferability of a source to a classification target task is the test accuracy
of a small transfer head on the source's frozen features (a layer's output, average-pooled to
4 x 4) trained on a small target training set, averaged over several draws of that set (one
draw alone moves by about as much as close sources differ). The head is by default Taskonomy's
transfer function (two 3 x 3 conv layers on the frozen encoder output, then the task's readout),
the ground truth the DEPARA paper ranks against; ``head="linear"`` is a linear probe instead.
``build_zoo`` trains the zoo or loads it from a cache directory keyed by its config bar the task
list: one file per task model, so that a zoo grown by new tasks trains only those (and the ground
truth, cached per (target, source) pair next to the models, fits only the new pairs).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from sdb_core.progress import Progress
from sdb_core.train import TrainConfig, device_of, fit, predict_logits, seed_everything
from sdb_core.transfer.task_models import FEATURE_LAYER, ZooNet, train_task_model

ZOO_SHAPE = (3, 32, 32)
ZOO_MEAN, ZOO_STD = 0.5, 0.25

# task → (domain, kind, outputs): kind "cls" = image-level classes, "seg" = per-pixel classes,
# "reg" = per-pixel regression, "bin" = per-pixel binary.
TASKS: dict[str, tuple[str, str, int]] = {
    "digit": ("digits", "cls", 10),
    "parity": ("digits", "cls", 2),
    "big": ("digits", "cls", 2),
    "rotation": ("rotated", "cls", 4),
    "where": ("scenes", "cls", 4),
    "nearest": ("scenes", "cls", 4),
    "count": ("scenes", "cls", 4),
    "seg": ("scenes", "seg", 5),
    "depth": ("scenes", "reg", 1),
    "edges": ("mixed", "bin", 1),
    # added to grow the benchmark's target set (a task is a target and a source): each new entry goes last, so
    # that the older tasks keep their index, hence their training seed and their cached model
    "loops": ("digits", "cls", 2),
    "mod3": ("digits", "cls", 3),
    "flip": ("flipped", "cls", 2),
    "colours": ("scenes", "cls", 4),
    "majority": ("scenes", "cls", 4),
}
LOOPED_DIGITS = (0, 6, 8, 9)  # the digits drawn with a closed loop
# The target tasks of the benchmark: every image-level class task of the zoo. ``count``'s own model is weak
# (41-44% of 4 classes at 32 px), but the target model may be weak; whether any source transfers to it is
# the benchmark's counting rule's question, not this list's.
TARGET_TASKS = ("digit", "parity", "big", "rotation", "where", "nearest", "count",
                "loops", "mod3", "flip", "colours", "majority")


def config_key(cfg, leave_out: Sequence[str] = ()) -> str:
    """A short stable hash of a config dataclass (bar ``leave_out``): the name of its cache directory."""
    blob = json.dumps({k: v for k, v in asdict(cfg).items() if k not in leave_out}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ZooConfig:
    tasks: tuple[str, ...] = tuple(TASKS)
    train_per_domain: int = 3000  # training images per domain for the zoo models
    test_per_domain: int = 1000
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=4, batch_size=64, lr=2e-3,
                                                                    optimizer="adam", weight_decay=0.0))
    width: int = 16  # channels of the first block; later blocks 2x and 4x
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(TASKS)}, got {self.tasks!r}")
        if self.train_per_domain < 10 or self.test_per_domain < 10:
            raise ValueError(f"need >= 10 images per domain and split, got {self.train_per_domain}, "
                             f"{self.test_per_domain}")
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        self.tasks = tuple(self.tasks)

    def key(self) -> str:
        """The cache directory's name: the task list is left out, as each model is its own file trained with its
        own seed (``task_seed``), so zoos of the same recipe share their models whatever their tasks."""
        return config_key(self, leave_out=("tasks",))

    def task_seed(self, task: str) -> int:
        """The seed a task's model is trained with: its place in ``TASKS`` (not in ``tasks``), so that a task's
        model does not depend on which others are in the zoo; another zoo seed draws other initial weights."""
        return self.train.seed + list(TASKS).index(task) + 100 * self.seed


# --------------------------------------------------------------------------- data
def normalize(pixels: np.ndarray | Tensor) -> Tensor:
    x = pixels if isinstance(pixels, Tensor) else torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    return (x.float() - ZOO_MEAN) / ZOO_STD


@dataclass
class Domain:
    x: Tensor  # (n, 3, 32, 32) normalised
    labels: dict[str, Tensor]  # task → targets


def _digit_pixels(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sdb_core.data import load_dataset

    data = load_dataset("mnist-5k")
    ds = data.train if split == "train" else data.test
    x, y = ds.tensors
    raw = (x * data.std[0] + data.mean[0]).clamp(0, 1)  # back to pixels in [0, 1]
    raw = F.pad(raw, (2, 2, 2, 2))  # 28 → 32
    return raw.repeat(1, 3, 1, 1).numpy(), y.numpy()


def _edges_of(mask: np.ndarray) -> np.ndarray:
    from sdb_core.data.scenes import edge_map

    return edge_map(mask.astype(np.int64))


def digit_labels(y: np.ndarray) -> dict[str, np.ndarray]:
    """The digit tasks' targets from the digit classes ``y``."""
    return {"digit": y, "parity": y % 2, "big": (y >= 5).astype(np.int64),
            "loops": np.isin(y, LOOPED_DIGITS).astype(np.int64), "mod3": y % 3}


def mirror_half(pix: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a random half of the images (N, C, H, W) left-right: (images, 1 where mirrored). Half, drawn per
    image, so that the flip task's classes are balanced."""
    flipped = rng.integers(0, 2, size=len(pix))
    out = np.where(flipped[:, None, None, None] == 1, pix[..., ::-1], pix)
    return np.ascontiguousarray(out), flipped.astype(np.int64)


def scene_labels(seg: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """The scene tasks read from the class map (N, H, W), what the image shows (occluded shapes do not count):
    ``colours``, how many classes own a pixel, minus 1 (the nearest shape is always seen, so 0..num_classes-1);
    ``majority``, the class that owns the most pixels, minus 1 (ties: the lower class)."""
    area = np.stack([(seg == c).sum(axis=(1, 2)) for c in range(1, num_classes + 1)], axis=1)
    return {"colours": np.maximum((area > 0).sum(1) - 1, 0), "majority": area.argmax(1)}


def make_domain(name: str, n: int, split: str, seed: int) -> Domain:
    """``n`` images of domain ``digits``, ``rotated``, ``flipped``, ``scenes`` or ``mixed`` with every task's
    targets."""
    rng = np.random.default_rng(seed + (0 if split == "train" else 7919))
    if name in ("digits", "rotated", "flipped"):
        pix, y = _digit_pixels(split)
        idx = rng.choice(len(y), size=n, replace=n > len(y))
        pix, y = pix[idx], y[idx]
        labels = digit_labels(y)
        if name == "rotated":
            k = rng.integers(0, 4, size=n)
            pix = np.stack([np.rot90(p, int(r), axes=(1, 2)) for p, r in zip(pix, k)])
            labels = {"rotation": k}
        elif name == "flipped":
            pix, flipped = mirror_half(pix, rng)
            labels = {"flip": flipped}
        labels["edges"] = _edges_of(pix[:, 0] > 0.5)[:, None]
        return Domain(normalize(pix), {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in labels.items()})
    if name == "scenes":
        from sdb_core.data.scenes import edge_map, make_scenes

        s = make_scenes(n, size=ZOO_SHAPE[1], num_classes=4, seed=seed * 2 + (0 if split == "train" else 1))
        rows = np.arange(n)
        near = np.argmin(s.shape_depth, 1)  # undrawn slots sit at the background depth: never nearest
        cy, cx = s.shape_geom[rows, near, 0], s.shape_geom[rows, near, 1]
        half = ZOO_SHAPE[1] / 2
        labels = {"where": (cy >= half).astype(np.int64) * 2 + (cx >= half), "nearest": s.shape_class[rows, near] - 1,
                  "count": s.counts.sum(1) - 2, "seg": s.seg,
                  "depth": s.depth[:, None], "edges": edge_map(s.seg)[:, None], **scene_labels(s.seg, 4)}
        return Domain(normalize(s.images), {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in labels.items()})
    if name == "mixed":
        a, b = make_domain("digits", n - n // 2, split, seed), make_domain("scenes", n // 2, split, seed)
        return Domain(torch.cat([a.x, b.x]), {"edges": torch.cat([a.labels["edges"], b.labels["edges"]])})
    raise ValueError(f"unknown domain {name!r}")


def task_data(task: str, n: int, split: str, seed: int) -> TensorDataset:
    """(images, targets) of ``task``: ``n`` images of its domain."""
    domain, _, _ = TASKS[task]
    d = make_domain(domain, n, split, seed)
    y = d.labels[task]
    y = y.long() if y.dtype in (torch.int32, torch.int64, torch.bool) else y.float()
    return TensorDataset(d.x, y)


# --------------------------------------------------------------------------- scoring the models
def task_score(kind: str, out: Tensor, y: Tensor) -> float:
    """Accuracy in percent (pixel accuracy for dense class maps); negative MSE for regression."""
    if kind in ("cls", "seg"):
        return 100.0 * (out.argmax(1) == y).float().mean().item()
    if kind == "reg":
        return -F.mse_loss(out, y).item()
    return 100.0 * ((out > 0).float() == y).float().mean().item()


def evaluate(model: ZooNet, data: TensorDataset, batch_size: int = 250) -> float:
    """The model's score on ``data`` (it runs where it lives; the outputs come back to the data's device)."""
    x, y = data.tensors
    return task_score(model.kind, predict_logits(model, x, batch_size), y)


# --------------------------------------------------------------------------- the zoo
@dataclass
class Zoo:
    config: ZooConfig
    models: dict[str, ZooNet]
    scores: dict[str, float]  # each model's test score on its own task
    directory: Path | None = None

    def truth_dir(self) -> Path | None:
        """Where ``transfer_accuracy_draws`` keeps this zoo's ground truth (next to its models)."""
        return self.directory / "truth" if self.directory is not None else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDB_CACHE_DIR") or Path(tempfile.gettempdir()) / "sdb-cache") / "depara-zoo"


def build_zoo(cfg: ZooConfig, *, cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
              progress: Callable[[str], Callable[[Progress], None]] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> Zoo:
    """Train every task's model (or load it from ``cache_dir/<config key>``); report own-task scores."""
    from sdb_core.weights import load_weights, save_weights

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    where = root / cfg.key()
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    models, scores = {}, {}
    for task in cfg.tasks:
        _, kind, outputs = TASKS[task]
        path = where / f"{task}.safetensors"
        test = task_data(task, cfg.test_per_domain, "test", cfg.seed)
        if path.exists():
            model = load_weights(ZooNet(kind, outputs, 3, cfg.width), path).eval()
        else:
            train = task_data(task, cfg.train_per_domain, "train", cfg.seed)
            tcfg = TrainConfig(**{**asdict(cfg.train), "seed": cfg.task_seed(task)})
            model = train_task_model(task, train, tcfg, kind=kind, outputs=outputs, width=cfg.width,
                                     progress=progress(task) if progress else None, should_cancel=should_cancel)
            save_weights(model, path)
        models[task] = model
        scores[task] = evaluate(model, test)
        if log:
            log(f"zoo model {task}: own-task test score {scores[task]:.2f}")
    return Zoo(cfg, models, scores, where)


# --------------------------------------------------------------------------- ground truth
def _pool(h: Tensor, grid: int, flatten: bool = True) -> Tensor:
    h = F.adaptive_avg_pool2d(h, grid) if h.dim() == 4 else h
    return h.flatten(1) if flatten else h


def pooled_features(model: nn.Module, layer: str | None, x: Tensor, grid: int = 4, batch_size: int = 250) -> Tensor:
    """A layer's output average-pooled to ``grid`` x ``grid`` (vectors pass through), flattened."""
    return pooled_features_at(model, [layer], x, grid, batch_size)[layer]


def pooled_features_at(model: nn.Module, layers: Sequence[str | None], x: Tensor, grid: int = 4,
                       batch_size: int = 250, flatten: bool = True) -> dict[str | None, Tensor]:
    """``pooled_features`` of several layers from one forward pass per batch (None: the model's output);
    ``flatten=False`` keeps feature maps as (N, C, grid, grid)."""
    from sdb_core.transfer.depara import _module

    model.eval()
    device = device_of(model)
    seen: dict[str | None, Tensor] = {}
    hooks = []
    for layer in layers:
        if layer is None or layer == "":
            continue

        def hook(_m, _inp, out, layer=layer):
            # pooled at once: a copy, so a later in-place op of the forward pass cannot change it
            seen[layer] = _pool(out[0] if isinstance(out, (tuple, list)) else out, grid, flatten).to(x.device)

        hooks.append(_module(model, layer).register_forward_hook(hook))
    outs: dict[str | None, list[Tensor]] = {layer: [] for layer in layers}
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                seen.clear()
                y = model(x[i:i + batch_size].to(device))
                for layer in layers:
                    outs[layer].append(_pool(y, grid, flatten).to(x.device) if layer is None or layer == ""
                                       else seen[layer])
    finally:
        for h in hooks:
            h.remove()
    return {layer: torch.cat(v) for layer, v in outs.items()}


HEADS = ("readout", "linear")


def _default_head_train(head: str) -> TrainConfig:
    if head == "linear":
        return TrainConfig(epochs=60, batch_size=100, lr=1e-2, optimizer="adam", weight_decay=1e-3, schedule="cosine")
    return TrainConfig(epochs=30, batch_size=100, lr=1e-3, optimizer="adam", weight_decay=1e-4, schedule="cosine")


@dataclass
class ProbeConfig:
    train_n: int = 1000  # the small target training set (300 gave a noisier ground truth: see README)
    test_n: int = 1000
    # "readout": Taskonomy's transfer function, two 3x3 conv layers (``width`` channels, ReLU) on the frozen
    # features and a linear readout, the transfer the DEPARA paper's ground truth measures; "linear": a
    # linear probe on the flattened features (the previous ground truth, kept for comparison).
    head: str = "readout"
    width: int = 64
    train: TrainConfig | None = None  # None: the head's default (see _default_head_train)
    # The small training set is drawn ``draws`` times (the probe initialised with another seed each time) and
    # the ground truth is the mean: one draw's accuracies move by ~0.5-2.5 points, as much as sources differ.
    draws: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_n < 2 or self.test_n < 1:
            raise ValueError(f"need train_n >= 2 and test_n >= 1, got {self.train_n}, {self.test_n}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.train is None:
            self.train = _default_head_train(self.head)
        elif isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)

    def key(self) -> str:
        """What a ground-truth cache is keyed by: everything but ``draws`` (draw r does not depend on it)."""
        return config_key(self, leave_out=("draws",))


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, cfg: TrainConfig) -> float:
    """Test accuracy (percent) of a linear classifier on standardised frozen features, trained by ``fit``."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    seed_everything(cfg.seed)  # the probe's initial weights too (fit seeds only what comes after)
    probe = nn.Linear(a.shape[1], _num_classes(train_y, test_y))
    return _fit_and_score(probe, a, train_y, b, test_y, cfg)


def readout_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, cfg: TrainConfig,
                  width: int = 64) -> float:
    """Test accuracy (percent) of a Taskonomy-style transfer head on frozen feature maps (N, C, H, W):
    two 3x3 conv layers with ReLU, then a linear readout of the whole map, trained by ``fit``. Features
    are standardised per channel (statistics of the training set). Vectors (N, D) are read as D x 1 x 1 maps."""
    if train_x.dim() == 2:
        train_x, test_x = train_x[:, :, None, None], test_x[:, :, None, None]
    mu = train_x.mean((0, 2, 3), keepdim=True)
    sd = train_x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    seed_everything(cfg.seed)  # the head's initial weights too (fit seeds only what comes after)
    c, h, w = a.shape[1:]
    head = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(width * h * w, _num_classes(train_y, test_y)))
    return _fit_and_score(head, a, train_y, b, test_y, cfg)


def _num_classes(train_y: Tensor, test_y: Tensor) -> int:
    return int(max(train_y.max(), test_y.max())) + 1


def _fit_and_score(head: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                   cfg: TrainConfig) -> float:
    """Train ``head`` with cross-entropy by ``fit``; its test accuracy in percent."""

    def step(batch):
        x, y = batch
        return F.cross_entropy(head(x), y)

    fit(head, TensorDataset(train_x, train_y), step, cfg)
    return 100.0 * (predict_logits(head, test_x).argmax(1) == test_y).float().mean().item()


def _transfer_head(cfg: ProbeConfig, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                   tcfg: TrainConfig) -> float:
    if cfg.head == "linear":
        return linear_probe(train_x.flatten(1), train_y, test_x.flatten(1), test_y, tcfg)
    return readout_probe(train_x, train_y, test_x, test_y, tcfg, cfg.width)


def truth_split(task: str, cfg: ProbeConfig, draw: int | None) -> TensorDataset:
    """The ground truth's images of ``task``: draw ``draw``'s small training set, or (None) the fixed test set."""
    if draw is None:
        return task_data(task, cfg.test_n, "test", cfg.seed + 101)
    return task_data(task, cfg.train_n, "train", cfg.seed + 101 + draw)


def transfer_accuracy_draws(sources: dict[str, nn.Module], target_task: str, cfg: ProbeConfig,
                            layers: Sequence[str | None] = (FEATURE_LAYER,), *,
                            cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, list[float]]]:
    """source → layer → transfer-head accuracy on ``target_task`` for each of ``cfg.draws`` small training sets
    (one fixed test set: the draws differ by the training images and the head's initialisation).

    With ``cache_dir`` every (source, layer, draw) accuracy is kept in ``cache_dir/<cfg.key()>/`` and read back
    instead of refitted: a source is named by its key in ``sources``, so the directory must belong to one set of
    models (``Zoo.truth_dir()``: the zoo's own cache). Draw r is the same fit whatever ``cfg.draws`` is, so
    asking for more draws later fits only the new ones."""
    from dataclasses import replace

    where = Path(cache_dir) / cfg.key() if cache_dir is not None else None
    data: dict[str, TensorDataset] = {}

    def split(r: int | None) -> TensorDataset:  # built once, and only when some fit is missing
        if r not in data:
            data[r] = truth_split(target_task, cfg, r)
        return data[r]

    out: dict[str, dict[str, list[float]]] = {}
    for name, model in sources.items():
        path = where / f"{target_task}--{name}.json" if where is not None else None
        known: dict[str, dict[str, float]] = json.loads(path.read_text()) if path and path.exists() else {}
        missing = [r for r in range(cfg.draws) if any(str(r) not in known.get(la or "output", {}) for la in layers)]
        if missing:
            te = split(None)
            fte = pooled_features_at(model, layers, te.tensors[0], flatten=False)
            for r in missing:
                tr = split(r)
                ftr = pooled_features_at(model, layers, tr.tensors[0], flatten=False)
                tcfg = replace(cfg.train, seed=cfg.train.seed + r)
                for layer in layers:
                    known.setdefault(layer or "output", {})[str(r)] = _transfer_head(
                        cfg, ftr[layer], tr.tensors[1], fte[layer], te.tensors[1], tcfg)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(known, indent=1))
                tmp.replace(path)  # a killed run leaves the old file, never half of one
        out[name] = {layer or "output": [known[layer or "output"][str(r)] for r in range(cfg.draws)]
                     for layer in layers}
    return out


def transfer_accuracy(sources: dict[str, nn.Module], target_task: str, cfg: ProbeConfig,
                      layers: Sequence[str | None] = (FEATURE_LAYER,)) -> dict[str, dict[str, float]]:
    """source → layer → transfer-head accuracy on ``target_task``'s small training set (mean over the draws)."""
    draws = transfer_accuracy_draws(sources, target_task, cfg, layers)
    return {n: {la: float(np.mean(v)) for la, v in d.items()} for n, d in draws.items()}


def probe_images(task: str, n: int, seed: int = 0) -> Tensor:
    """``n`` unlabelled images of ``task``'s domain: the probe set DEPARA reads (no labels used)."""
    return task_data(task, n, "test", seed + 202).tensors[0]

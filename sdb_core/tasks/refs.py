"""``ModelRef``: one way to name a model everywhere (a zoo architecture with weights, a bundle, a hosted model)."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ONNX_ARCH = "onnx"  # what a bundle's meta and a default model name call a network brought as ONNX


def is_onnx_file(path: str | Path) -> bool:
    """Whether a model file is an ONNX network, by its name (what torch.onnx.export and tf2onnx write, and what the
    service stores an uploaded one as)."""
    return str(path).lower().endswith(".onnx")


def onnx_input_shape(path: str | Path) -> list[int | None]:
    """An ONNX model's input shape (None for a free axis), its first input that is not a stored tensor."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    stored = {i.name for i in g.initializer}
    first = next(i for i in g.input if i.name not in stored)
    return [d.dim_value if d.HasField("dim_value") else None for d in first.type.tensor_type.shape.dim]


def image_size_for(data: str, *models: ModelRef | None) -> int | None:
    """The size an ``imagefolder:`` data set is read at for a task: the side of the images its model takes, where
    that model fixes one (the folder's images are the owner's, of any size; its default, 32, would not fit a
    network made for 64 or 224); None (the set's own) otherwise, and for every other data set."""
    if not data.strip().lower().startswith("imagefolder:"):
        return None
    sides = set()
    for m in models:
        try:
            side = m.image_side() if m is not None else None
        except Exception:  # noqa: BLE001 - a model that cannot be read: its loading says why, later
            side = None
        if side is not None:
            sides.add(side)
    return sides.pop() if len(sides) == 1 else None


@dataclass(frozen=True)
class ModelRef:
    """A model a task reads. Exactly one source:

    - ``arch`` + ``weights``: a zoo architecture and its weights file (safetensors, or a ``.pt``
      read with ``weights_only``); ``arch`` alone is an untrained network (a wrap trains it first);
    - ``weights``, an ``.onnx`` file: a network of any architecture, its graph run (and fine-tuned) in torch
      (:func:`~sdb_core.onnx_torch.onnx_classifier`); it brings its own network, so ``arch`` means nothing;
    - ``bundle``: a bundle directory or ``.sdb`` file;
    - ``model`` (+ ``version``): a hosted model, which the service resolves to its bundle
      (:meth:`hosted_at`) before a task runs; a task never sees an unresolved one.
    """

    arch: str | None = None
    weights: str | None = None
    bundle: str | None = None
    model: str | None = None
    version: str | None = None
    num_classes: int | None = None  # a plain model's outputs, where no data set says it
    # The normalisation a plain model was trained with, (x - mean) / std of the data's raw values (images: pixels in
    # [0, 1]; one value for every channel, or one per channel); None: the data set's own, which the box gives
    # every network (as every network this project trains takes). Its inputs are mapped from the one to the other.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        sources = [s for s in ("weights", "bundle") if getattr(self, s) is not None]
        if len(sources) > 1:
            raise ValueError(f"a model reference names one source, got {' and '.join(sources)}")
        if self.weights is not None and self.arch is None and not self.is_onnx:
            raise ValueError("weights need their architecture (arch), unless they are an ONNX model (.onnx)")
        if self.is_onnx and self.arch is not None:  # it would be ignored: the graph is the network
            raise ValueError(f"an ONNX model brings its own network: give no architecture with it (got {self.arch!r})")
        if self.model is None and self.version is not None:
            raise ValueError("version needs a hosted model name (model)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("a model's input normalisation needs both mean and std")
        if self.mean is not None and self.weights is None:
            raise ValueError("mean and std are a plain model's (weights or ONNX): a bundle says its own")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise ValueError(f"std must be positive, got {list(self.std)}")
        if self.arch is None and self.bundle is None and self.model is None and not self.is_onnx:
            raise ValueError("a model reference needs arch (+ weights), an ONNX model, a bundle or a hosted model")

    @property
    def is_onnx(self) -> bool:
        return self.weights is not None and is_onnx_file(self.weights)

    @property
    def kind(self) -> str:
        if self.bundle is not None:
            return "bundle"
        if self.model is not None:
            return "hosted"
        return "weights" if self.weights is not None else "untrained"

    def hosted_at(self, bundle: str | Path, version: str) -> ModelRef:
        """This hosted model resolved to its served bundle (the version pinned)."""
        return replace(self, bundle=str(bundle), version=version)

    @classmethod
    def parse(cls, text: str) -> tuple[str | None, ModelRef]:
        """``[NAME=]ARCH:NUM_CLASSES:WEIGHTS``, ``[NAME=]MODEL.onnx`` or ``[NAME=]PATH`` of a bundle (the CLI's form):
        ``(name, ref)``."""
        name, sep, rest = text.partition("=")
        if not sep:
            name, rest = None, text
        if not rest.strip():
            raise ValueError(f"{text!r} names no model: give PATH of a bundle, MODEL.onnx or ARCH:NUM_CLASSES:WEIGHTS")
        parts = rest.split(":", 2)
        if len(parts) == 3 and parts[1].isdigit():
            return name, cls(arch=parts[0], weights=parts[2], num_classes=int(parts[1]))
        return name, cls(weights=rest) if is_onnx_file(rest) else cls(bundle=rest)

    def describe(self) -> str:
        """For logs and reports: what this is, without any server path of a hosted model."""
        if self.model is not None:
            return f"model {self.model}" + (f" version {self.version}" if self.version else "")
        if self.bundle is not None:
            return f"bundle {self.bundle}"
        what = (f"ONNX model {self.weights}" if self.is_onnx else f"{self.arch} weights {self.weights}" if self.weights
                else f"untrained {self.arch}")
        return what + ("" if self.mean is None else f" (inputs normalised by mean {list(self.mean)}, std {list(self.std)})")

    def image_side(self) -> int | None:
        """The side of the square images this model takes where it fixes one (an ONNX graph's input (N, C, S, S) or
        channels last (N, S, S, C), a bundle's input shape), else None (a zoo network takes any size)."""
        if self.is_onnx:
            shape = onnx_input_shape(self.weights)
        elif self.bundle is not None:  # its meta alone (the task's loading verifies the whole bundle)
            import json

            from ..bundle import META_FILE, read_bundle_files

            shape = [None, *json.loads(read_bundle_files(self.bundle, (META_FILE,))[META_FILE])["input"]["shape"]]
        else:
            return None
        if len(shape) != 4:
            return None
        for h, w in ((shape[2], shape[3]), (shape[1], shape[2])):  # channels first, then last
            if isinstance(h, int) and h > 3 and h == w:
                return h
        return None

    # ------------------------------------------------------------------ loading (torch from here on)
    def network(self, num_classes: int | None, in_shape, data_norm=None) -> Any:
        """A plain model's torch network with its weights, in eval mode (``num_classes``: the reference's own first),
        taking inputs normalised as ``data_norm`` = ``(mean, std)`` says (the data's), when it was trained on
        others (:attr:`mean`, :attr:`std`)."""
        from ..models import create_model
        from ..weights import WeightsError, load_weights

        if self.weights is None:
            raise ValueError(f"{self.describe()} is not a plain model with weights")
        if self.is_onnx:
            from ..onnx_torch import onnx_classifier

            try:
                net = onnx_classifier(self.weights, in_shape, classes=self.num_classes or num_classes)
            except ValueError as e:
                raise ValueError(f"{self.describe()}: {e}") from None
        else:
            n = self.num_classes or num_classes
            if n is None:
                raise ValueError(f"{self.describe()}: the number of classes is not known")
            try:
                net = load_weights(create_model(self.arch, num_classes=n, in_shape=tuple(in_shape)), self.weights)
            except WeightsError as e:
                raise WeightsError(f"{e}{_inputs_read(self.weights, in_shape)}") from None
            net = net.eval()
        own = None if self.mean is None else (self.mean, self.std)
        if own is None and self.is_onnx and data_norm is not None:
            import torch

            from ..onnx_ops import LEVELS
            from ..onnx_torch import pixel_levels

            if pixel_levels(net) == LEVELS[torch.uint8]:  # uint8 pixels: 0 black, 255 white (mean 0, std 1/255)
                own = ([0.0], [1.0 / 255.0])
        if own is None:
            return net
        from ..protect.teacher import Renormalized

        if data_norm is None:
            raise ValueError(f"{self.describe()}: its inputs' mean and std are given, the data's are not known")
        return Renormalized(net, data_norm, own, in_shape)

    def check_classes(self, data, role: str) -> None:
        """Refuse, in words, plain weights whose ``num_classes`` is not the data set's: a teacher or target
        that answers other classes than the set's labels cannot be compared with them (a loss of
        mismatched shapes, deep in training, otherwise)."""
        if self.weights is not None and self.num_classes is not None and self.num_classes != data.num_classes:
            raise ValueError(f"the {role} answers {self.num_classes} classes (its num_classes) but the data set has "
                             f"{data.num_classes}: give weights trained on this set's classes, or its own data set")

    def classifier(self, data, role: str) -> Any:
        """This plain model's network (:meth:`network`) as a classifier of ``data``, checked right after loading and
        before any training by the check a wrap runs on its teacher (:func:`~sdb_core.protect.teacher.check_teacher`):
        a network that does not answer the set's classes (an ONNX graph's 10 outputs for 8 classes, whatever its
        ``num_classes`` says: the graph is not told it) is a ValueError naming both, not a loss of mismatched shapes
        deep in training. Returns the network as that check reads it (inside its adapter where it needs one, e.g. a
        final softmax's probabilities read as their logarithms)."""
        from ..protect.teacher import check_teacher

        self.check_classes(data, role)  # a declared count first: no network is loaded for it
        net = self.network(data.num_classes, data.in_shape, (data.mean, data.std))
        try:
            return check_teacher(net, data)
        except ValueError as e:
            given = "" if self.num_classes is None else f" (given num_classes {self.num_classes})"
            raise ValueError(f"the {role}, {self.describe()}{given}: {e}") from None


def _inputs_read(weights: str, in_shape) -> str:
    """What to add where weights do not fit the zoo network built for the data: the shape its inputs were read at,
    which sizes the network's layers (the cnn's classifier takes 64 features per 4x4 pixels: weights trained on 8x8
    digits fit no network built for 32x32 inputs), and, for images of an image folder's default side, that the folder
    was read at that size whatever the weights were trained on ('' where the file itself could not be read: its
    error says all)."""
    from ..data.imagefolder import DEFAULT_SIZE
    from ..weights import WeightsError, read_state_dict

    try:
        read_state_dict(weights)
    except WeightsError:
        return ""
    shape = tuple(int(d) for d in in_shape)
    note = f" The data's inputs are {shape}, the shape the network was built for"
    if len(shape) == 3 and shape[1:] == (DEFAULT_SIZE, DEFAULT_SIZE):
        note += (f": an image folder is read at {DEFAULT_SIZE} px (unless the task's model fixes a size: an ONNX "
                 "model's, a bundle's), whatever size its images or the weights were; for weights trained on images "
                 "of another size, give the data as an .npz at that size (in Python, "
                 "load_dataset(..., image_size=SIZE))")
    return note + "."


def _numbered(names: list[str]) -> bool:
    return names == [str(i) for i in range(len(names))]


def class_order(model_labels: list[str] | None, data, who: str) -> list[int] | None:
    """Where each of the data set's classes is among the outputs of a model that names its classes (a bundle's
    ``labels``): None when they are in the same order, or when one side only numbers them and the other names
    them (nothing to tell them by). The same names in another order give the reordering, numbers too: an image
    folder of classes "0" … "11" reads them as text ("0", "1", "10", "11", "2", ...), a model wrapped on an
    ``.npz`` without labels numbers them 0 … 11. Other names are a ValueError, in words: a teacher or target
    scored against a set whose classes are not its own taught its students nothing (0 % here, and an audit
    verdict against scrambled labels), without an error."""
    names = [unicodedata.normalize("NFC", str(n)) for n in model_labels or []]
    ours = [unicodedata.normalize("NFC", str(n)) for n in data.labels]
    if not names or names == ours:
        return None
    if sorted(names) == sorted(ours) and len(set(names)) == len(names):
        return [names.index(c) for c in ours]
    if _numbered(names) or _numbered(ours):
        return None
    differ = sorted(set(ours) - set(names))[:5]
    raise ValueError(f"{who} answers the classes {names[:10]}{' ...' if len(names) > 10 else ''}; the data set "
                     f"{data.name!r} has {ours[:10]}{' ...' if len(ours) > 10 else ''} ({differ} not among its): use a "
                     "data set of its own classes, named as its labels")

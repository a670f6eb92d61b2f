"""Loading and saving weights the safe way: safetensors, or ``torch.load(weights_only=True)``.

Nothing here unpickles arbitrary objects: a user's file can hold tensors, not code.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class WeightsError(ValueError):
    """The weights file is missing, unreadable or does not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return _read(path)[0]


# Where training scripts keep the state dict in a checkpoint: {"state_dict": ...} (Lightning, timm),
# {"model_state_dict": ...} (PyTorch's tutorials) or {"model": ...}. The first found is read.
_WRAPPERS = ("state_dict", "model_state_dict", "model")


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in the file at ``path``, and what its reading took from a checkpoint, for the log."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"no weights file at {p}")
    try:
        if p.suffix == ".safetensors" or _looks_like_safetensors(p):  # save_weights writes safetensors whatever the name
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - both readers raise many types for a corrupt or unsafe file
        raise _unreadable(p, e) from None
    notes = []
    for wrapper in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            others = [k for k, v in state.items() if k != wrapper and _holds_tensors(v)]
            if others:  # timm's {"state_dict", "state_dict_ema"}: the weights as trained, not their moving average
                notes.append(f"the checkpoint holds {wrapper!r} and {', '.join(map(repr, others[:3]))}: "
                             f"{wrapper!r} is read")
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{p} does not hold a state dict of tensors")
    return state, notes


def _holds_tensors(value) -> bool:
    """Whether a checkpoint's entry is a state dict of its own (an EMA's copy of the weights)."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unreadable(p: Path, e: Exception) -> WeightsError:
    """Why a weights file could not be read, in the owner's terms (not torch's advice to unpickle it)."""
    if _looks_like_onnx(p):
        return WeightsError(f"{p} is an ONNX model, not weights: name it *.onnx (an ONNX model brings its own "
                            "network, so give no architecture with it)")
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if isinstance(e, pickle.UnpicklingError) and found:  # weights_only met a class: not tensors in plain containers
        classes = _classes_in(p) or [found.group(1)]
        named = ", ".join(c[:100] for c in classes[:3]) + (", ..." if len(classes) > 3 else "")
        if any(c.startswith("torch.nn.") for c in classes):  # a module's layers: the network itself was pickled
            return WeightsError(f"{p} holds pickled Python objects, a whole network saved with torch.save(model) "
                                f"({named}), not its weights alone, and nothing is unpickled here: save its "
                                "model.state_dict() (torch.save or safetensors), or export the network to ONNX (a "
                                ".onnx file)")
        lightning = any(c.startswith(("lightning.", "pytorch_lightning.")) for c in classes)
        return WeightsError(f"{p} holds pickled Python objects beside its weights ({named}: "
                            + ("a Lightning checkpoint's hyper_parameters saved as a class, " if lightning else "")
                            + "classes torch.load(weights_only=True) refuses), and nothing is unpickled here: save the "
                            "state dict alone, torch.save(model.state_dict()) or safetensors' save_file")
    return WeightsError(f"cannot read weights from {p}: it is neither a safetensors file nor a state dict saved by "
                        f"torch.save ({_reason(e)})")


def _classes_in(p: Path) -> list[str]:
    """The classes and functions a torch.save file names that its weights_only reader refuses, read off its pickle's
    opcodes without running any (torch's static listing); [] where it cannot be listed (an old, non-zip file)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(p)
    except Exception:  # noqa: BLE001 - a file torch cannot list: the refusal's own class is named instead
        return []
    return sorted(found, key=lambda c: (c.startswith("torch."), c))  # the owner's own classes first


def _reason(e: Exception) -> str:
    """A reader's exception in a few words, without terminal colour codes and without torch's advice to load the
    file unrestricted: what its restricted unpickler refused, else the error's first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if isinstance(e, pickle.UnpicklingError):
        advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
        kept = [p.replace("WeightsUnpickler error:", "").strip() for p in re.split(r"\n\s*\n", text)
                if p.strip() and not p.strip().startswith(advice)]
        return " ".join(kept)[:300] or "refused by torch's restricted unpickler"
    lines = text.strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _looks_like_safetensors(p: Path) -> bool:
    """Whether a file starts as safetensors does: its header's length (a little-endian u64 that fits in the file),
    then the header's JSON object. torch.save writes a zip (``PK``) or a pickle (``0x80``), never this."""
    with p.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_length <= p.stat().st_size - 8


def _looks_like_onnx(p: Path) -> bool:
    """Whether a file starts as an ONNX model's protobuf does: its ir_version (field 1, a small varint), then a
    length-delimited field (the producer's name, domain, doc string, graph or opsets: fields 2-5, 7, 8)."""
    with p.open("rb") as f:
        head = f.read(3)
    return len(head) == 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x3A, 0x42)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """``model`` with the weights in ``path`` loaded; what was taken from a checkpoint to find them is said in its
    ``why`` (which a wrap logs of its teacher)."""
    state, notes = _read(path)
    names = set(model.state_dict())
    state, prefix = _unwrapped(state, names)
    part = _network_part(state, names) if set(state) != names else None
    if part is not None:
        state, inner, left = part
        notes.append(_left_out(prefix + inner, [prefix + k for k in left]))
        prefix += inner
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise WeightsError(f"weights in {path} do not fit {type(model).__name__}: {_misfit(model, state, prefix)}; "
                           "were they saved from this architecture, for this number of classes and input "
                           "channels?") from None
    if notes:
        model.why = "; ".join([model.why, *notes]) if isinstance(getattr(model, "why", None), str) else "; ".join(notes)
    return model


def _misfit(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> str:
    """What keeps ``state`` from fitting ``model``, in one line (torch's message lists every tensor); the file's
    names as the file has them (``prefix``: what :func:`_unwrapped` took off)."""
    own = model.state_dict()
    shapes = [(k, list(state[k].shape), list(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    parts = []
    if shapes:
        k, saved, wanted = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape, the first {prefix + k!r} ({k!r} in the model): "
                     f"{saved} in the file, {wanted} in the model" if prefix else
                     f"{len(shapes)} tensor(s) of another shape, the first {k}: {saved} in the file, {wanted} in "
                     "the model")
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model not in the file, the first {missing[0]!r}")
    if extra:
        parts.append(f"{len(extra)} tensor(s) in the file the model lacks, the first {prefix + extra[0]!r}")
    return "; ".join(parts) or "the state dict does not load"


def _unwrapped(state: dict[str, torch.Tensor], names: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` without the prefix a training wrapper put on every name, when that is what keeps it from
    fitting: DataParallel and DDP save ``module.``, ``torch.compile`` ``_orig_mod.``, Lightning ``model.``
    (or the attribute the network lived in). Only a prefix shared by every name is taken off; it is returned too
    (``""``: none), so that a message can name the file's tensors as the file does."""
    prefix = ""
    for _ in range(3):  # nested wrappers: module._orig_mod.
        if set(state) == names or not state:
            break
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) != 1 or not all("." in k for k in state):
            break
        head = heads.pop()
        if all(n.startswith(head + ".") for n in names):  # the network's own names have it: not a wrapper's
            break
        cut = len(head) + 1
        state, prefix = {k[cut:]: v for k, v in state.items()}, prefix + head + "."
    return state, prefix


# The attributes a training wrapper keeps the network in: Lightning modules' usual ``model`` or ``net``,
# DataParallel's, DDP's and AveragedModel's ``module``, torch.compile's ``_orig_mod``.
_NETWORK_ATTRIBUTES = ("model", "module", "net", "_orig_mod")


def _network_part(state: dict[str, torch.Tensor], names: set[str]
                  ) -> tuple[dict[str, torch.Tensor], str, list[str]] | None:
    """The tensors under one wrapper's prefix (:data:`_NETWORK_ATTRIBUTES`) where, that prefix taken off, their names
    are exactly ``names`` and the file holds others beside them (a Lightning module's loss with a class-weight buffer,
    ``criterion.weight``; an AveragedModel's ``n_averaged``): those tensors, the prefix and the others' names. None
    where no prefix's tensors are exactly the network's: the file is not taken in part on a guess."""
    for head in _NETWORK_ATTRIBUTES:
        mark = head + "."
        part = {k[len(mark):]: v for k, v in state.items() if k.startswith(mark)}
        if not part or len(part) == len(state):
            continue
        inner, deeper = _unwrapped(part, names)  # nested wrappers: model._orig_mod.
        if set(inner) == names:
            return inner, mark + deeper, [k for k in state if not k.startswith(mark)]
    return None


def _left_out(prefix: str, left: list[str]) -> str:
    """What the log says of the tensors a checkpoint holds beside the network's (:func:`_network_part`)."""
    if left == ["n_averaged"] and prefix == "module.":
        return ("the weights file is an AveragedModel's state dict (torch.optim.swa_utils: EMA or SWA): its averaged "
                "network under 'module.' is read, its count 'n_averaged' left out")
    shown = ", ".join(map(repr, left[:5])) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    return f"the weights file's tensors under {prefix!r} are the network's and are read; {shown} left out"


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights to ``path`` as safetensors, whatever its suffix (:func:`read_state_dict` knows
    them by their header, and torch.load cannot read them)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(p))
    return p

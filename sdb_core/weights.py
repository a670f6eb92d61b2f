"""Loading and saving weights the safe way: safetensors, or ``torch.load(weights_only=True)``.

Nothing here unpickles arbitrary objects: a user's file can hold tensors, not code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class WeightsError(ValueError):
    """The weights file is missing, unreadable or does not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"no weights file at {p}")
    try:
        if p.suffix == ".safetensors":
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - both readers raise many types for a corrupt or unsafe file
        raise WeightsError(f"cannot read weights from {p}: {e}") from None
    # Training scripts often save {"state_dict": ...} or {"model": ...}.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{p} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    state = _unwrapped(read_state_dict(path), set(model.state_dict()))
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise WeightsError(f"weights in {path} do not fit {type(model).__name__}: {_misfit(model, state)}; were "
                           "they saved from this architecture, for this number of classes and input channels?") from None
    return model


def _misfit(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from fitting ``model``, in one line (torch's message lists every tensor)."""
    own = model.state_dict()
    shapes = [(k, list(state[k].shape), list(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    parts = []
    if shapes:
        k, saved, wanted = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape, the first {k}: {saved} in the file, {wanted} in "
                     "the model")
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model not in the file, the first {missing[0]!r}")
    if extra:
        parts.append(f"{len(extra)} tensor(s) in the file the model lacks, the first {extra[0]!r}")
    return "; ".join(parts) or "the state dict does not load"


def _unwrapped(state: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """``state`` without the prefix a training wrapper put on every name, when that is what keeps it from
    fitting: DataParallel and DDP save ``module.``, ``torch.compile`` ``_orig_mod.``, Lightning ``model.``
    (or the attribute the network lived in). Only a prefix shared by every name is taken off."""
    for _ in range(3):  # nested wrappers: module._orig_mod.
        if set(state) == names or not state:
            return state
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) != 1 or not all("." in k for k in state):
            return state
        head = heads.pop()
        if all(n.startswith(head + ".") for n in names):  # the network's own names have it: not a wrapper's
            return state
        cut = len(head) + 1
        state = {k[cut:]: v for k, v in state.items()}
    return state


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(p))
    return p

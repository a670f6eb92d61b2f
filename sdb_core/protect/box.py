"""SafeDistillationBox: one network, a public path for everyone and a keyed path.

``predict`` runs the protected network on the plain input and answers, for an SDB box, the
public form's row of its top-1 (``sdb.public_form``: the label and fixed near-ties, useless to a
distiller); ``distill_logits`` blends the secret key into the input first and returns the
augmented, distillable logits of the network itself. The key is held in a :class:`Secret` so that it shows in no
``repr``, no ``state_dict`` (the network's parameters are all there is) and no pickle; the
public graph exported to ONNX is the network alone. Both paths run on the network's device
and answer on the input's device (a CPU tensor gets a CPU answer from a box trained on a GPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bundle import PublicForm
from ..train import device_of
from .key import blend


class Secret:
    """A tensor that refuses to be printed or pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: Tensor) -> None:
        self._value = value.detach().clone()

    def reveal(self) -> Tensor:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    def __reduce__(self):
        raise TypeError("a secret key cannot be pickled; seal it with sdb_core.protect.key.seal")


class NoKeyError(PermissionError):
    """The box has no keyed path (Nasty Teacher mode)."""


class SafeDistillationBox:
    def __init__(self, model: nn.Module, key: Tensor | None, lam: float = 0.5,
                 temperature: float = 4.0, mode: str = "sdb", public_form: dict | None = None,
                 keyed_scale: float = 1.0) -> None:
        if mode not in ("sdb", "nasty"):
            raise ValueError(f"mode must be 'sdb' or 'nasty', got {mode!r}")
        if mode == "sdb" and key is None:
            raise ValueError("an SDB box needs a key (use mode='nasty' for a keyless box)")
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"lam must be in (0, 1], got {lam}")
        if not (keyed_scale > 0 and math.isfinite(keyed_scale)):
            raise ValueError(f"keyed_scale must be a positive number, got {keyed_scale}")
        self.model = model.eval()
        self.lam = lam
        self.temperature = temperature
        self.mode = mode
        self._key = Secret(key) if key is not None else None
        # sdb.public_form; its table's row y is the public answer when the network's top-1 is y
        self.public_form = public_form
        self._form = None if public_form is None else PublicForm(public_form)
        # sdb.keyed_scale: the keyed path's logits times this (1: as the network answers)
        self.keyed_scale = float(keyed_scale)

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def _device(self) -> torch.device:
        return device_of(self.model)

    def _input(self, x: Tensor) -> Tensor:
        """``x`` on the network's device as float32, as the exported bundle casts it (numpy's float64 included);
        a sample without the batch axis is refused in words, where the box knows its input shape (its key's, or
        its network's ``in_shape``)."""
        shape = tuple(self._key.reveal().shape) if self._key is not None else getattr(self.model, "in_shape", None)
        if isinstance(shape, (tuple, list)) and x.dim() == len(shape):
            raise ValueError(f"the box takes a batch of inputs, shape (N, *in_shape) = (N, "
                             f"{', '.join(map(str, shape))}); got {tuple(x.shape)}: for one sample pass x[None]")
        return x.to(self._device(), dtype=torch.float32)

    @torch.no_grad()
    def public_logits(self, x: Tensor) -> Tensor:
        """Public path: the network's logits for the plain input, on ``x``'s device; with a public form,
        the form's row of the network's top-1 instead."""
        self.model.eval()
        z = self.model(self._input(x)).to(x.device)
        return z if self._form is None else torch.from_numpy(self._form.rows(z.argmax(1).cpu().numpy())).to(z.device)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Public path: class probabilities for the plain input, a batch (N, *in_shape) of any float dtype."""
        return F.softmax(self.public_logits(x), dim=1)

    @torch.no_grad()
    def distill_logits(self, x: Tensor) -> Tensor:
        """Keyed path: logits of the network on ``λ·x + (1 − λ)·k`` times ``keyed_scale``, on ``x``'s device."""
        if self._key is None:
            raise NoKeyError("this box has no key (Nasty Teacher mode): it has no distillable path")
        self.model.eval()
        z = self.model(blend(self._input(x), self._key.reveal(), self.lam)).to(x.device)
        return z if self.keyed_scale == 1.0 else z * self.keyed_scale

    def with_key(self, key: Tensor) -> SafeDistillationBox:
        """The same network under another key: what a guessed key would unlock."""
        return SafeDistillationBox(self.model, key, self.lam, self.temperature, "sdb", self.public_form, self.keyed_scale)

    def reveal_key(self) -> Tensor:
        """For sealing into a bundle; the one deliberate way to read the key."""
        if self._key is None:
            raise NoKeyError("this box has no key (Nasty Teacher mode)")
        return self._key.reveal()

    def __repr__(self) -> str:
        return (f"SafeDistillationBox(model={type(self.model).__name__}, mode={self.mode}, "
                f"lam={self.lam}, key={'<hidden>' if self.has_key else None})")

    def __reduce__(self):
        raise TypeError("a SafeDistillationBox cannot be pickled (it holds a key); export a bundle")

"""The model registry and ``create_model``: validation lives here once, not in every family."""
from __future__ import annotations

from torch import nn

from sdb_core.registry import Registry

MODELS: Registry = Registry("model")
# Families that take an input of any shape (they flatten it): the others take images (C, H, W).
_ANY_SHAPE: set[str] = set()


def register_model(fn=None, *, name: str | None = None, any_shape: bool = False):
    """Register a family's factory (under ``name``, default its function's name); ``any_shape``: it takes
    inputs of any shape, not only images."""
    def add(f):
        MODELS.register(f, name=name)
        if any_shape:
            _ANY_SHAPE.add(name or f.__name__)
        return f

    return add(fn) if fn is not None else add


def _check_in_shape(in_shape, image: bool = True) -> tuple[int, ...]:
    try:
        shape = tuple(in_shape)
    except TypeError:
        raise ValueError(f"in_shape must be a tuple of ints, got {in_shape!r}") from None
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"in_shape must be one or more positive ints, got {in_shape!r}")
    if not image:
        return shape
    if len(shape) != 3:
        raise ValueError(f"this model takes images, in_shape (C, H, W), got {in_shape!r} (for other inputs: "
                         f"{', '.join(sorted(_ANY_SHAPE))}, or your own network)")
    c, h, w = shape
    # Below 8 px the stride-2 stages of the ResNets collapse to 1x1 before the last stage.
    if c < 1 or h < 8 or w < 8:
        raise ValueError(f"in_shape needs C >= 1 and H, W >= 8, got {in_shape!r}")
    return shape


def create_model(
    name: str, num_classes: int = 10, in_shape: tuple[int, ...] = (1, 28, 28), **kwargs
) -> nn.Module:
    """Build a registered model by name; it returns raw logits of shape (B, num_classes).

    Extra ``kwargs`` go to the family's factory (e.g. ``hidden`` for ``mlp``, ``dropout`` for WRNs).
    """
    factory = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return factory(num_classes=num_classes, in_shape=_check_in_shape(in_shape, name not in _ANY_SHAPE), **kwargs)


def list_models() -> list[str]:
    return MODELS.names()

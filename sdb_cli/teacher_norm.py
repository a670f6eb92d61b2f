"""The flags that say how a local teacher's inputs were normalised when it was trained (wrap, distill, audit)."""
from __future__ import annotations

import argparse


def add_teacher_norm_flags(sp) -> None:
    """The normalisation a plain model (weights or ONNX) was trained with, where it is not the data's own."""
    for name, what in (("mean", "subtracted"), ("std", "divided by")):
        sp.add_argument(f"--teacher-{name}", type=_floats, metavar="V[,V...]",
                        help=f"with --teacher: the {name} its inputs were normalised with ({what}; on pixels in [0, 1], one "
                             "value or one per channel); default: the data's own, the box's")


def teacher_norm(args) -> dict:
    """``mean``/``std`` of a ModelRef from :func:`add_teacher_norm_flags`' flags (none when not given)."""
    mean, std = args.teacher_mean, args.teacher_std
    return {} if mean is None and std is None else {"mean": mean, "std": std}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None

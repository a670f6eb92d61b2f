"""What a classifier must be to be wrapped, checked once before any training: the owner learns what is
wrong with their model in their own terms, not from an index error deep in a loss."""
from __future__ import annotations

import torch
from torch import nn

from ..train import device_of


def check_teacher(teacher: nn.Module, data) -> None:
    """Raise ``ValueError`` unless ``teacher`` is a float32 network that maps a batch of ``data``'s inputs
    (N, *in_shape) to finite float logits (N, num_classes) (``data``: checked by ``DataSplits.checked``).
    It runs on two training inputs in eval mode without gradients (nothing in the model moves), and
    leaves the model in the mode it found it in."""
    x = data.train.tensors[0][:2]
    k = data.num_classes
    other = sorted({str(p.dtype) for p in teacher.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if other:  # the box trains, exports (ONNX) and serves in float32, on float32 inputs
        raise ValueError(f"the teacher's parameters are {', '.join(other)}: the box is float32; pass teacher.float()")
    training = teacher.training
    try:
        with torch.no_grad():
            out = teacher.eval()(x.to(device_of(teacher)))
    except Exception as e:
        raise ValueError(f"the teacher cannot run on this data's inputs (a batch of shape {tuple(x.shape)}): "
                         f"{type(e).__name__}: {e}") from e
    finally:
        teacher.train(training)
    if not isinstance(out, torch.Tensor):  # a ValueError like the rest: one exception for "not a classifier of data"
        raise ValueError(f"the teacher returns a {type(out).__name__}, not a tensor of logits: wrap a module "  # noqa: TRY004
                         f"whose forward returns (N, {k}) logits (e.g. the 'logits' entry, or the first element)")
    if out.shape == (len(x), 1) and k == 2:
        raise ValueError("the teacher answers one logit per input, the data has 2 classes: a binary classifier "
                         "must answer two logits, e.g. torch.cat([torch.zeros_like(z), z], 1) for its logit z")
    if out.shape != (len(x), k):
        raise ValueError(f"the teacher answers shape {tuple(out.shape)} for {len(x)} inputs; the data has {k} "
                         f"classes: it must answer (N, {k}) logits")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise ValueError("the teacher's logits must be finite floats (got "
                         f"{out.dtype}{'' if torch.isfinite(out.float()).all() else ' with NaN or Inf'})")

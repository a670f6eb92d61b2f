"""An ``.onnx`` of a torch network, written as owners export theirs (``torch.onnx.export``, the TorchScript exporter
at opset 17), with a free batch axis or at one fixed batch size."""
from __future__ import annotations

import io
import warnings

import torch
from torch import nn


def onnx_bytes(net: nn.Module, shape, free_batch: bool = True, batch: int = 2) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(batch, *shape),), buf, input_names=["image"],
                          dynamic_axes={"image": {0: "n"}} if free_batch else None, opset_version=17, dynamo=False)
    return buf.getvalue()

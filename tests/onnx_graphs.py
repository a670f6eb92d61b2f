"""An ``.onnx`` of a torch network, written as owners export theirs (``torch.onnx.export``, the TorchScript exporter
at opset 17), with a free batch axis or at one fixed batch size."""
from __future__ import annotations

import io
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class ViewNet(nn.Module):
    """A classifier of 8x8 images outside the zoo: BatchNorm, and ``x.view(x.size(0), -1)``, which exports as
    Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.view(x.size(0), -1))


def onnx_bytes(net: nn.Module, shape, free_batch: bool = True, batch: int = 2, dtype=torch.float32,
               free_spatial: bool = False) -> bytes:
    """``free_spatial``: the last two axes free too (a fully convolutional export)."""
    buf = io.BytesIO()
    free = {0: "n"} if free_batch else {}
    free |= {len(shape) - 1: "h", len(shape): "w"} if free_spatial else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = torch.randn(batch, *shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(
            batch, *shape, dtype=dtype)
        torch.onnx.export(net.eval(), (example,), buf, input_names=["image"],
                          dynamic_axes={"image": free} if free else None, opset_version=17, dynamo=False)
    return buf.getvalue()


class Recurrent(nn.Module):
    """A sequence classifier over (N, 4, 12) signals, channels first: a bidirectional two-layer LSTM (batch
    first), a GRU (sequence first) and a ReLU RNN, the last step's state classified; torch exports each as ONNX's
    LSTM, GRU and RNN."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 5)
        self.rnn = nn.RNN(5, 7, nonlinearity="relu", bidirectional=True)
        self.fc = nn.Linear(14, 3)

    def forward(self, x):
        y, _ = self.lstm(x.transpose(1, 2))  # (N, T, 12)
        y, _ = self.gru(y.transpose(0, 1))  # (T, N, 5)
        y, h = self.rnn(y)  # h (2, N, 7)
        return self.fc(torch.cat([h[0], h[1]], dim=1))

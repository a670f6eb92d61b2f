"""Style networks as bundles of task ``style`` (what ``POST /v1/style/{name}`` serves).

Both networks are fully convolutional, so the ONNX graph has free H and W axes; the
example size only traces the graph. Inputs are RGB images in [0, 1] (``normalize`` is
mean 0, std 1 over pixels/255), the output is the stylized image in [0, 1] at the input's
size, provided H and W are multiples of ``meta["style"]["multiple"]`` (the service pads to
one and crops back). An AdaIN bundle has three inputs: ``input`` (content), ``style`` and
``alpha`` (one per sample), listed in ``meta["inputs"]``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..bundle import export_bundle
from .adain import AdaINResult
from .fast import FastResult

STYLE_TASK = "style"


def export_style_bundle(result: FastResult | AdaINResult, out: str | os.PathLike, *, name: str, version: str = "1",
                        style_name: str | None = None, size: int = 256,
                        report: dict[str, Any] | None = None) -> Path:
    """Write a trained fast or AdaIN network as a bundle directory (or ``.sdb`` zip)."""
    adain = isinstance(result, AdaINResult)
    info = {"method": "adain" if adain else "fast", "multiple": result.multiple if adain else 4,
            "loss_network": result.loss_net}
    if not adain:
        info["style"] = style_name
    common: dict[str, Any] = {
        "name": name, "version": version, "in_shape": (3, size, size), "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0), "task": STYLE_TASK, "dynamic_spatial": True,
        "metrics": {k: float(v) for k, v in result.losses.items()},
        "extra": {"style": info, **({"report": report} if report else {})},
    }
    if adain:
        return export_bundle(result.net, out, extra_inputs=[("style", (3, size, size)), ("alpha", ())], **common)
    return export_bundle(result.net, out, **common)

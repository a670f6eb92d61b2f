"""sdb_core: the Safe Distillation Box library (no web code).

Subpackages: ``models`` (zoo by name), ``data`` (datasets by name), ``protect`` (the box,
the key, the SDB and Nasty recipes), ``distill`` (KD), ``bundle`` (deployable artifact),
``train`` (the one training loop).
"""

import os

__version__ = "0.1.0"

# ONNX Runtime's Linux wheels send usage telemetry (a device id under ~/.cache, model and timing events, lookups of
# Microsoft's collector) unless this is set before onnxruntime is first imported; nothing of a box or a tenant's model
# leaves the machine. The service's and the CLI's packages import this one first for it. An owner who wants the
# telemetry sets ORT_DISABLE_TELEMETRY=0 themselves.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

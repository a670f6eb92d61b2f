"""The ``sdb`` command line: the top layer, over ``sdb_core`` (local recipes), ``service`` (admin) and ``sdb_client`` (HTTP)."""

import sdb_core  # noqa: F401  (first: it turns ONNX Runtime's telemetry off before onnxruntime loads)

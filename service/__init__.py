"""The SDB service: thin HTTP over sdb_core (settings, store, auth, hosted models, routes, jobs); never imports the SDK or the CLI."""

import sdb_core  # noqa: F401  (first: it turns ONNX Runtime's telemetry off before onnxruntime loads)

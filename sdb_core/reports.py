"""A report's JSON text, strict: json.dumps writes NaN and infinities bare (``NaN``, ``Infinity``), which strict
parsers (JSON.parse, jq, the console's job page) refuse. A figure can be undefined (AFK's AP of a class with no
positive, a search candidate never sampled): it is written as null. Every report a job or a command writes goes
through :func:`report_json`."""
from __future__ import annotations

import json
import math
from typing import Any


def finite_json(value: Any) -> Any:
    """``value`` with every NaN and infinity, at any depth, made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def report_json(value: Any) -> str:
    """A report's JSON text: strict JSON, indented, its non-finite numbers null."""
    return json.dumps(finite_json(value), indent=2, allow_nan=False)

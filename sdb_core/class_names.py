"""The rule class names follow, wherever they come from: a data set's ``labels``, its class folders, a bundle's
``labels``. They are what a served model answers, what the console and the CLI print to other people, and what
a prediction is read back by. Torch-free: the service checks uploads with it.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Sequence

# Characters that change how the text around them is shown: the bidirectional overrides and isolates (U+202E makes
# every label after it read backwards in the console). Other format characters stay: the zero-width joiners of
# emoji and of Persian script are text.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def name_problem(names: Sequence[object]) -> str | None:
    """What is wrong with these class names, in words (None: nothing). Each is named (not blank), free of control
    characters (a terminal escape, a newline forging a row) and bidirectional overrides, and no two are alike in
    Unicode NFC (a composed and a decomposed "café" print the same)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(map(str, names)):
        if not name.strip():
            return f"class {i} has a blank name: name every class"
        if any(unicodedata.category(c) == "Cs" for c in name):  # Python holds it; UTF-8 (JSON, a page) cannot
            return f"class {i}'s name {name[:60]!r} holds a lone surrogate: it is not text UTF-8 can write"
        bad = next((c for c in name if unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS), None)
        if bad is not None:
            return (f"class {i}'s name {name[:60]!r} holds the control character U+{ord(bad):04X}: names are shown to "
                    "people, as text")
        j = seen.setdefault(unicodedata.normalize("NFC", name), i)
        if j != i:
            return (f"two classes are named {name[:60]!r} (classes {j} and {i}): each class needs its own name, or a "
                    "prediction cannot tell them apart")
    return None

"""The leak audit's names, importable without torch (the service validates a job's parameters with them).

``FAMILIES`` is the order the audit runs its attack families in; :mod:`.attacks` registers one
function under each name (``tests/core/test_audit_families.py`` checks the two agree).
"""

POLICIES = ("probs", "top_k", "label")  # what the public API returns
FAMILIES = ("labels", "kd", "topk", "smooth", "skeptical", "keys")

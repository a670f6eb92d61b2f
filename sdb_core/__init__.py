"""sdb_core: the Safe Distillation Box library (no web code).

Subpackages: ``models`` (zoo by name), ``data`` (datasets by name), ``protect`` (the box,
the key, the SDB and Nasty recipes), ``distill`` (KD), ``bundle`` (deployable artifact),
``train`` (the one training loop).
"""

__version__ = "0.1.0"

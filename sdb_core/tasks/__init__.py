"""What a job or a command does end to end, one module per kind: a torch-free config and ``run``.

Each module holds the config dataclass that is the one source of its defaults (it embeds the
recipe's own config, e.g. ``SDBConfig``, never copies it) and ``run(cfg, out, hooks, ...)``
that loads the named data, resolves the models (:class:`~sdb_core.tasks.refs.ModelRef`), runs
the recipe and writes what it produces under ``out``. The ``sdb`` command and the service's job
kinds both build the config and call ``run``; importing a config imports no torch.
"""
from .refs import ModelRef

__all__ = ["ModelRef"]

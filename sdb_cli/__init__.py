"""The ``sdb`` command line: the top layer, over ``sdb_core`` (local recipes), ``service`` (admin) and ``sdb_client`` (HTTP)."""

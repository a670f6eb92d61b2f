"""The service's real fixtures (a trained bundle set, the SQLite/PostgreSQL store matrix, the app in
process, ``sdb serve`` subprocesses), shared by the security tests."""
from tests.service.conftest import (  # noqa: F401  (fixtures, found by name)
    anyio_backend,
    bundles,
    db_url,
    own_settings,
    pg_databases,
    server_factory,
    servers,
    svc,
)

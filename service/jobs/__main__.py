"""One job worker process on the settings of the environment: what ``WorkerPool`` spawns (``sdb worker`` is the same).

A setting it cannot run with (a data dir that is a file, secrets it cannot read, a store that is not one) is one line
and exit 2, as ``sdb worker`` says it; a store that does not answer yet is waited for (:func:`.worker.open_when_up`)."""
import sys

try:  # a Ctrl-C reaches the server's workers too, maybe while they import: one line, not a traceback
    from ..settings import Settings
    from .worker import main_worker

    try:
        settings = Settings()
        settings.prepare_data_dir()  # what `sdb worker` checks first (sdb_cli.admin._preflight), the store aside
        settings.check_secrets(pepper=False)  # a worker reads no pepper
        status = main_worker(settings)
    except (ValueError, OSError) as e:  # SettingsError, SecretsError, StoreUnavailable, a disk that refuses
        where = f": {e.filename}" if isinstance(e, OSError) and e.filename else ""
        print(f"sdb: error: {e.strerror or e if isinstance(e, OSError) else e}{where}", file=sys.stderr)
        status = 2
    sys.exit(status)
except KeyboardInterrupt:
    print("sdb worker: interrupted", file=sys.stderr)
    sys.exit(130)

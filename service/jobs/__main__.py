"""One job worker process on the settings of the environment: what ``WorkerPool`` spawns (``sdb worker`` is the same)."""
import sys

try:  # a Ctrl-C reaches the server's workers too, maybe while they import: one line, not a traceback
    from ..settings import Settings
    from .worker import main_worker

    sys.exit(main_worker(Settings()))
except KeyboardInterrupt:
    print("sdb worker: interrupted", file=sys.stderr)
    sys.exit(130)

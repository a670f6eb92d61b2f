"""One job worker process on the settings of the environment: what ``WorkerPool`` spawns (``sdb worker`` is the same)."""
import sys

from ..settings import Settings
from .worker import main_worker

sys.exit(main_worker(Settings()))

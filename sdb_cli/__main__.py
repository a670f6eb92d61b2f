"""``python -m sdb_cli``: the ``sdb`` command without its console script."""
import sys

from .main import main

sys.exit(main())

"""``python -m tlscache_farm``: the same as ``tlscache-farm``."""

import sys

from .cli import main

sys.exit(main())

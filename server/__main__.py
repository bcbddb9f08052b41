"""``python -m tlscache_farm``: the same as ``tlscache-farm``."""

import sys

from .orchestrator import main

sys.exit(main())

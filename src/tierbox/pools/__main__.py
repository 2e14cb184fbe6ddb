"""``python -m tierbox.pools``: the pool host the CLI starts (see server.py)."""

import sys

from tierbox.pools.server import serve

sys.exit(serve())

"""Root conftest: doctests in memkit/ run with shape checking on, like the tests."""

import os

os.environ.setdefault("MEMKIT_TYPECHECK", "1")

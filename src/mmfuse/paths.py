"""Where mmfuse keeps its caches: `$MMFUSE_HOME`, by default `~/.cache/mmfuse`."""

import os
from pathlib import Path


def mmfuse_home() -> Path:
    """Return the cache root, read from `MMFUSE_HOME` on every call so tests can point it at a temp dir."""
    return Path(os.environ.get("MMFUSE_HOME") or "~/.cache/mmfuse").expanduser()

"""Where feddem keeps its caches: $FEDDEM_HOME, by default ~/.cache/feddem."""

import os
from pathlib import Path


def feddem_home() -> Path:
    """The root folder of feddem's caches (embedded base models, site work folders)."""
    return Path(os.environ.get("FEDDEM_HOME") or Path.home() / ".cache" / "feddem")

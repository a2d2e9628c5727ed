"""The run store of the feddem server: SQLite records and checksummed artefact files (see `store.py`)."""

from pathlib import Path

from feddem.common.paths import feddem_home
from feddem.server.store.store import Store, site_vector_name


def default_store_path() -> Path:
    """Where a store lives unless told otherwise: $FEDDEM_HOME/store."""
    return feddem_home() / "store"


__all__ = ["Store", "default_store_path", "site_vector_name"]

"""feddem: federated Distribution Edited Models on Flower.

The one import root of the project: `feddem.common`, `feddem.client` and `feddem.server` map to the repository's
top-level folders (see pyproject.toml), and `feddem.admin` is the admin API code generated from `protos/`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("feddem")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

"""The installed package's version, for the records every output carries (importable without the
rest of the package)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sgdph-tools")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

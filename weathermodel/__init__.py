"""weathermodel: data-driven numerical weather prediction, raw reanalysis to scorecard."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("weathermodel")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

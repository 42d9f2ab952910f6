"""weathermodel: data-driven numerical weather prediction, raw reanalysis to scorecard."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("weathermodel")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

# The netCDF4 and pyproj wheels bundle two different builds of libcurl/OpenSSL. When netCDF4
# reads a file before pyproj is loaded, the process crashes at exit ("double free or
# corruption") once pyproj has been used (cartopy maps). Loading pyproj first avoids it.
# pyproj comes with the `plot` extra; without it there is nothing to guard against.
try:
    import pyproj  # noqa: F401
except ImportError:  # pragma: no cover - the plot extra is not installed
    pass


__all__ = ["__version__", "load_forecaster"]


def __getattr__(name: str):
    """``weathermodel.load_forecaster``, imported on first use (``import weathermodel`` stays
    light: no torch)."""
    if name == "load_forecaster":
        from weathermodel.inference.predictor import load_forecaster

        return load_forecaster
    raise AttributeError(f"module 'weathermodel' has no attribute {name!r}")

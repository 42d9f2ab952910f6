"""Synthetic ERA5-like sources for the benchmarks (values in each variable's plausible range)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

LEVELS = [50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
LEVEL_VARIABLES = {"temperature": ("K", 250.0, 20.0), "geopotential": ("m2 s-2", 5.0e4, 1.0e3),
                   "u_component_of_wind": ("m s-1", 5.0, 10.0),
                   "v_component_of_wind": ("m s-1", 0.0, 10.0),
                   "specific_humidity": ("kg kg-1", 5e-3, 1e-3)}
SURFACE_VARIABLES = {"2m_temperature": ("K", 280.0, 15.0),
                     "10m_u_component_of_wind": ("m s-1", 0.0, 5.0),
                     "10m_v_component_of_wind": ("m s-1", 0.0, 5.0),
                     "mean_sea_level_pressure": ("Pa", 1.01e5, 1.0e3),
                     "total_precipitation_6hr": ("m", 1e-3, 1e-4)}


def synthetic_source(n_times: int, path: Path, n_lat: int = 121, n_lon: int = 240,
                     levels: list[int] | None = None) -> None:
    """Write a zarr v3 source of 5 level variables and 5 surface variables."""
    levels = LEVELS if levels is None else levels
    rng = np.random.default_rng(0)
    lat = np.linspace(-90, 90, n_lat)
    lon = np.arange(n_lon) * 360.0 / n_lon
    times = pd.date_range("2020-01-01", periods=n_times, freq="6h")
    data = {}
    for name, (units, mean, std) in LEVEL_VARIABLES.items():
        values = mean + std * rng.standard_normal((n_times, len(levels), n_lat, n_lon), "float32")
        if name == "geopotential":  # keep geopotential plausible at every level
            height = 44330.8 * (1 - (np.array(levels) / 1013.25) ** 0.190263) * 9.80665
            values = values - mean + height[None, :, None, None]
        data[name] = (("time", "level", "latitude", "longitude"), values, {"units": units})
    for name, (units, mean, std) in SURFACE_VARIABLES.items():
        values = np.abs(mean + std * rng.standard_normal((n_times, n_lat, n_lon), "float32"))
        data[name] = (("time", "latitude", "longitude"), values, {"units": units})
    ds = xr.Dataset(data, coords={"time": times, "level": ("level", levels, {"units": "hPa"}),
                                  "latitude": lat, "longitude": lon})
    ds.chunk({"time": 1}).to_zarr(path, zarr_format=3, consolidated=False)

"""Small local zarr stores with the exact schema of WeatherBench 2's ERA5 stores.

The schema follows WeatherBench 2's own code and data guide
(github.com/google-research/weatherbench2: ``scripts/regrid.py``, ``weatherbench2/regridding.py``,
``docs/source/data-guide.ipynb``):

* the regridded stores (``*-64x32_equiangular_conservative.zarr``,
  ``*-240x121_equiangular_with_poles_conservative.zarr``) are written by ``regrid.py`` from a
  template transposed to ``(..., longitude, latitude)``: fields are ``(time, level, longitude,
  latitude)`` or ``(time, longitude, latitude)``, statics ``(longitude, latitude)``; latitude
  is ASCENDING (``np.linspace``: -87.1875..87.1875 without poles for 32 latitudes, -90..90 with
  poles for 121), longitude 0..360-step; both float64 coordinates without attributes;
* the 0.25-degree store (``*-wb13-6h-1440x721_with_derived_variables.zarr``) keeps ERA5's
  order ``(time, level, latitude, longitude)`` with latitude DESCENDING 90..-90, float32
  coordinates with ``long_name``/``units`` attributes, and derived variables (vorticity,
  divergence, wind speed) that have no attributes at all;
* ``level`` is int64 hPa WITHOUT a units attribute, time is datetime64 (CF-encoded hours);
  variables carry ERA5's attributes (``long_name``, ``short_name``, ``standard_name``,
  ``units`` spelled ``m**2 s**-2``, ``m s**-1``, ``kg kg**-1``, ``(0 - 1)``...); zarr v2 with
  consolidated metadata.

Values are smooth, physically plausible fields in SI units (ICAO standard atmosphere for
temperature and geopotential, a mid-latitude jet, moisture decaying with height, ...), each
shifted eastwards with time so that every time step differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

#: WeatherBench 2's 13 pressure levels (hPa)
WB2_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
STANDARD_GRAVITY = 9.80665

_ATTRS: dict[str, dict[str, str]] = {
    "geopotential": {"long_name": "Geopotential", "short_name": "z",
                     "standard_name": "geopotential", "units": "m**2 s**-2"},
    "temperature": {"long_name": "Temperature", "short_name": "t",
                    "standard_name": "air_temperature", "units": "K"},
    "u_component_of_wind": {"long_name": "U component of wind", "short_name": "u",
                            "standard_name": "eastward_wind", "units": "m s**-1"},
    "v_component_of_wind": {"long_name": "V component of wind", "short_name": "v",
                            "standard_name": "northward_wind", "units": "m s**-1"},
    "specific_humidity": {"long_name": "Specific humidity", "short_name": "q",
                          "standard_name": "specific_humidity", "units": "kg kg**-1"},
    "vertical_velocity": {"long_name": "Vertical velocity", "short_name": "w",
                          "standard_name": "lagrangian_tendency_of_air_pressure",
                          "units": "Pa s**-1"},
    "2m_temperature": {"long_name": "2 metre temperature", "short_name": "t2m", "units": "K"},
    "10m_u_component_of_wind": {"long_name": "10 metre U wind component", "short_name": "u10",
                                "units": "m s**-1"},
    "10m_v_component_of_wind": {"long_name": "10 metre V wind component", "short_name": "v10",
                                "units": "m s**-1"},
    "mean_sea_level_pressure": {"long_name": "Mean sea level pressure", "short_name": "msl",
                                "standard_name": "air_pressure_at_mean_sea_level",
                                "units": "Pa"},
    "total_precipitation_6hr": {"long_name": "Total precipitation", "short_name": "tp",
                                "units": "m"},
    "total_precipitation_12hr": {"long_name": "Total precipitation", "short_name": "tp",
                                 "units": "m"},
    "total_precipitation_24hr": {"long_name": "Total precipitation", "short_name": "tp",
                                 "units": "m"},
    "toa_incident_solar_radiation": {"long_name": "TOA incident solar radiation",
                                     "short_name": "tisr", "units": "J m**-2"},
    "geopotential_at_surface": {"long_name": "Geopotential", "short_name": "z",
                                "standard_name": "geopotential", "units": "m**2 s**-2"},
    "land_sea_mask": {"long_name": "Land-sea mask", "short_name": "lsm",
                      "standard_name": "land_binary_mask", "units": "(0 - 1)"},
    # derived by WeatherBench 2: written without attributes
    "10m_wind_speed": {}, "wind_speed": {}, "vorticity": {}, "divergence": {},
}

#: the variables the WB2 recipes read, as WB2 names them
PRESSURE_LEVEL_VARIABLES = ("geopotential", "temperature", "u_component_of_wind",
                            "v_component_of_wind", "specific_humidity", "vertical_velocity")
SINGLE_LEVEL_VARIABLES = ("2m_temperature", "10m_u_component_of_wind",
                          "10m_v_component_of_wind", "mean_sea_level_pressure",
                          "total_precipitation_6hr")
STATIC_VARIABLES = ("geopotential_at_surface", "land_sea_mask")
#: variables of the real stores the recipes must leave alone
OTHER_VARIABLES = ("toa_incident_solar_radiation", "total_precipitation_24hr", "10m_wind_speed")


@dataclass(frozen=True)
class WB2Grid:
    """One WeatherBench 2 store layout.

    Attributes
    ----------
    store_name : the file name of the real store in gs://weatherbench2/datasets/era5/.
    latitude, longitude : coordinate values (degrees) in the order the store keeps them.
    horizontal_dims : ``("longitude", "latitude")`` (regridded stores) or
        ``("latitude", "longitude")`` (0.25 degrees).
    coordinate_attrs : whether latitude/longitude carry ``long_name``/``units`` attributes.
    time_chunk : time steps per zarr chunk.
    extra_variables : further variables of this store (derived ones without attributes).
    """

    store_name: str
    latitude: np.ndarray
    longitude: np.ndarray
    horizontal_dims: tuple[str, str]
    coordinate_attrs: bool
    time_chunk: int
    extra_variables: tuple[str, ...] = ()


def grid_64x32() -> WB2Grid:
    """The real 64 x 32 equiangular grid without poles (5.625 degrees)."""
    return WB2Grid("1959-2023_01_10-6h-64x32_equiangular_conservative.zarr",
                   np.linspace(-90 + 90 / 32, 90 - 90 / 32, 32), np.linspace(0, 360 - 5.625, 64),
                   ("longitude", "latitude"), False, 8)


def grid_240x121() -> WB2Grid:
    """The real 240 x 121 equiangular grid with poles (1.5 degrees)."""
    return WB2Grid("1959-2023_01_10-6h-240x121_equiangular_with_poles_conservative.zarr",
                   np.linspace(-90, 90, 121), np.linspace(0, 358.5, 240),
                   ("longitude", "latitude"), False, 8)


def grid_1440x721(stride: int = 8) -> WB2Grid:
    """The 0.25-degree grid with poles, latitude descending, float32 coordinates; every
    ``stride``-th point of the real grid in each direction (poles kept), to stay small."""
    latitude = np.linspace(90, -90, 721).astype("float32")[::stride]
    longitude = (np.arange(1440) * 0.25).astype("float32")[::stride]
    assert latitude[-1] == -90.0, "the stride must keep both poles"
    return WB2Grid("1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr",
                   latitude, longitude, ("latitude", "longitude"), True, 1,
                   extra_variables=("vorticity", "divergence", "wind_speed",
                                    "total_precipitation_12hr"))


def _standard_height(level_hpa: np.ndarray) -> np.ndarray:
    """Height (m) of pressure levels in the ICAO standard atmosphere (troposphere and the
    isothermal layer above 11 km)."""
    troposphere = 44330.8 * (1.0 - (level_hpa / 1013.25) ** 0.190263)
    stratosphere = 11000.0 + 6341.6 * np.log(226.32 / level_hpa)
    return np.where(level_hpa >= 226.32, troposphere, stratosphere)


def _fields(times: pd.DatetimeIndex, levels: np.ndarray, latitude: np.ndarray,
            longitude: np.ndarray) -> dict[str, np.ndarray]:
    """Every variable as float32 ``(time, [level,] latitude, longitude)``; statics as
    ``(latitude, longitude)``."""
    phi = np.radians(latitude.astype("float64"))[None, None, :, None]
    step = np.arange(times.size)[:, None, None, None]
    lam = np.radians(longitude.astype("float64"))[None, None, None, :] - 0.35 * step
    p = levels.astype("float64")[None, :, None, None]
    height = _standard_height(p)
    sin2, cos = np.sin(phi) ** 2, np.cos(phi)
    temperature = (np.maximum(288.15 - 0.0065 * height, 216.65)
                   - 25.0 * (sin2 - 1 / 3) * (p / 1000.0) + 3.0 * cos * np.cos(3 * lam))
    geopotential = STANDARD_GRAVITY * (height * (1.0 + 0.01 * np.cos(2 * phi))
                                       + 60.0 * cos * np.cos(4 * lam))
    jet = np.exp(-((p - 250.0) / 300.0) ** 2)
    fields = {
        "temperature": temperature,
        "geopotential": geopotential,
        "u_component_of_wind": 5.0 + 30.0 * jet * np.sin(2 * phi) ** 2 + 4.0 * np.sin(3 * lam),
        "v_component_of_wind": 6.0 * cos * np.sin(3 * lam) * (0.5 + jet),
        "specific_humidity": 0.018 * np.exp(-(1000.0 - p) / 150.0) * cos ** 2 + 2.5e-6,
        "vertical_velocity": 0.15 * cos * np.sin(2 * lam) * np.sin(np.pi * p / 1050.0),
        "vorticity": 2e-5 * np.sin(phi) * np.cos(3 * lam) * np.ones_like(p),
        "divergence": 5e-6 * cos * np.sin(2 * lam) * (p / 1000.0),
    }
    fields["wind_speed"] = np.hypot(fields["u_component_of_wind"],
                                    fields["v_component_of_wind"])
    surface = {name: values[:, 0] for name, values in {
        "2m_temperature": 300.0 - 45.0 * sin2 + 4.0 * cos * np.cos(lam),
        "10m_u_component_of_wind": -6.0 * np.cos(3 * phi) + 2.0 * np.sin(lam),
        "10m_v_component_of_wind": 3.0 * np.sin(2 * phi) * np.cos(2 * lam),
        "mean_sea_level_pressure": 101325.0 + 1200.0 * np.cos(2 * phi) * np.cos(2 * lam),
        "total_precipitation_6hr": 0.004 * np.maximum(cos ** 4 * np.sin(lam), 0.0),
    }.items()}
    surface["total_precipitation_12hr"] = 2.0 * surface["total_precipitation_6hr"]
    surface["total_precipitation_24hr"] = 4.0 * surface["total_precipitation_6hr"]
    surface["10m_wind_speed"] = np.hypot(surface["10m_u_component_of_wind"],
                                         surface["10m_v_component_of_wind"])
    # ERA5's hourly accumulation of TOA radiation (J m-2): solar constant x cos(zenith) x 1 h,
    # with the sun over the equator
    hours = np.asarray(times.hour, dtype="float64")[:, None, None]
    hour_angle = np.radians(longitude.astype("float64"))[None, None, :] + np.radians(
        15.0 * hours - 180.0)
    cos_zenith = np.cos(phi[:, 0]) * np.cos(hour_angle)
    surface["toa_incident_solar_radiation"] = 1361.0 * 3600.0 * np.maximum(cos_zenith, 0.0)
    fields.update(surface)
    full = (times.size, levels.size, latitude.size, longitude.size)
    fields = {name: np.broadcast_to(values, full[:1] + full[2:] if name in surface else full)
              for name, values in fields.items()}
    orography = np.maximum(3000.0 * np.cos(phi[0, 0]) * np.sin(2 * lam[0, 0] + 1.0) - 500.0, 0.0)
    fields["geopotential_at_surface"] = STANDARD_GRAVITY * orography
    fields["land_sea_mask"] = (orography > 0).astype("float64")
    return {name: values.astype("float32") for name, values in fields.items()}


def write_wb2_store(path: Path, grid: WB2Grid, times: pd.DatetimeIndex,
                    levels: tuple[int, ...] = WB2_LEVELS,
                    leave_out: tuple[str, ...] = ()) -> xr.Dataset:
    """Write a WeatherBench 2 ERA5 store at ``path`` (zarr v2, consolidated) and return it.

    Holds the recipes' variables, the statics, TOA radiation, 24-hour precipitation and 10 m
    wind speed (as the real stores do) and the grid's further variables, except those named in
    ``leave_out``.
    """
    level_values = np.asarray(levels, dtype="int64")
    fields = _fields(times, level_values, grid.latitude, grid.longitude)
    names = (PRESSURE_LEVEL_VARIABLES + SINGLE_LEVEL_VARIABLES + STATIC_VARIABLES
             + OTHER_VARIABLES + grid.extra_variables)
    horizontal = grid.horizontal_dims
    data_vars = {}
    for name in sorted(set(names) - set(leave_out)):  # the real stores sort them too
        values = fields[name]
        if name in STATIC_VARIABLES:
            dims = ("latitude", "longitude")
        elif values.ndim == 4:
            dims = ("time", "level", "latitude", "longitude")
        else:
            dims = ("time", "latitude", "longitude")
        array = xr.DataArray(values, dims=dims, attrs=_ATTRS[name])
        data_vars[name] = array.transpose(*dims[:-2], *horizontal)
    coords = {"time": times.as_unit("ns").values, "level": level_values,
              "latitude": grid.latitude, "longitude": grid.longitude}
    ds = xr.Dataset(data_vars, coords=coords)
    if grid.coordinate_attrs:
        ds["latitude"].attrs = {"long_name": "latitude", "units": "degrees_north"}
        ds["longitude"].attrs = {"long_name": "longitude", "units": "degrees_east"}
    encoding = {name: {"chunks": tuple(
        min(grid.time_chunk, times.size) if dim == "time" else ds.sizes[dim]
        for dim in ds[name].dims)} for name in ds.data_vars}
    encoding["time"] = {"units": "hours since 1959-01-01", "calendar": "proleptic_gregorian",
                        "dtype": "int64"}
    ds.to_zarr(path, zarr_format=2, consolidated=True, encoding=encoding, mode="w")
    return ds

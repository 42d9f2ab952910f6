"""The input contract of a forecast: initial conditions must match the checkpoint exactly.

Initial conditions come from a training store or from any dataset in canonical names
(e.g. a WeatherBench 2 / ARCO-ERA5 zarr). Before anything runs, their variables, levels, units,
grid (order included), time step and value ranges are checked against the checkpoint's
metadata; any mismatch is an error naming the problem and the fix, never a silent bad forecast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from weathermodel import conventions as cv
from weathermodel.data.sources import open_path
from weathermodel.data.store import read_metadata
from weathermodel.errors import DataError
from weathermodel.models.forecaster import ModelMetadata
from weathermodel.units import normalise_units

#: initial values further than this many standard deviations outside the training range
#: are refused (wrong units, wrong variable, corrupt data)
RANGE_TOLERANCE_STD = 5.0


def _grid_error(name: str, mine: np.ndarray, theirs: np.ndarray, path: str) -> DataError:
    if mine.size == theirs.size and np.allclose(mine, theirs[::-1], atol=1e-4):
        problem = f"{name} is in the opposite order to the checkpoint's (flipped)"
    else:
        problem = (f"{name} ({theirs.size} points, {theirs[0]:g}..{theirs[-1]:g}) differs from "
                   f"the checkpoint's grid ({mine.size} points, {mine[0]:g}..{mine[-1]:g})")
    return DataError(problem, "bring the data to the checkpoint's grid with 'weathermodel "
                     "prepare' (it orders latitude ascending) or regrid it", path=path)


def open_initial_conditions(path: str, metadata: ModelMetadata) -> xr.DataArray:
    """Open and check initial conditions; returns ``state`` (time, number, channel, lat, lon)
    in the checkpoint's channel order, lazily."""
    store_meta = read_metadata(path) if Path(path).is_dir() else None
    ds = open_path(path)
    if store_meta is not None:  # a training store: states already stacked in channels
        if not store_meta.get("complete"):
            raise DataError("the store is incomplete", "finish it with 'weathermodel prepare'",
                            path=path)
        channels = [str(c) for c in ds["channel"].values]
        missing = [c for c in metadata.channels if c not in channels]
        if missing:
            raise DataError(f"channel(s) {missing} of the checkpoint are not in the store "
                            f"(it has {channels})", "prepare a store with these variables and "
                            "levels", path=path, variable=missing[0])
        units = {v["name"]: v["units"] for v in store_meta["variables"]}
        state = ds["state"].sel(channel=metadata.channels)
    else:
        state, units = _stack_canonical(ds, metadata, path)
    for variable in metadata.variables:
        have = units.get(variable["name"])
        if have is None or normalise_units(str(have)) != normalise_units(variable["units"]):
            raise DataError(f"units {have!r} of '{variable['name']}' are not the checkpoint's "
                            f"{variable['units']!r}",
                            f"convert to {variable['units']} (weathermodel prepare does)",
                            path=path, variable=variable["name"])
    for name, mine in ((cv.LATITUDE, metadata.latitude), (cv.LONGITUDE, metadata.longitude)):
        theirs = state[name].values.astype("float64")
        mine = np.asarray(mine)
        if theirs.shape != mine.shape or not np.allclose(theirs, mine, atol=1e-4):
            raise _grid_error(name, mine, theirs, path)
    times = state[cv.TIME].values
    if times.size > 1:
        steps = np.unique(np.diff(times).astype("timedelta64[s]").astype(np.int64))
        if metadata.time_step_seconds not in steps:
            raise DataError(f"time steps {sorted(steps.tolist())} s do not include the "
                            f"checkpoint's {metadata.time_step_seconds} s",
                            "give data at the model's time step", path=path)
    return state


def _stack_canonical(ds: xr.Dataset, metadata: ModelMetadata, path: str
                     ) -> tuple[xr.DataArray, dict[str, str]]:
    """Channels from a dataset in canonical names (time, [level,] latitude, longitude)."""
    arrays, units = [], {}
    for variable, level in zip(metadata.channel_variables, metadata.channel_levels):
        if variable not in ds:
            raise DataError(f"variable '{variable}' of the checkpoint is missing (the data has "
                            f"{sorted(map(str, ds.data_vars))})",
                            "add it, or use a checkpoint trained without it", path=path,
                            variable=variable)
        array = ds[variable]
        units[variable] = array.attrs.get("units", "")
        if not np.isnan(level):
            if cv.LEVEL not in array.dims or level not in array[cv.LEVEL].values:
                raise DataError(f"level {level:g} hPa of '{variable}' is missing", "add it",
                                path=path, variable=variable)
            array = array.sel({cv.LEVEL: level}, drop=True)
        if cv.MEMBER not in array.dims:
            array = array.expand_dims({cv.MEMBER: [0]}, axis=1)
        arrays.append(array.transpose(cv.TIME, cv.MEMBER, cv.LATITUDE, cv.LONGITUDE))
    state = xr.concat(arrays, dim=cv.CHANNEL, coords="minimal", compat="override")
    state = state.transpose(cv.TIME, cv.MEMBER, cv.CHANNEL, cv.LATITUDE, cv.LONGITUDE)
    return state.assign_coords({cv.CHANNEL: metadata.channels}), units


def check_value_ranges(values: np.ndarray, metadata: ModelMetadata, where: str) -> None:
    """Refuse initial states far outside the training range of each channel."""
    low = np.asarray(metadata.mean) - RANGE_TOLERANCE_STD * np.asarray(metadata.std)
    high = np.asarray(metadata.mean) + RANGE_TOLERANCE_STD * np.asarray(metadata.std)
    channel_means = np.nanmean(values, axis=tuple(i for i in range(values.ndim) if i != 2)
                               if values.ndim == 5 else (0, 2, 3))
    for index, mean in enumerate(np.atleast_1d(channel_means)):
        if not low[index] <= mean <= high[index]:
            raise DataError(
                f"initial values of '{metadata.channels[index]}' average {mean:.4g}, outside "
                f"the training range {low[index]:.4g}..{high[index]:.4g} (mean +- "
                f"{RANGE_TOLERANCE_STD:g} std): wrong units or wrong variable",
                "check the data's units (e.g. Kelvin, not Celsius)", path=where,
                variable=metadata.channels[index])

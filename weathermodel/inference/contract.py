"""The input contract of a forecast: initial conditions must match the checkpoint exactly.

Initial conditions come from a training store or from any dataset in canonical names
(e.g. a WeatherBench 2 / ARCO-ERA5 zarr). Before anything runs, their variables, levels, units,
grid (order included), time step and value ranges are checked against the checkpoint's
metadata; any mismatch is an error naming the problem and the fix, never a silent bad forecast.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from weathermodel import conventions
from weathermodel.data.sources import open_path
from weathermodel.data.store import read_metadata
from weathermodel.data.timeaxis import inspect_time_axis
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
    # a training store holds one stacked array: read lazily without dask (a forecast reads a
    # few states; other datasets are stacked from many variables, which needs dask's laziness)
    ds = open_path(path, chunked=store_meta is None)
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
        return _checked_state(state, units, metadata, path)
    return check_initial_conditions(ds, metadata, path)


def check_initial_conditions(ds: xr.Dataset, metadata: ModelMetadata,
                             where: str = "initial_conditions") -> xr.DataArray:
    """Check a dataset in canonical names (``time``, [``level``,] ``latitude``,
    ``longitude``; WeatherBench 2 variable names and units) against the checkpoint, and stack
    it into ``state`` (time, number, channel, lat, lon) in the checkpoint's channel order,
    lazily. The same contract as ``weathermodel forecast --data``.

    Parameters
    ----------
    ds : the initial conditions (and, optionally, forcing channels such as sea surface
        temperature at later times).
    metadata : the checkpoint's metadata.
    where : how errors name the data (a path, or a description).

    Raises
    ------
    DataError : a variable or level is missing, units differ, the grid differs (order
        included), or the time step does not divide the checkpoint's.
    """
    state, units = _stack_canonical(ds, metadata, where)
    return _checked_state(state, units, metadata, where)


def _checked_state(state: xr.DataArray, units: dict[str, str], metadata: ModelMetadata,
                   path: str) -> xr.DataArray:
    """``state`` after the checks of units, grid and time axis against the checkpoint."""
    for variable in metadata.variables:
        have = units.get(variable["name"])
        if have is None or normalise_units(str(have)) != normalise_units(variable["units"]):
            raise DataError(f"units {have!r} of '{variable['name']}' are not the checkpoint's "
                            f"{variable['units']!r}",
                            f"convert to {variable['units']} (weathermodel prepare does)",
                            path=path, variable=variable["name"])
    for name, mine in ((conventions.LATITUDE, metadata.latitude), (conventions.LONGITUDE, metadata.longitude)):
        theirs = state[name].values.astype("float64")
        mine = np.asarray(mine)
        if theirs.shape != mine.shape or not np.allclose(theirs, mine, atol=1e-4):
            raise _grid_error(name, mine, theirs, path)
    times = state[conventions.TIME].values
    # duplicated or unordered times are refused here, not met as a pandas error later
    inspect_time_axis(times, pd.Timedelta(seconds=metadata.time_step_seconds), path)
    if times.size > 1:
        steps = np.unique(np.diff(times).astype("timedelta64[s]").astype(np.int64))
        if not any(metadata.time_step_seconds % step == 0 for step in steps if step > 0):
            raise DataError(f"time steps {sorted(steps.tolist())} s do not divide the "
                            f"checkpoint's {metadata.time_step_seconds} s",
                            "give data at the model's time step (or a divisor of it, e.g. "
                            "hourly data for a 6-hour model)", path=path)
    return state


def _stack_canonical(ds: xr.Dataset, metadata: ModelMetadata, path: str
                     ) -> tuple[xr.DataArray, dict[str, str]]:
    """Channels from a dataset in canonical names (time, [level,] latitude, longitude)."""
    arrays, units = [], {}
    template = None
    for variable, level, role in zip(metadata.channel_variables, metadata.channel_levels,
                                     metadata.channel_roles):
        if variable not in ds and role == conventions.DIAGNOSTIC:  # an output only: not needed as input
            arrays.append(None)
            units[variable] = next(v["units"] for v in metadata.variables
                                   if v["name"] == variable)
            continue
        if variable not in ds:
            raise DataError(f"variable '{variable}' of the checkpoint is missing (the data has "
                            f"{sorted(map(str, ds.data_vars))})",
                            "add it, or use a checkpoint trained without it", path=path,
                            variable=variable)
        array = ds[variable]
        units[variable] = array.attrs.get("units", "")
        if not np.isnan(level):
            if conventions.LEVEL not in array.dims or level not in array[conventions.LEVEL].values:
                raise DataError(f"level {level:g} hPa of '{variable}' is missing", "add it",
                                path=path, variable=variable)
            array = array.sel({conventions.LEVEL: level}, drop=True)
        expected = {conventions.TIME, conventions.LATITUDE, conventions.LONGITUDE}
        if not expected <= set(array.dims) or set(array.dims) - expected - {conventions.MEMBER}:
            raise DataError(f"'{variable}' has dims {list(map(str, array.dims))}, not the "
                            f"canonical ({conventions.TIME}, [{conventions.LEVEL},] {conventions.LATITUDE}, "
                            f"{conventions.LONGITUDE})", "rename the dims (e.g. lat -> latitude), or "
                            "convert the data with 'weathermodel prepare'", path=path,
                            variable=variable)
        if conventions.MEMBER not in array.dims:
            array = array.expand_dims({conventions.MEMBER: [0]}, axis=1)
        arrays.append(array.transpose(conventions.TIME, conventions.MEMBER, conventions.LATITUDE, conventions.LONGITUDE))
        template = arrays[-1]
    # absent diagnostics: NaN channels of the right shape (never read as inputs)
    arrays = [array if array is not None else xr.full_like(template, np.nan, dtype="float32")
              for array in arrays]
    state = xr.concat(arrays, dim=conventions.CHANNEL, coords="minimal", compat="override")
    state = state.transpose(conventions.TIME, conventions.MEMBER, conventions.CHANNEL, conventions.LATITUDE, conventions.LONGITUDE)
    return state.assign_coords({conventions.CHANNEL: metadata.channels}), units


def check_value_ranges(values: np.ndarray, metadata: ModelMetadata, where: str,
                       init: object = None) -> None:
    """Refuse initial states with missing values or far outside the training range.

    Parameters
    ----------
    values : (history, channel, lat, lon) or (history, member, channel, lat, lon).
    metadata : the checkpoint's metadata (channels, training mean and std).
    where : the data's path, named in errors.
    init : the start date, named in errors when given.

    Raises
    ------
    DataError : a channel holds NaN or inf (the network would turn the whole forecast into
        NaN), or its mean lies more than ``RANGE_TOLERANCE_STD`` std from the training mean.
    """
    channel_axis = 2 if values.ndim == 5 else 1
    other_axes = tuple(i for i in range(values.ndim) if i != channel_axis)
    when = f" at start date {init}" if init is not None else ""
    # only inputs are checked: diagnostics are never read; channels that had missing values in
    # training are imputed by the model (NaN allowed there)
    checked = np.zeros(len(metadata.channels), dtype=bool)
    checked[metadata.role_index(conventions.PROGNOSTIC, conventions.FORCING)] = True
    imputed = np.asarray(metadata.channel_has_missing, dtype=bool)
    bad = (~np.isfinite(values)).sum(axis=other_axes) * (checked & ~imputed)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        share = bad[index] / (values.size / values.shape[channel_axis])
        raise DataError(
            f"the initial values of '{metadata.channels[index]}'{when} hold {int(bad[index])} "
            f"missing (NaN) or infinite values ({share:.1%}); the model cannot forecast from "
            "them", "fill the missing values (e.g. with the training mean) or choose start "
            "dates where the data is complete", path=where, variable=metadata.channels[index])
    low = np.asarray(metadata.mean) - RANGE_TOLERANCE_STD * np.asarray(metadata.std)
    high = np.asarray(metadata.mean) + RANGE_TOLERANCE_STD * np.asarray(metadata.std)
    with warnings.catch_warnings():  # an all-missing imputed or diagnostic channel: NaN mean
        warnings.simplefilter("ignore", RuntimeWarning)
        channel_means = np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=other_axes)
    units = {v["name"]: v["units"] for v in metadata.variables}
    for index, mean in enumerate(np.atleast_1d(channel_means)):
        if checked[index] and np.isfinite(mean) and not low[index] <= mean <= high[index]:
            kelvin = units.get(metadata.channel_variables[index]) == "K"
            hint = " (they look like degrees Celsius)" if kelvin and -90 < mean < 60 else ""
            raise DataError(
                f"initial values of '{metadata.channels[index]}'{when} average {mean:.4g}, "
                f"outside the training range {low[index]:.4g}..{high[index]:.4g} (mean +- "
                f"{RANGE_TOLERANCE_STD:g} std): wrong units or wrong variable{hint}",
                "check the data's units (e.g. Kelvin, not Celsius)", path=where,
                variable=metadata.channels[index])

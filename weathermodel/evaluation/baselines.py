"""Reference forecasts (persistence, climatology) and the climatology they need.

Both baselines are returned in the schema of ``weathermodel forecast`` stores, so they are
scored by exactly the same code as a model: per variable, dims (``time`` = initialisation
time, ``prediction_timedelta``, [``level``], ``latitude``, ``longitude``) and the coordinate
``valid_time = time + prediction_timedelta``. They are lazy when the truth (or climatology) is
dask-backed.

Climatology convention (WeatherBench 2)
---------------------------------------
dims (``dayofyear``, ``hour``, [``level``], ``latitude``, ``longitude``); ``dayofyear`` is
1..366 as pandas counts it (so after 28 February the days of leap and common years are
shifted by one, as in WB2), ``hour`` the UTC hours present in the truth (e.g. 0, 6, 12, 18).
The value at (d, h) is the mean of all truth times on day-of-year d at hour h, optionally
smoothed over neighbouring days (see :func:`compute_climatology`).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import xarray as xr

from weathermodel import conventions
from weathermodel.errors import ConfigError, DataError
from weathermodel.evaluation.alignment import (DAYOFYEAR, HOUR, LEAD, VALID_TIME, Data,
                                               as_dataset, climatology_at,
                                               take_per_init_and_lead)

log = logging.getLogger(__name__)

DAYS_IN_LEAP_YEAR = 366


def _as_times(values: np.ndarray | pd.DatetimeIndex | list, kind: str) -> np.ndarray:
    if kind == "time":
        return pd.DatetimeIndex(values).values.astype("datetime64[ns]")
    return pd.TimedeltaIndex(values).values.astype("timedelta64[ns]")


def _forecast_schema(forecast: xr.Dataset, baseline: str) -> xr.Dataset:
    """valid_time coordinate, dims in forecast-store order, provenance attribute."""
    valid = forecast[conventions.TIME] + forecast[LEAD]
    order = [d for d in (conventions.TIME, LEAD, conventions.LEVEL, conventions.LATITUDE,
                         conventions.LONGITUDE)
             if d in forecast.dims]
    forecast = forecast.assign_coords({VALID_TIME: valid}).transpose(*order, ...)
    return forecast.assign_attrs(weathermodel_baseline=baseline)


def persistence_forecast(truth: Data, init_times: np.ndarray, leads: np.ndarray) -> xr.Dataset:
    """The truth at the initialisation time, repeated at every lead.

    Parameters
    ----------
    truth : (time, [level], latitude, longitude), ``time`` the valid time.
    init_times : initialisation times; those missing from the truth are dropped (logged).
    leads : lead times (timedelta64 or strings such as ``"6h"``).

    Returns
    -------
    Dataset (time, prediction_timedelta, [level], latitude, longitude), forecast-store schema.
    """
    truth = as_dataset(truth)
    init_times, leads = _as_times(init_times, "time"), _as_times(leads, "lead")
    positions = pd.Index(truth[conventions.TIME].values).get_indexer(init_times)
    keep = positions >= 0
    if not keep.all():
        log.warning("persistence: %d initialisation time(s) are not in the truth and are "
                    "dropped", int((~keep).sum()))
    if not keep.any():
        raise DataError("no initialisation time is in the truth",
                        "give the truth of the forecast's period")
    index = np.repeat(positions[keep, None], leads.size, axis=1)
    forecast = take_per_init_and_lead(truth, conventions.TIME, index, init_times[keep], leads)
    return _forecast_schema(forecast, "persistence")


def climatology_forecast(climatology: xr.Dataset, init_times: np.ndarray,
                         leads: np.ndarray) -> xr.Dataset:
    """The climatology at each valid time (WB2's climatology forecast).

    Parameters
    ----------
    climatology : (dayofyear, [hour], [level], latitude, longitude), see
        :func:`compute_climatology`.
    init_times, leads : as for :func:`persistence_forecast`.

    Returns
    -------
    Dataset (time, prediction_timedelta, [level], latitude, longitude), forecast-store schema.
    """
    init_times, leads = _as_times(init_times, "time"), _as_times(leads, "lead")
    valid = xr.DataArray(init_times[:, None] + leads[None, :], dims=(conventions.TIME, LEAD),
                         coords={conventions.TIME: init_times, LEAD: leads})
    return _forecast_schema(climatology_at(as_dataset(climatology), valid), "climatology")


def triangular_window(window_days: int) -> np.ndarray:
    """WB2's smoothing weights: linear from 0 up to 1 at the centre and down to 0 again
    (``create_window_weights``; the two end weights are 0), ``window_days`` odd."""
    if window_days < 1 or window_days % 2 == 0:
        raise ConfigError(f"window_days={window_days} must be a positive odd number",
                          "use e.g. 61 (WeatherBench 2) or 1 (no smoothing)")
    half = window_days // 2
    return np.concatenate([np.linspace(0.0, 1.0, half + 1), np.linspace(1.0, 0.0, half + 1)[1:]])


def smooth_dayofyear(climatology: xr.Dataset, window_days: int) -> xr.Dataset:
    """Weighted running mean over ``dayofyear``, periodic (day 366 wraps to day 1).

    Weights: :func:`triangular_window`. NaN days (no data) are left out and the weights
    renormalised, so with data on every day this equals WB2's
    ``smooth_dayofyear_variable_with_rolling_window``.
    """
    weights = triangular_window(window_days)
    half = window_days // 2
    total: xr.Dataset | float = 0.0
    norm: xr.Dataset | float = 0.0
    for shift, weight in zip(range(-half, half + 1), weights):
        if weight == 0.0:
            continue
        rolled = climatology.roll({DAYOFYEAR: shift})
        total = total + weight * rolled.fillna(0.0)
        norm = norm + weight * rolled.notnull()
    return total / norm.where(norm > 0)  # type: ignore[union-attr]


def _slot_positions(times: pd.DatetimeIndex, hours: np.ndarray, year: int) -> np.ndarray:
    """For each (dayofyear, hour) slot, the position of the truth time of ``year`` in it
    (-1: none); slot = (dayofyear - 1) * len(hours) + index of the hour."""
    in_year = np.flatnonzero(times.year == year)
    slots = (times.day_of_year.values[in_year] - 1) * hours.size + pd.Index(hours).get_indexer(
        times.hour[in_year])
    if np.unique(slots).size != slots.size:
        raise DataError(f"several truth times of {year} share a day of year and hour "
                        "(sub-hourly data)", "thin the truth to whole hours first")
    positions = np.full(DAYS_IN_LEAP_YEAR * hours.size, -1, dtype=np.int64)
    positions[slots] = in_year
    return positions


def _slot_mean(truth: xr.Dataset, hours: np.ndarray) -> xr.Dataset:
    """Mean per (dayofyear, hour) over the years, NaN-aware; every slot of 1..366 x hours.

    Each year fills every slot at most once, so the truth is taken year by year onto the slot
    axis (one lazy take per year, chunks preserved) and the years are summed.
    """
    times = pd.DatetimeIndex(truth[conventions.TIME].values)
    total: xr.Dataset | float = 0.0
    count: xr.Dataset | float = 0.0
    for year in np.unique(times.year):
        positions = _slot_positions(times, hours, int(year))
        filled = pd.Series(np.where(positions >= 0, positions, np.nan)).ffill().bfill()
        picked = truth.isel({conventions.TIME: filled.to_numpy().astype(np.int64)}, drop=True)
        picked = picked.drop_vars(conventions.TIME).rename({conventions.TIME: "_slot"})
        picked = picked.where(xr.DataArray(positions >= 0, dims="_slot"))
        total = total + picked.fillna(0.0)
        count = count + picked.notnull()
    mean = total / count.where(count > 0)  # type: ignore[union-attr]
    slots = xr.Coordinates.from_pandas_multiindex(pd.MultiIndex.from_arrays(
        [np.repeat(np.arange(1, DAYS_IN_LEAP_YEAR + 1), hours.size),
         np.tile(hours, DAYS_IN_LEAP_YEAR)], names=[DAYOFYEAR, HOUR]), "_slot")
    return mean.assign_coords(slots).unstack("_slot")


def compute_climatology(truth: Data, *, window_days: int | None = None,
                        start: str | None = None, end: str | None = None,
                        hours: np.ndarray | list[int] | None = None) -> xr.Dataset:
    """Day-of-year x hour-of-day mean of the truth (WB2's climatology layout).

    Parameters
    ----------
    truth : (time, [level], latitude, longitude), e.g. from
        :func:`weathermodel.evaluation.evaluate.truth_dataset`.
    window_days : None or 1: the raw mean of the days sharing a (dayofyear, hour); an odd
        number N > 1: then smoothed over dayofyear with WB2's triangular window of N days
        (periodic; WB2's published climatology uses 61 days), see :func:`smooth_dayofyear`.
    start, end : time range of the truth to use (ISO strings, inclusive); default all.
    hours : UTC hours to compute; default every hour present in the truth.

    Returns
    -------
    Dataset per variable with dims (dayofyear [1..366], hour, [level], latitude, longitude),
    in the truth's units. Slots without data are NaN (smoothing fills them from neighbouring
    days when the window reaches data); if no year of the truth is a leap year, day 366
    copies day 365 (as WB2). Lazy when the truth is dask-backed.
    """
    truth = as_dataset(truth).sel({conventions.TIME: slice(start, end)})
    if truth.sizes[conventions.TIME] == 0:
        raise DataError(f"no truth time within {start}..{end}", "widen the period")
    times = pd.DatetimeIndex(truth[conventions.TIME].values)
    hours = np.unique(times.hour) if hours is None else np.asarray(hours, dtype=np.int64)
    truth = truth.isel({conventions.TIME: np.isin(times.hour, hours)})
    if truth.chunks:  # few large tasks rather than one per stored time step
        truth = truth.chunk({conventions.TIME: "auto"})
    climatology = _slot_mean(truth, hours)
    if climatology.chunks:
        climatology = climatology.chunk({DAYOFYEAR: "auto", HOUR: -1})
    if DAYS_IN_LEAP_YEAR not in set(times.day_of_year):
        filled = climatology.sel({DAYOFYEAR: DAYS_IN_LEAP_YEAR - 1})
        climatology = xr.concat([climatology.sel({DAYOFYEAR: slice(None, 365)}),
                                 filled.expand_dims({DAYOFYEAR: [DAYS_IN_LEAP_YEAR]})],
                                dim=DAYOFYEAR)
    if window_days is not None and window_days > 1:
        climatology = smooth_dayofyear(climatology, window_days)
    order = [d for d in (DAYOFYEAR, HOUR, conventions.LEVEL, conventions.LATITUDE,
                         conventions.LONGITUDE)
             if d in climatology.dims]
    climatology = climatology.transpose(*order, ...)
    for name in climatology.data_vars:
        dtype = np.promote_types(truth[name].dtype, np.float32)  # float32 stays float32
        climatology[name] = climatology[name].astype(dtype).assign_attrs(truth[name].attrs)
    return climatology.assign_attrs(
        description="mean by day of year and hour of day (WeatherBench 2 layout)",
        window_days=int(window_days or 1),
        time_range=f"{times[0].isoformat()}/{times[-1].isoformat()}")

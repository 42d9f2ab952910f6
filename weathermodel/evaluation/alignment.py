"""Forecasts paired with the truth (and a climatology) by valid time, in WeatherBench 2 layout.

Data conventions
----------------
* ``forecast``: a Dataset (one variable per field) or DataArray with dims ``time``
  (initialisation time, UTC), [``number``] (ensemble member), ``prediction_timedelta`` (lead),
  [``level``] (hPa), ``latitude`` (degrees north), ``longitude`` (degrees east). The valid
  time of a value is ``time + prediction_timedelta``.
* ``truth``: the verifying fields *aligned* to the forecast by :func:`align`, i.e. with dims
  (``time``, ``prediction_timedelta``, [``level``], ``latitude``, ``longitude``), where
  ``truth[time=t, prediction_timedelta=l]`` is the analysis valid at ``t + l``. A boolean
  coordinate ``valid_pair`` (time, prediction_timedelta) marks the (init, lead) pairs whose
  valid time exists in the truth; the others are left out of every time mean.
* a climatology: dims (``dayofyear``, [``hour``], [``level``], ``latitude``, ``longitude``),
  taken at each valid time by :func:`climatology_at` as WB2 selects it.

Every function is lazy on dask-backed inputs: values are picked by slices of the stored chunks
wherever the positions are evenly spaced, so nothing is loaded or copied ahead.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Union

import numpy as np
import pandas as pd
import xarray as xr

from weathermodel import conventions
from weathermodel.errors import DataError

log = logging.getLogger(__name__)

LEAD = "prediction_timedelta"
VALID_TIME = "valid_time"
VALID_PAIR = "valid_pair"
N_PAIRS = "n_pairs"
DAYOFYEAR = "dayofyear"
HOUR = "hour"
SPACE = (conventions.LATITUDE, conventions.LONGITUDE)
#: the temporary name of the dimension values are picked along
_SOURCE = "_source"

Data = Union[xr.Dataset, xr.DataArray]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def as_dataset(data: Data, name: str = "value") -> xr.Dataset:
    """A Dataset as it is, a DataArray as a one-variable Dataset (its name, or ``name``)."""
    if isinstance(data, xr.Dataset):
        return data
    return data.to_dataset(name=data.name if data.name is not None else name)


def _check_aligned(forecast: xr.Dataset, truth: xr.Dataset) -> None:
    """Refuse a truth indexed by valid time: arithmetic would silently pair it by init time."""
    fix = "pair them with weathermodel.evaluation.align(forecast, truth) first"
    if LEAD in forecast.dims and LEAD not in truth.dims:
        raise DataError("the truth has no 'prediction_timedelta' dimension: it is not aligned "
                        "with the forecast by valid time", fix)
    if conventions.TIME in forecast.dims and conventions.TIME in truth.dims and \
            not np.array_equal(forecast[conventions.TIME].values,
                               truth[conventions.TIME].values):
        raise DataError("forecast and truth have different initialisation times", fix)


def common_variables(forecast: Data, truth: Data) -> tuple[xr.Dataset, xr.Dataset]:
    """Both as Datasets with their common variables (two DataArrays: the forecast's name)."""
    if isinstance(forecast, xr.DataArray) and isinstance(truth, xr.DataArray):
        name = forecast.name if forecast.name is not None else "value"
        forecast, truth = forecast.to_dataset(name=name), truth.to_dataset(name=name)
    forecast, truth = as_dataset(forecast), as_dataset(truth)
    names = [v for v in forecast.data_vars if v in truth.data_vars]
    if not names:
        raise DataError(f"forecast variables {sorted(map(str, forecast.data_vars))} and truth "
                        f"variables {sorted(map(str, truth.data_vars))} have none in common",
                        "give the truth of the forecast's variables (canonical names)")
    return forecast[names], truth[names]


def aligned_pair(forecast: Data, truth: Data) -> tuple[xr.Dataset, xr.Dataset]:
    """:func:`common_variables`, checked to be aligned by valid time (see :func:`align`)."""
    forecast, truth = common_variables(forecast, truth)
    _check_aligned(forecast, truth)
    return forecast, truth


def latitude_ascending(data: xr.Dataset) -> xr.Dataset:
    """Flip a descending latitude axis (lazily)."""
    lat = data[conventions.LATITUDE].values
    if lat.size > 1 and lat[0] > lat[-1]:
        return data.isel({conventions.LATITUDE: slice(None, None, -1)})
    return data


def on_truth_grid(data: xr.Dataset, truth: xr.Dataset, atol: float) -> xr.Dataset:
    """``data`` with the truth's latitude and longitude, refused if they differ by > atol."""
    for name in SPACE:
        mine, theirs = data[name].values, truth[name].values
        if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=atol):
            raise DataError(f"{name} ({mine.size} points, {mine[0]:g}..{mine[-1]:g}) is not "
                            f"the truth's ({theirs.size} points, {theirs[0]:g}.."
                            f"{theirs[-1]:g})",
                            "regrid the forecast (or climatology) and the truth to one grid")
    return data.assign_coords({name: truth[name].values for name in SPACE})


# --------------------------------------------------------------------------------------------
# picking values by position, lazily
# --------------------------------------------------------------------------------------------
def _runs(positions: np.ndarray) -> list[tuple[int, int, int]]:
    """Split positions into runs (first, count, step) of evenly spaced increasing positions;
    a run of missing entries (< 0) has step 0."""
    runs: list[tuple[int, int, int]] = []
    for i, position in enumerate(positions):
        if runs:
            first, count, step = runs[-1]
            last = positions[i - 1]
            if position < 0 and last < 0:
                runs[-1] = (first, count + 1, 0)
                continue
            if position >= 0 and last >= 0 and (count == 1 or position - last == step) and \
                    position > last:
                runs[-1] = (first, count + 1, position - last)
                continue
        runs.append((int(position), 1, 0))
    return runs


def _take_as_time_axis(source: xr.Dataset, positions: np.ndarray) -> xr.Dataset:
    """``source`` at ``positions`` along ``_source`` (NaN for < 0) as a new ``time`` axis.

    Evenly spaced runs are taken as slices, so that dask takes views of the stored chunks
    rather than copies (which its scheduler would otherwise compute ahead and hold).
    """
    pieces = []
    for first, count, step in _runs(positions):
        if first < 0:
            blank = xr.full_like(source.isel({_SOURCE: [0]}), np.nan)  # fields are floats
            pieces.append(blank.isel({_SOURCE: np.zeros(count, dtype=np.int64)}))
        else:
            stop = first + (count - 1) * max(step, 1) + 1
            pieces.append(source.isel({_SOURCE: slice(first, stop, max(step, 1))}))
    taken = pieces[0] if len(pieces) == 1 else xr.concat(
        pieces, dim=_SOURCE, coords="minimal", compat="override", join="override")
    return taken.rename({_SOURCE: conventions.TIME})


def take_per_init_and_lead(data: xr.Dataset, dim: str, index: np.ndarray,
                           init_times: np.ndarray, leads: np.ndarray) -> xr.Dataset:
    """``data`` taken along ``dim`` at ``index[t, l]`` into (time, prediction_timedelta, ...).

    Lazy for dask-backed data (slices of ``data`` per lead where the positions are evenly
    spaced, so output chunks are views of its chunks); entries < 0 give NaN.
    """
    attached = [c for c in data.coords if dim in data[c].dims]
    source = data.drop_vars(attached).rename({dim: _SOURCE})
    index = np.asarray(index, dtype=np.int64)
    pieces = [_take_as_time_axis(source, index[:, j]) for j in range(len(leads))]
    stacked = xr.concat(pieces, dim=pd.Index(leads, name=LEAD), coords="minimal",
                        compat="override", join="override")
    stacked = stacked.assign_coords({conventions.TIME: init_times})
    return stacked.transpose(conventions.TIME, LEAD, ...)


# --------------------------------------------------------------------------------------------
# alignment by valid time
# --------------------------------------------------------------------------------------------
class Aligned(NamedTuple):
    """Forecast and truth paired by valid time."""

    forecast: xr.Dataset
    """the forecast, latitude ascending, init times without any verifying truth dropped"""
    truth: xr.Dataset
    """the truth at each (init, lead), NaN where missing, coordinate ``valid_pair``"""
    n_pairs: xr.DataArray
    """(prediction_timedelta,) number of init times scored at each lead"""
    n_missing: int
    """(init, lead) pairs left out because their valid time is not in the truth"""


def _common_levels(forecast: xr.Dataset, truth: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    level = conventions.LEVEL
    if level not in forecast.dims or level not in truth.dims:
        return forecast, truth
    levels = np.intersect1d(forecast[level].values, truth[level].values)
    if levels.size == 0:
        raise DataError(f"no level in common: forecast {forecast[level].values.tolist()}, "
                        f"truth {truth[level].values.tolist()}", "score common levels")
    return forecast.sel({level: levels}), truth.sel({level: levels})


def _truth_positions(truth_times: np.ndarray, valid_time: np.ndarray) -> np.ndarray:
    index = pd.Index(truth_times)
    if not index.is_unique:
        raise DataError("the truth has duplicated times", "drop the duplicates")
    return index.get_indexer(valid_time.ravel()).reshape(valid_time.shape)


def align(forecast: Data, truth: Data, *, atol: float = 1e-3) -> Aligned:
    """Pair each forecast value with the truth at its valid time.

    Parameters
    ----------
    forecast : (time, [number], prediction_timedelta, [level], latitude, longitude).
    truth : (time, [level], latitude, longitude), ``time`` being the valid time.
    atol : degrees by which the grids may differ (the truth's coordinates are then used).

    Returns
    -------
    :class:`Aligned`: variables and levels common to both; latitude ascending; truth
    (time, prediction_timedelta, [level], latitude, longitude) with coordinates ``valid_time``
    and ``valid_pair``. Pairs whose valid time is missing from the truth are NaN in the truth,
    marked False in ``valid_pair`` and left out of every score; their number is logged (warning)
    and returned. Init times without any verifying truth are dropped.
    """
    time = conventions.TIME
    forecast, truth = common_variables(forecast, truth)
    forecast = latitude_ascending(forecast).sortby(time)
    truth = latitude_ascending(truth)
    forecast = on_truth_grid(forecast, truth, atol)
    forecast, truth = _common_levels(forecast, truth)
    valid_time = forecast[time].values[:, None] + forecast[LEAD].values[None, :]
    positions = _truth_positions(truth[time].values, valid_time)
    keep = (positions >= 0).any(axis=1)
    forecast, positions, valid_time = forecast.isel({time: keep}), positions[keep], \
        valid_time[keep]
    if forecast.sizes[time] == 0:
        raise DataError("no valid time of the forecast is in the truth",
                        "give the truth of the forecast's period")
    init_times, leads = forecast[time].values, forecast[LEAD].values
    valid = xr.DataArray(positions >= 0, dims=(time, LEAD),
                         coords={time: init_times, LEAD: leads})
    valid_coord = xr.DataArray(valid_time, dims=(time, LEAD))
    aligned = take_per_init_and_lead(truth, time, positions, init_times, leads)
    aligned = aligned.assign_coords({VALID_TIME: valid_coord, VALID_PAIR: valid})
    for name in aligned.data_vars:
        aligned[name].attrs = dict(truth[name].attrs)
    forecast = forecast.assign_coords({VALID_TIME: valid_coord})
    n_missing = int((~valid).sum()) + int((~keep).sum()) * leads.size
    n_pairs = valid.sum(time).rename(N_PAIRS)
    if n_missing:
        log.warning("%d (init, lead) pairs have no truth at their valid time and are not "
                    "scored; %d pairs are scored", n_missing, int(valid.sum()))
    else:
        log.info("%d (init, lead) pairs are scored", int(valid.sum()))
    return Aligned(forecast, aligned, n_pairs, n_missing)


# --------------------------------------------------------------------------------------------
# the climatology at the valid times
# --------------------------------------------------------------------------------------------
def _climatology_positions(available: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    positions = pd.Index(available).get_indexer(wanted)
    if (positions < 0).any():
        missing = sorted(set(np.asarray(wanted)[positions < 0].tolist()))
        raise DataError(f"the climatology has no {what} {missing[:5]} needed by the valid "
                        f"times (it has {len(available)} values)",
                        f"compute a climatology that covers every {what} of the valid times")
    return positions


def _valid_times(data: xr.Dataset) -> xr.DataArray:
    if VALID_TIME in data.coords:
        return data.coords[VALID_TIME]
    return data[conventions.TIME] + data[LEAD]


def climatology_at(climatology: xr.Dataset, valid_time: xr.DataArray) -> xr.Dataset:
    """The climatology at each valid time, as WB2 selects it.

    Parameters
    ----------
    climatology : dims (dayofyear, [hour], [level], latitude, longitude) (see
        :func:`weathermodel.evaluation.baselines.compute_climatology`).
    valid_time : (time, prediction_timedelta) datetimes.

    Returns
    -------
    Dataset (time, prediction_timedelta, [level], latitude, longitude): the value at
    ``dayofyear = valid_time.day_of_year`` (1..366, so after 28 February a leap year's days are
    one ahead, WB2's convention) and ``hour = valid_time.hour``. Lazy, chunk per lead.
    """
    times = pd.DatetimeIndex(np.asarray(valid_time.values).ravel())
    slot = _climatology_positions(climatology[DAYOFYEAR].values, times.day_of_year.values,
                                  DAYOFYEAR)
    if HOUR in climatology.dims:
        hours = climatology[HOUR].values
        slot = slot * hours.size + _climatology_positions(hours, times.hour.values, HOUR)
        stacked = climatology.stack(_slot=(DAYOFYEAR, HOUR), create_index=False)
    else:
        stacked = climatology.rename({DAYOFYEAR: "_slot"})
    return take_per_init_and_lead(stacked, "_slot", slot.reshape(valid_time.shape),
                                  valid_time[conventions.TIME].values,
                                  valid_time[LEAD].values)


def climatology_for(climatology: xr.Dataset, truth: xr.Dataset) -> xr.Dataset:
    """The climatology on the truth's (time, lead, level) points."""
    if DAYOFYEAR not in climatology.dims:  # already at the valid times
        return climatology
    level = conventions.LEVEL
    names = {}
    for name in truth.data_vars:
        if name in climatology.data_vars:
            names[name] = name
        elif f"{name}_mean" in climatology.data_vars:  # WB2's alternative naming
            names[f"{name}_mean"] = name
        else:
            raise DataError(f"the climatology has no variable '{name}'",
                            "compute the climatology from the same truth", variable=str(name))
    climatology = latitude_ascending(climatology[list(names)].rename(names))
    if level in truth.dims and level in climatology.dims:
        missing = np.setdiff1d(truth[level].values, climatology[level].values)
        if missing.size:
            raise DataError(f"the climatology has no level(s) {missing.tolist()}",
                            "compute the climatology from the same truth")
        climatology = climatology.sel({level: truth[level].values})
    climatology = on_truth_grid(climatology, truth, atol=1e-3)
    return climatology_at(climatology, _valid_times(truth))

"""Scores of gridded forecasts against gridded truth, in WeatherBench 2 (WB2) conventions.

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
* Values in physical units; every score is in the units of the variable (``mse``: its square,
  ``acc`` and ``spread_skill_ratio``: dimensionless).

How a score is computed (as WB2's ``Metric.compute``)
-----------------------------------------------------
1. a pointwise quantity (e.g. the squared error) at every grid point, init time and lead;
2. its area-weighted mean over latitude and longitude, separately for every init time
   (and region), see :func:`spatial_mean`;
3. the mean over the scored init times (unweighted), per lead (and level, region);
4. for root scores the square root is taken *after* the time mean: ``rmse`` = sqrt(time mean
   of the area-weighted MSE) as in WB2's results; :func:`rmse_sqrt_before_time_avg` is WB2's
   ``RMSESqrtBeforeTimeAvg`` (time mean of the per-init RMSE), which is always <= ``rmse``.

Area weights (``weighting``)
----------------------------
``"auto"`` (default) is ``"wb2_edges"`` on grids that reach the poles (within a spacing) and
``"edges"`` on regional grids; the resolved choice is recorded in the scores' attributes.
``"wb2_edges"`` (for numbers comparable with WB2) replicates WB2's
``get_lat_weights`` exactly: cell edges halfway between neighbouring latitudes and, whatever
the grid, the outermost edges at -90 and +90 degrees; the weight of a row is
sin(upper edge) - sin(lower edge), normalised to mean 1. On a global grid this is the exact
cell area. On a *regional* grid the end rows absorb the whole polar caps beyond them, e.g. on
the NCEP grid (15..75 N every 2.5 degrees) the 15 N row carries 64 % of the total weight
(see ``tests/test_evaluation.py``); a warning is issued. ``"edges"`` uses
:func:`weathermodel.data.weights.cell_area_weights` (end cells half a spacing wide, snapped to a
pole only when it is within 0.9 spacing), the right choice for regional grids; ``"cos"`` is
cos(latitude) normalised to mean 1. Weights are computed on the whole grid of the data; a
region only masks points out (as WB2's ``SliceRegion``).

Regions
-------
A region is a box ``(lat_min, lat_max, lon_min, lon_max)`` in degrees, bounds included, or a
tuple of boxes (their union). Longitude bounds may be given in either convention
(-180..180 or 0..360; ``lon_min > lon_max`` after reduction modulo 360 means the box crosses
the prime meridian), and so may the grid. :data:`REGIONS` holds WB2's predefined regions.

Laziness
--------
Every function works on dask-backed inputs without loading them: pointwise quantities and
spatial means are computed chunk by chunk, and only the (time, lead, level, region) spatial
means are ever gathered. Results are lazy when the inputs are; call ``.compute()``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence, Union

import numpy as np
import pandas as pd
import xarray as xr

from weathermodel import conventions as cv
from weathermodel.data.weights import (  # noqa: F401 (re-exported)
    DEFAULT_WEIGHTING, WEIGHTINGS, latitude_weights, resolve_weighting)
from weathermodel.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LEAD = "prediction_timedelta"
VALID_TIME = "valid_time"
VALID_PAIR = "valid_pair"
N_PAIRS = "n_pairs"
REGION = "region"
DAYOFYEAR = "dayofyear"
HOUR = "hour"
ZONAL_WAVENUMBER = "zonal_wavenumber"
SPACE = (cv.LATITUDE, cv.LONGITUDE)
#: WB2's Earth radius (mean of the equatorial and polar radii), m, used by the spectra.
EARTH_RADIUS_M = 1000.0 * (6357.0 + 6378.0) / 2.0

Box = tuple[float, float, float, float]
RegionSpec = Union[Box, Sequence[Box]]
Regions = Union[None, Sequence[str], Mapping[str, RegionSpec]]
Data = Union[xr.Dataset, xr.DataArray]

#: WB2's predefined regions (``scripts/evaluate.py``): (lat_min, lat_max, lon_min, lon_max).
REGIONS: dict[str, RegionSpec] = {
    "global": (-90.0, 90.0, 0.0, 360.0),
    "tropics": (-20.0, 20.0, 0.0, 360.0),
    "extra_tropics": ((-90.0, -20.0, 0.0, 360.0), (20.0, 90.0, 0.0, 360.0)),
    "extra_tropics_nh": (20.0, 90.0, 0.0, 360.0),
    "extra_tropics_sh": (-90.0, -20.0, 0.0, 360.0),
    "europe": (35.0, 75.0, -12.5, 42.5),
    "north_america": (25.0, 60.0, -120.0, -75.0),
    "north_atlantic": (25.0, 65.0, -70.0, -10.0),
    "north_pacific": (25.0, 60.0, 145.0, 230.0),
    "east_asia": (25.0, 60.0, 102.5, 150.0),
    "ausnz": (-45.0, -12.5, 120.0, 175.0),
    "arctic": (60.0, 90.0, 0.0, 360.0),
    "antarctic": (-90.0, -60.0, 0.0, 360.0),
}


# --------------------------------------------------------------------------------------------
# area weights and regions
# --------------------------------------------------------------------------------------------
def _boxes(spec: RegionSpec | str) -> list[Box]:
    if isinstance(spec, str):
        if spec not in REGIONS:
            raise ConfigError(f"unknown region {spec!r}", f"use one of {sorted(REGIONS)} or give "
                              "a box (lat_min, lat_max, lon_min, lon_max)")
        spec = REGIONS[spec]
    if len(spec) == 4 and all(np.isscalar(v) for v in spec):
        return [tuple(float(v) for v in spec)]  # type: ignore[list-item]
    return [tuple(float(v) for v in box) for box in spec]  # type: ignore[union-attr]


def _longitude_in_range(longitude: np.ndarray, low: float, high: float) -> np.ndarray:
    """Longitudes within [low, high] degrees east, whatever the convention of either."""
    if high - low >= 360.0 - 1e-9:
        return np.ones(longitude.shape, dtype=bool)
    lon, low, high = np.mod(longitude, 360.0), low % 360.0, high % 360.0
    tol = 1e-6
    if low <= high:
        return (lon >= low - tol) & (lon <= high + tol)
    return (lon >= low - tol) | (lon <= high + tol)  # across the prime meridian


def region_mask(latitude: np.ndarray, longitude: np.ndarray,
                spec: RegionSpec | str) -> np.ndarray:
    """(n_lat, n_lon) bool: grid points inside a region (a name of :data:`REGIONS`, a box or
    a tuple of boxes; bounds included)."""
    lat = np.asarray(latitude, dtype=np.float64)[:, None]
    lon = np.asarray(longitude, dtype=np.float64)
    mask = np.zeros((lat.size, lon.size), dtype=bool)
    for lat_min, lat_max, lon_min, lon_max in _boxes(spec):
        inside_lat = (lat >= lat_min - 1e-6) & (lat <= lat_max + 1e-6)
        mask |= inside_lat & _longitude_in_range(lon, lon_min, lon_max)[None, :]
    return mask


def _region_specs(regions: Regions) -> dict[str, RegionSpec | str] | None:
    if regions is None:
        return None
    if isinstance(regions, Mapping):
        return dict(regions)
    if isinstance(regions, str):
        regions = [regions]
    return {name: name for name in regions}


def area_weights(latitude: np.ndarray, longitude: np.ndarray, regions: Regions = None,
                 weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    """Weights of every grid point for spatial means.

    Returns
    -------
    DataArray (latitude, longitude), or (region, latitude, longitude) when ``regions`` is
    given: latitude weights of the whole grid (mean 1) times each region's 0/1 mask.
    """
    rows = latitude_weights(latitude, weighting)
    coords = {cv.LATITUDE: np.asarray(latitude), cv.LONGITUDE: np.asarray(longitude)}
    full = np.broadcast_to(rows[:, None], (rows.size, np.size(longitude)))
    specs = _region_specs(regions)
    if specs is None:
        return xr.DataArray(np.array(full), dims=SPACE, coords=coords)
    stacked = np.stack([full * region_mask(latitude, longitude, spec)
                        for spec in specs.values()])
    empty = [name for name, w in zip(specs, stacked) if not w.any()]
    if empty:
        log.warning("region(s) %s hold no grid point of this grid: their scores are NaN", empty)
    return xr.DataArray(stacked, dims=(REGION, *SPACE),
                        coords={REGION: list(specs), **coords})


# --------------------------------------------------------------------------------------------
# spatial and time means
# --------------------------------------------------------------------------------------------
def _weighted_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum over (lat, lon) of values (..., lat, lon) * weights (region, lat, lon), float64.

    np.einsum without ``optimize`` runs numpy's own loops, not BLAS: tensordot's multi-threaded
    BLAS call on one small grid per dask task, with dask's threads beside it, was up to 100x
    slower on a loaded 2-core machine (benchmarks/bench_evaluate_vs_wb2.py)."""
    return np.einsum("...ij,rij->...r", values.astype(np.float64), weights)


def _area_mean_kernel(values: np.ndarray, weights: np.ndarray, skipna: bool) -> np.ndarray:
    """values (..., lat, lon), weights (region, lat, lon) -> (..., region), in float64."""
    all_weight = weights.sum(axis=(1, 2))
    missing = np.isnan(values)
    if not missing.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            return _weighted_sum(values, weights) / all_weight
    total = _weighted_sum(np.where(missing, 0.0, values), weights)
    missing_weight = _weighted_sum(missing, weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        if skipna:
            return total / (all_weight - missing_weight)
        return np.where(missing_weight > 0, np.nan, total / all_weight)


def _weighted_mean(array: xr.DataArray, weights: xr.DataArray, skipna: bool) -> xr.DataArray:
    regional = REGION in weights.dims
    stacked = (weights if regional else weights.expand_dims(REGION)).transpose(REGION, *SPACE)
    if array.chunks:  # the kernel needs whole grids per chunk
        array = array.chunk({d: -1 for d in SPACE})
    result = xr.apply_ufunc(
        _area_mean_kernel, array, input_core_dims=[list(SPACE)],
        output_core_dims=[[REGION]], dask="parallelized", output_dtypes=[np.float64],
        kwargs={"weights": stacked.values.astype(np.float64), "skipna": skipna},
        dask_gufunc_kwargs={"output_sizes": {REGION: stacked.sizes[REGION]}})
    if regional:
        return result.assign_coords({REGION: weights[REGION].values})
    return result.isel({REGION: 0}, drop=True)


def spatial_mean(field: Data, weights: xr.DataArray, skipna: bool = False) -> Data:
    """Weighted mean over latitude and longitude, per everything else (time, lead, ...).

    Parameters
    ----------
    field : values on the grid (any other dims are kept).
    weights : from :func:`area_weights`; points of zero weight (outside a region) are ignored
        even when NaN.
    skipna : False (WB2 default): a NaN inside the region makes the mean NaN; True: NaN points
        are left out and the remaining weights renormalised.
    """
    if isinstance(field, xr.DataArray):
        return _weighted_mean(field, weights, skipna)
    return field.map(_weighted_mean, weights=weights, skipna=skipna)


def _time_mean(per_time: xr.Dataset, valid: xr.DataArray | None, skipna: bool) -> xr.Dataset:
    """Unweighted mean over init times of the scored (init, lead) pairs."""
    if valid is None:
        result = per_time.mean(cv.TIME, skipna=skipna)
        return result.assign_coords({N_PAIRS: per_time.sizes[cv.TIME]})
    counts = valid.sum(cv.TIME)
    if skipna:
        result = per_time.where(valid).mean(cv.TIME, skipna=True)
    else:
        result = per_time.where(valid, 0.0).sum(cv.TIME, skipna=False) / counts.where(
            counts > 0)
    return result.assign_coords({N_PAIRS: counts})


@dataclass(frozen=True)
class _Averaging:
    """How spatial and time means are taken for one (forecast, truth) pair."""

    weights: xr.DataArray
    valid: xr.DataArray | None
    skipna: bool

    @classmethod
    def of(cls, truth: xr.Dataset, regions: Regions, weighting: str,
           skipna: bool) -> "_Averaging":
        weights = area_weights(truth[cv.LATITUDE].values, truth[cv.LONGITUDE].values, regions,
                               weighting)
        valid = truth.coords[VALID_PAIR] if VALID_PAIR in truth.coords else None
        return cls(weights=weights, valid=valid, skipna=skipna)

    def space(self, field: xr.Dataset) -> xr.Dataset:
        return spatial_mean(field, self.weights, self.skipna)

    def time(self, per_time: xr.Dataset) -> xr.Dataset:
        return _time_mean(per_time, self.valid, self.skipna)


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
    if cv.TIME in forecast.dims and cv.TIME in truth.dims and not np.array_equal(
            forecast[cv.TIME].values, truth[cv.TIME].values):
        raise DataError("forecast and truth have different initialisation times", fix)


def _common_variables(forecast: Data, truth: Data) -> tuple[xr.Dataset, xr.Dataset]:
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


def _pair(forecast: Data, truth: Data) -> tuple[xr.Dataset, xr.Dataset]:
    """:func:`_common_variables`, checked to be aligned by valid time."""
    forecast, truth = _common_variables(forecast, truth)
    _check_aligned(forecast, truth)
    return forecast, truth


def _ratio(numerator: xr.Dataset, denominator: xr.Dataset) -> xr.Dataset:
    """numerator / denominator, NaN (without a warning) where the denominator is 0, e.g. the
    ACC of a forecast without anomalies (the climatology itself)."""
    return numerator / denominator.where(denominator != 0)


_UNIT_POWER = {"mse": 2, "acc": 0, "spread_skill_ratio": 0}


def score_units(metric: str, units: str) -> str:
    """Units of ``metric`` of a variable in ``units``: squared for mse, "1" for acc and
    spread_skill_ratio, the variable's own otherwise."""
    power = _UNIT_POWER.get(metric, 1)
    if power == 0:
        return "1"
    return f"({units})2" if power == 2 and units else units


def _finish(result: xr.Dataset, truth: xr.Dataset, metric: str) -> xr.Dataset:
    """Dims (region, lead, level, ...), units and the metric's name in the attributes."""
    order = [d for d in (REGION, LEAD, cv.LEVEL) if d in result.dims]
    result = result.transpose(*order, ...)
    for name in result.data_vars:
        units = score_units(metric, str(truth[name].attrs.get("units", "")))
        result[name].attrs = {"units": units, "metric": metric}
    return result.assign_attrs(metric=metric)


# --------------------------------------------------------------------------------------------
# deterministic scores
# --------------------------------------------------------------------------------------------
def _error_score(metric: str, pointwise: Callable[[xr.Dataset], xr.Dataset],
                 root: bool = False) -> Callable[..., xr.Dataset]:
    """A score = time mean of the spatial mean of ``pointwise(forecast - truth)``."""

    def score(forecast: Data, truth: Data, *, regions: Regions = None,
              weighting: str = DEFAULT_WEIGHTING, skipna: bool = False) -> xr.Dataset:
        forecast, truth = _pair(forecast, truth)
        averaging = _Averaging.of(truth, regions, weighting, skipna)
        result = averaging.time(averaging.space(pointwise(forecast - truth)))
        return _finish(np.sqrt(result) if root else result, truth, metric)

    score.__name__ = score.__qualname__ = metric
    return score


_SCORE_DOC = """{summary}

    Parameters
    ----------
    forecast : (time, [number], prediction_timedelta, [level], latitude, longitude); an
        ensemble dimension, if any, is kept in the result.
    truth : aligned by valid time (see :func:`align`).
    regions : None (the whole grid, no ``region`` dim), names of :data:`REGIONS`, or a
        mapping name -> box(es).
    weighting : area weights, see :func:`latitude_weights` (default ``"wb2_edges"``).
    skipna : leave NaN points out of spatial means and NaN scores out of time means.

    Returns
    -------
    Dataset with one variable per forecast variable, dims ([region,] prediction_timedelta,
    [level]) and the coordinate ``n_pairs`` (init times scored per lead); units {units}.
    """

mse = _error_score("mse", lambda error: error ** 2)
mse.__doc__ = _SCORE_DOC.format(
    summary="Mean squared error: time mean of the area-weighted mean of (forecast - truth)^2.",
    units="those of the variable squared")
rmse = _error_score("rmse", lambda error: error ** 2, root=True)
rmse.__doc__ = _SCORE_DOC.format(
    summary="Root mean squared error: sqrt of the time mean of the area-weighted MSE (WB2's "
            "published RMSE; the root is taken after the time mean).",
    units="those of the variable")
mae = _error_score("mae", abs)
mae.__doc__ = _SCORE_DOC.format(
    summary="Mean absolute error: time mean of the area-weighted mean of |forecast - truth|.",
    units="those of the variable")
bias = _error_score("bias", lambda error: error)
bias.__doc__ = _SCORE_DOC.format(
    summary="Bias: time mean of the area-weighted mean of forecast - truth (positive: the "
            "forecast is too high).",
    units="those of the variable")


def rmse_sqrt_before_time_avg(forecast: Data, truth: Data, *, regions: Regions = None,
                              weighting: str = DEFAULT_WEIGHTING,
                              skipna: bool = False) -> xr.Dataset:
    """WB2 ``RMSESqrtBeforeTimeAvg``: the time mean of the per-init-time area-weighted RMSE.

    Same parameters and result as :func:`rmse`; by Jensen's inequality never above it.
    """
    forecast, truth = _pair(forecast, truth)
    averaging = _Averaging.of(truth, regions, weighting, skipna)
    per_time = np.sqrt(averaging.space((forecast - truth) ** 2))
    return _finish(averaging.time(per_time), truth, "rmse_sqrt_before_time_avg")


# --------------------------------------------------------------------------------------------
# climatology and ACC
# --------------------------------------------------------------------------------------------
def _positions(available: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
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
    return data[cv.TIME] + data[LEAD]


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
    slot = _positions(climatology[DAYOFYEAR].values, times.day_of_year.values, DAYOFYEAR)
    if HOUR in climatology.dims:
        hours = climatology[HOUR].values
        slot = slot * hours.size + _positions(hours, times.hour.values, HOUR)
        stacked = climatology.stack(_slot=(DAYOFYEAR, HOUR), create_index=False)
    else:
        stacked = climatology.rename({DAYOFYEAR: "_slot"})
    return gather(stacked, "_slot", slot.reshape(valid_time.shape),
                  valid_time[cv.TIME].values, valid_time[LEAD].values)


def climatology_for(climatology: xr.Dataset, truth: xr.Dataset) -> xr.Dataset:
    """The climatology on the truth's (time, lead, level) points."""
    if DAYOFYEAR not in climatology.dims:  # already at the valid times
        return climatology
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
    if cv.LEVEL in truth.dims and cv.LEVEL in climatology.dims:
        missing = np.setdiff1d(truth[cv.LEVEL].values, climatology[cv.LEVEL].values)
        if missing.size:
            raise DataError(f"the climatology has no level(s) {missing.tolist()}",
                            "compute the climatology from the same truth")
        climatology = climatology.sel({cv.LEVEL: truth[cv.LEVEL].values})
    climatology = _same_grid(climatology, truth, atol=1e-3)
    return climatology_at(climatology, _valid_times(truth))


def acc(forecast: Data, truth: Data, climatology: xr.Dataset, *, regions: Regions = None,
        weighting: str = DEFAULT_WEIGHTING, skipna: bool = False) -> xr.Dataset:
    """Anomaly correlation coefficient (WB2 ``ACC``).

    With anomalies f' = forecast - c and t' = truth - c from the climatology c at the valid
    time, per init time ACC_t = <f' t'> / sqrt(<f'^2> <t'^2>) (<.> the area-weighted mean,
    anomalies *not* re-centred), then the mean over init times.

    Parameters
    ----------
    climatology : (dayofyear, [hour], [level], latitude, longitude), or already at the valid
        times (time, prediction_timedelta, ...). Variables named as the truth's (or
        ``<name>_mean``).

    Other parameters and the result as :func:`rmse`; dimensionless, 1 for a perfect forecast.
    """
    forecast, truth = _pair(forecast, truth)
    clim = climatology_for(as_dataset(climatology), truth)
    averaging = _Averaging.of(truth, regions, weighting, skipna)
    forecast_anomaly, truth_anomaly = forecast - clim, truth - clim
    per_time = _ratio(averaging.space(forecast_anomaly * truth_anomaly), np.sqrt(
        averaging.space(forecast_anomaly ** 2) * averaging.space(truth_anomaly ** 2)))
    return _finish(averaging.time(per_time), truth, "acc")


# --------------------------------------------------------------------------------------------
# ensemble scores
# --------------------------------------------------------------------------------------------
def _ensemble_size(forecast: xr.Dataset, member_dim: str) -> int:
    if member_dim not in forecast.dims:
        raise DataError(f"the forecast has no ensemble dimension '{member_dim}' (dims "
                        f"{tuple(forecast.dims)})", "score a deterministic forecast with rmse")
    return int(forecast.sizes[member_dim])


def _sum_abs_pair_differences(values: np.ndarray) -> np.ndarray:
    """sum_{i,j} |x_i - x_j| over the last axis, in O(M log M): with x sorted ascending and
    i = 1..M, the sum equals 2 sum_i (2 i - M - 1) x_(i). NaN propagates."""
    members = values.shape[-1]
    coefficients = 2.0 * np.arange(1, members + 1) - members - 1.0
    return 2.0 * np.sum(np.sort(values, axis=-1) * coefficients, axis=-1)


def _mean_abs_pair_difference(forecast: xr.Dataset, member_dim: str) -> xr.Dataset:
    """(1 / (M (M - 1))) sum_{i,j} |X_i - X_j|: the unbiased estimate of E|X - X'| (0 when
    M = 1), WB2's ``CRPSSpread``."""
    members = _ensemble_size(forecast, member_dim)
    if members < 2:
        return xr.zeros_like(forecast.isel({member_dim: 0}, drop=True))
    total = xr.apply_ufunc(
        _sum_abs_pair_differences, forecast.chunk({member_dim: -1})
        if forecast.chunks else forecast,
        input_core_dims=[[member_dim]], dask="parallelized", output_dtypes=[np.float64])
    return total / (members * (members - 1))


def _ensemble_doc(function: Callable) -> Callable:
    function.__doc__ += """
    Parameters
    ----------
    forecast : (time, number, prediction_timedelta, [level], latitude, longitude).
    truth : aligned by valid time (see :func:`align`).
    regions, weighting, skipna : as for :func:`rmse`.
    member_dim : the ensemble dimension.

    Returns
    -------
    Dataset per variable, dims ([region,] prediction_timedelta, [level]), coordinate
    ``n_pairs``; attribute ``ensemble_size``.
    """
    return function


@_ensemble_doc
def crps(forecast: Data, truth: Data, *, regions: Regions = None,
         weighting: str = DEFAULT_WEIGHTING, skipna: bool = False,
         member_dim: str = cv.MEMBER) -> xr.Dataset:
    """Fair (ensemble-size-unbiased) continuous ranked probability score (WB2 ``CRPS``).

    Pointwise CRPS = (1/M) sum_i |X_i - y| - (1 / (2 M (M - 1))) sum_{i,j} |X_i - X_j|, the
    unbiased estimate of E|X - y| - E|X - X'| / 2 for M >= 2 members (for M = 1 it is the
    absolute error); then area-weighted mean per init time and time mean. Units of the
    variable; 0 only for a perfect deterministic forecast.
    """
    forecast, truth = _pair(forecast, truth)
    members = _ensemble_size(forecast, member_dim)
    averaging = _Averaging.of(truth, regions, weighting, skipna)
    skill = abs(forecast - truth).mean(member_dim, skipna=skipna)
    pointwise = skill - 0.5 * _mean_abs_pair_difference(forecast, member_dim)
    result = _finish(averaging.time(averaging.space(pointwise)), truth, "crps")
    return result.assign_attrs(ensemble_size=members)


def _ensemble_mean_mse(forecast: xr.Dataset, truth: xr.Dataset, averaging: _Averaging,
                       member_dim: str) -> xr.Dataset:
    mean = forecast.mean(member_dim, skipna=averaging.skipna)
    return averaging.time(averaging.space((mean - truth) ** 2))


def _ensemble_variance(forecast: xr.Dataset, averaging: _Averaging,
                       member_dim: str) -> xr.Dataset:
    if _ensemble_size(forecast, member_dim) < 2:
        variance = xr.zeros_like(forecast.isel({member_dim: 0}, drop=True))
    else:
        variance = forecast.var(member_dim, ddof=1, skipna=averaging.skipna)
    return averaging.time(averaging.space(variance))


@_ensemble_doc
def ensemble_mean_rmse(forecast: Data, truth: Data, *, regions: Regions = None,
                       weighting: str = DEFAULT_WEIGHTING, skipna: bool = False,
                       member_dim: str = cv.MEMBER) -> xr.Dataset:
    """RMSE of the ensemble mean: sqrt of the time mean of the area-weighted MSE of the member
    mean (WB2 ``EnsembleMeanMSE``, root after the time mean). Units of the variable."""
    forecast, truth = _pair(forecast, truth)
    members = _ensemble_size(forecast, member_dim)
    averaging = _Averaging.of(truth, regions, weighting, skipna)
    result = np.sqrt(_ensemble_mean_mse(forecast, truth, averaging, member_dim))
    return _finish(result, truth, "ensemble_mean_rmse").assign_attrs(ensemble_size=members)


@_ensemble_doc
def spread(forecast: Data, truth: Data | None = None, *, regions: Regions = None,
           weighting: str = DEFAULT_WEIGHTING, skipna: bool = False,
           member_dim: str = cv.MEMBER) -> xr.Dataset:
    """Ensemble spread: sqrt of the time mean of the area-weighted ensemble variance (unbiased,
    ddof = 1; 0 for one member), WB2 ``EnsembleVariance`` with the root after the time mean.
    ``truth`` is only used for its ``valid_pair`` mask and units. Units of the variable."""
    forecast = as_dataset(forecast)
    members = _ensemble_size(forecast, member_dim)
    truth = forecast.isel({member_dim: 0}, drop=True) if truth is None else truth
    forecast, truth = _pair(forecast, truth)
    averaging = _Averaging.of(truth, regions, weighting, skipna)
    result = np.sqrt(_ensemble_variance(forecast, averaging, member_dim))
    return _finish(result, truth, "spread").assign_attrs(ensemble_size=members)


@_ensemble_doc
def spread_skill_ratio(forecast: Data, truth: Data, *, regions: Regions = None,
                       weighting: str = DEFAULT_WEIGHTING, skipna: bool = False,
                       member_dim: str = cv.MEMBER,
                       finite_ensemble_correction: bool = False) -> xr.Dataset:
    """Spread-skill ratio :func:`spread` / :func:`ensemble_mean_rmse` (WB2's definition).

    For a statistically consistent ensemble of M members (members and truth exchangeable) its
    expectation is sqrt(M / (M + 1)), not 1, because the ensemble mean's error includes the
    sampling error of the mean; ``finite_ensemble_correction=True`` multiplies by
    sqrt((M + 1) / M) (Fortin et al. 2014) so that such an ensemble scores 1. Dimensionless.
    """
    forecast, truth = _pair(forecast, truth)
    averaging = _Averaging.of(truth, regions, weighting, skipna)
    members = _ensemble_size(forecast, member_dim)
    ratio = np.sqrt(_ratio(_ensemble_variance(forecast, averaging, member_dim),
                           _ensemble_mean_mse(forecast, truth, averaging, member_dim)))
    if finite_ensemble_correction:
        ratio = ratio * np.sqrt((members + 1) / members)
    return _finish(ratio, truth, "spread_skill_ratio").assign_attrs(
        ensemble_size=members, finite_ensemble_correction=int(finite_ensemble_correction))


# --------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------
def _uniform_longitude_spacing(longitude: np.ndarray) -> float:
    steps = np.mod(np.diff(np.asarray(longitude, dtype=np.float64)), 360.0)
    if steps.size == 0 or np.max(np.abs(steps - steps[0])) > 1e-3:
        raise DataError("the zonal spectrum needs uniformly spaced longitudes",
                        "regrid to a regular longitude spacing")
    return float(steps[0])


def _zonal_power(values: np.ndarray) -> np.ndarray:
    """|F_k|^2 with F = rfft(f) / L, doubled for k > 0 (negative frequencies), as WB2."""
    coefficients = np.fft.rfft(values, axis=-1, norm="forward")
    power = np.abs(coefficients) ** 2
    power[..., 1:] *= 2.0
    return power


def zonal_energy_spectrum(data: Data, average_dims: Sequence[str] | None = None) -> xr.Dataset:
    """Power spectrum along longitude on each latitude circle (WB2 ``ZonalEnergySpectrum``),
    averaged over init times and members.

    With f[l], l = 0..L-1, the values on one latitude row and F[k] = (1/L) sum_l f[l]
    exp(-2 pi i k l / L), the spectrum is S[0] = D |F[0]|^2 and S[k] = 2 D |F[k]|^2 for
    k = 1..L//2, where D = L * dx is the length (m) of the row: dx = R cos(lat) * dlon (in
    radians), R = 6 367 500 m (WB2's Earth radius). On a global grid D is the circumference of
    the latitude circle, k the zonal (planetary) wavenumber and, up to the Nyquist term that
    WB2 also doubles for even L, sum_k S[k] = dx sum_l f[l]^2 (Parseval). On a regional grid
    the row is treated as periodic with period D (k = cycles per row). Units: m times the
    variable's units squared (m^3 s^-2 for a wind).

    Parameters
    ----------
    data : any fields with ``latitude`` and ``longitude`` (uniform spacing), e.g. a forecast
        (time, [number], prediction_timedelta, [level], latitude, longitude) or aligned truth.
    average_dims : dims to average over; default ``time`` and ``number`` where present.

    Returns
    -------
    Dataset per variable with dims (..., latitude, zonal_wavenumber) and coordinates
    ``frequency`` (latitude, zonal_wavenumber; 1/m) and ``wavelength`` (m; inf for k = 0).
    """
    data = as_dataset(data)
    longitude = data[cv.LONGITUDE].values
    spacing = _uniform_longitude_spacing(longitude)
    n_lon = longitude.size
    dx = EARTH_RADIUS_M * np.cos(np.deg2rad(data[cv.LATITUDE])) * np.deg2rad(spacing)
    row_length = dx * n_lon
    spectrum = xr.apply_ufunc(
        _zonal_power, data.chunk({cv.LONGITUDE: -1}) if data.chunks else data,
        input_core_dims=[[cv.LONGITUDE]], output_core_dims=[[ZONAL_WAVENUMBER]],
        dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {ZONAL_WAVENUMBER: n_lon // 2 + 1}})
    spectrum = spectrum * row_length
    dims = [cv.TIME, cv.MEMBER] if average_dims is None else list(average_dims)
    spectrum = spectrum.mean([d for d in dims if d in spectrum.dims])
    wavenumber = np.arange(n_lon // 2 + 1)
    frequency = xr.DataArray(wavenumber, dims=ZONAL_WAVENUMBER) / row_length
    with np.errstate(divide="ignore"):
        wavelength = 1.0 / frequency
    spectrum = spectrum.assign_coords({
        ZONAL_WAVENUMBER: wavenumber,
        "frequency": frequency.assign_attrs(units="1 / m"),
        "wavelength": wavelength.assign_attrs(units="m")})
    for name in spectrum.data_vars:
        units = str(data[name].attrs.get("units", ""))
        spectrum[name].attrs = {"units": f"m ({units})2" if units else "m",
                                "metric": "zonal_energy_spectrum"}
    return spectrum


# --------------------------------------------------------------------------------------------
# alignment by valid time
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


def _pick(source: xr.Dataset, positions: np.ndarray) -> xr.Dataset:
    """``source`` at ``positions`` along ``_source`` (NaN for < 0) as a new ``time`` axis.

    Evenly spaced runs are taken as slices, so that dask takes views of the stored chunks
    rather than copies (which its scheduler would otherwise compute ahead and hold).
    """
    pieces = []
    for first, count, step in _runs(positions):
        if first < 0:
            blank = xr.full_like(source.isel(_source=[0]), np.nan)  # fields are floats
            pieces.append(blank.isel(_source=np.zeros(count, dtype=np.int64)))
        else:
            stop = first + (count - 1) * max(step, 1) + 1
            pieces.append(source.isel(_source=slice(first, stop, max(step, 1))))
    picked = pieces[0] if len(pieces) == 1 else xr.concat(
        pieces, dim="_source", coords="minimal", compat="override", join="override")
    return picked.rename({"_source": cv.TIME})


def gather(data: xr.Dataset, dim: str, index: np.ndarray, init_times: np.ndarray,
           leads: np.ndarray) -> xr.Dataset:
    """``data`` picked along ``dim`` at ``index[t, l]`` into (time, prediction_timedelta, ...).

    Lazy for dask-backed data (slices of ``data`` per lead where the positions are evenly
    spaced, so output chunks are views of its chunks); entries < 0 give NaN.
    """
    attached = [c for c in data.coords if dim in data[c].dims]
    source = data.drop_vars(attached).rename({dim: "_source"})
    index = np.asarray(index, dtype=np.int64)
    pieces = [_pick(source, index[:, j]) for j in range(len(leads))]
    stacked = xr.concat(pieces, dim=pd.Index(leads, name=LEAD), coords="minimal",
                        compat="override", join="override")
    stacked = stacked.assign_coords({cv.TIME: init_times})
    return stacked.transpose(cv.TIME, LEAD, ...)


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


def latitude_ascending(data: xr.Dataset) -> xr.Dataset:
    """Flip a descending latitude axis (lazily)."""
    lat = data[cv.LATITUDE].values
    if lat.size > 1 and lat[0] > lat[-1]:
        return data.isel({cv.LATITUDE: slice(None, None, -1)})
    return data


def _same_grid(data: xr.Dataset, truth: xr.Dataset, atol: float) -> xr.Dataset:
    """``data`` with the truth's latitude and longitude, refused if they differ by > atol."""
    for name in SPACE:
        mine, theirs = data[name].values, truth[name].values
        if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=atol):
            raise DataError(f"{name} ({mine.size} points, {mine[0]:g}..{mine[-1]:g}) is not "
                            f"the truth's ({theirs.size} points, {theirs[0]:g}.."
                            f"{theirs[-1]:g})",
                            "regrid the forecast (or climatology) and the truth to one grid")
    return data.assign_coords({name: truth[name].values for name in SPACE})


def _common_levels(forecast: xr.Dataset, truth: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    if cv.LEVEL not in forecast.dims or cv.LEVEL not in truth.dims:
        return forecast, truth
    levels = np.intersect1d(forecast[cv.LEVEL].values, truth[cv.LEVEL].values)
    if levels.size == 0:
        raise DataError(f"no level in common: forecast {forecast[cv.LEVEL].values.tolist()}, "
                        f"truth {truth[cv.LEVEL].values.tolist()}", "score common levels")
    return forecast.sel({cv.LEVEL: levels}), truth.sel({cv.LEVEL: levels})


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
    forecast, truth = _common_variables(forecast, truth)
    forecast = latitude_ascending(forecast).sortby(cv.TIME)
    truth = latitude_ascending(truth)
    forecast = _same_grid(forecast, truth, atol)
    forecast, truth = _common_levels(forecast, truth)
    valid_time = forecast[cv.TIME].values[:, None] + forecast[LEAD].values[None, :]
    positions = _truth_positions(truth[cv.TIME].values, valid_time)
    keep = (positions >= 0).any(axis=1)
    forecast, positions, valid_time = forecast.isel({cv.TIME: keep}), positions[keep], \
        valid_time[keep]
    if forecast.sizes[cv.TIME] == 0:
        raise DataError("no valid time of the forecast is in the truth",
                        "give the truth of the forecast's period")
    init_times, leads = forecast[cv.TIME].values, forecast[LEAD].values
    valid = xr.DataArray(positions >= 0, dims=(cv.TIME, LEAD),
                         coords={cv.TIME: init_times, LEAD: leads})
    valid_coord = xr.DataArray(valid_time, dims=(cv.TIME, LEAD))
    aligned = gather(truth, cv.TIME, positions, init_times, leads)
    aligned = aligned.assign_coords({VALID_TIME: valid_coord, VALID_PAIR: valid})
    for name in aligned.data_vars:
        aligned[name].attrs = dict(truth[name].attrs)
    forecast = forecast.assign_coords({VALID_TIME: valid_coord})
    n_missing = int((~valid).sum()) + int((~keep).sum()) * leads.size
    n_pairs = valid.sum(cv.TIME).rename(N_PAIRS)
    if n_missing:
        log.warning("%d (init, lead) pairs have no truth at their valid time and are not "
                    "scored; %d pairs are scored", n_missing, int(valid.sum()))
    else:
        log.info("%d (init, lead) pairs are scored", int(valid.sum()))
    return Aligned(forecast, aligned, n_pairs, n_missing)

"""Spatial and time means of pointwise quantities: the common part of every score.

How a score is computed (as WB2's ``Metric.compute``)
-----------------------------------------------------
1. a pointwise quantity (e.g. the squared error) at every grid point, init time and lead;
2. its area-weighted mean over latitude and longitude, separately for every init time
   (and region), see :func:`spatial_mean` and :mod:`weathermodel.evaluation.regions`;
3. the mean over the scored init times (unweighted), per lead (and level, region), leaving
   out the (init, lead) pairs without truth (the coordinate ``valid_pair``);
4. for root scores the square root is taken *after* the time mean (WB2's published RMSE).

Every function works on dask-backed inputs without loading them: pointwise quantities and
spatial means are computed chunk by chunk, and only the (time, lead, level, region) spatial
means are ever gathered. Results are lazy when the inputs are; call ``.compute()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from weathermodel import conventions
from weathermodel.evaluation.alignment import LEAD, N_PAIRS, SPACE, VALID_PAIR, Data
from weathermodel.evaluation.regions import REGION, Regions, area_weights


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
    weights : from :func:`~weathermodel.evaluation.regions.area_weights`; points of zero
        weight (outside a region) are ignored even when NaN.
    skipna : False (WB2 default): a NaN inside the region makes the mean NaN; True: NaN points
        are left out and the remaining weights renormalised.
    """
    if isinstance(field, xr.DataArray):
        return _weighted_mean(field, weights, skipna)
    return field.map(_weighted_mean, weights=weights, skipna=skipna)


def _time_mean(per_time: xr.Dataset, valid: xr.DataArray | None, skipna: bool) -> xr.Dataset:
    """Unweighted mean over init times of the scored (init, lead) pairs."""
    time = conventions.TIME
    if valid is None:
        result = per_time.mean(time, skipna=skipna)
        return result.assign_coords({N_PAIRS: per_time.sizes[time]})
    counts = valid.sum(time)
    if skipna:
        result = per_time.where(valid).mean(time, skipna=True)
    else:
        result = per_time.where(valid, 0.0).sum(time, skipna=False) / counts.where(
            counts > 0)
    return result.assign_coords({N_PAIRS: counts})


@dataclass(frozen=True)
class Averaging:
    """How spatial and time means are taken for one (forecast, truth) pair."""

    weights: xr.DataArray
    valid: xr.DataArray | None
    skipna: bool

    @classmethod
    def of(cls, truth: xr.Dataset, regions: Regions, weighting: str,
           skipna: bool) -> "Averaging":
        """Weights of the truth's grid (and regions); its ``valid_pair`` mask if any."""
        weights = area_weights(truth[conventions.LATITUDE].values,
                               truth[conventions.LONGITUDE].values, regions, weighting)
        valid = truth.coords[VALID_PAIR] if VALID_PAIR in truth.coords else None
        return cls(weights=weights, valid=valid, skipna=skipna)

    def space(self, field: xr.Dataset) -> xr.Dataset:
        """Area-weighted mean over latitude and longitude (per region)."""
        return spatial_mean(field, self.weights, self.skipna)

    def time(self, per_time: xr.Dataset) -> xr.Dataset:
        """Mean over the scored init times; coordinate ``n_pairs``."""
        return _time_mean(per_time, self.valid, self.skipna)


def ratio_or_nan(numerator: xr.Dataset, denominator: xr.Dataset) -> xr.Dataset:
    """numerator / denominator, NaN (without a warning) where the denominator is 0, e.g. the
    ACC of a forecast without anomalies (the climatology itself)."""
    return numerator / denominator.where(denominator != 0)


#: the power of the variable's units in each score's units (1 when not listed)
_UNIT_POWER = {"mse": 2, "acc": 0, "spread_skill_ratio": 0,
               "corrected_spread_skill_ratio": 0, "rank_histogram": 0}


def score_units(metric: str, units: str) -> str:
    """Units of ``metric`` of a variable in ``units``: squared for mse, "1" for acc, the
    spread-skill ratios and rank-histogram frequencies (``rank_histogram_<k>``), the
    variable's own otherwise."""
    power = _UNIT_POWER.get(metric.rstrip("0123456789").rstrip("_"), 1)
    if power == 0:
        return "1"
    return f"({units})2" if power == 2 and units else units


def finish_score(result: xr.Dataset, truth: xr.Dataset, metric: str) -> xr.Dataset:
    """Dims (region, lead, level, ...), units and the metric's name in the attributes."""
    order = [d for d in (REGION, LEAD, conventions.LEVEL) if d in result.dims]
    result = result.transpose(*order, ...)
    for name in result.data_vars:
        units = score_units(metric, str(truth[name].attrs.get("units", "")))
        result[name].attrs = {"units": units, "metric": metric}
    return result.assign_attrs(metric=metric)

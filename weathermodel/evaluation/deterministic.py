"""Deterministic scores in WeatherBench 2 (WB2) conventions: MSE, RMSE, MAE, bias, ACC.

Inputs are a forecast and its truth aligned by valid time
(:func:`weathermodel.evaluation.alignment.align`), in physical units; every score is in the
units of the variable (``mse``: its square, ``acc``: dimensionless). Each is the time mean
of the area-weighted spatial mean of a pointwise quantity
(:mod:`weathermodel.evaluation.averaging`); ``rmse`` = sqrt(time mean of the area-weighted
MSE) as in WB2's results, while :func:`rmse_sqrt_before_time_avg` is WB2's
``RMSESqrtBeforeTimeAvg`` (time mean of the per-init RMSE), which is always <= ``rmse``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import xarray as xr

from weathermodel.data.weights import DEFAULT_WEIGHTING
from weathermodel.evaluation.alignment import Data, aligned_pair, as_dataset, climatology_for
from weathermodel.evaluation.averaging import Averaging, finish_score, ratio_or_nan
from weathermodel.evaluation.regions import Regions


def _error_score(metric: str, pointwise: Callable[[xr.Dataset], xr.Dataset],
                 root: bool = False) -> Callable[..., xr.Dataset]:
    """A score = time mean of the spatial mean of ``pointwise(forecast - truth)``."""

    def score(forecast: Data, truth: Data, *, regions: Regions = None,
              weighting: str = DEFAULT_WEIGHTING, skipna: bool = False) -> xr.Dataset:
        forecast, truth = aligned_pair(forecast, truth)
        averaging = Averaging.of(truth, regions, weighting, skipna)
        result = averaging.time(averaging.space(pointwise(forecast - truth)))
        return finish_score(np.sqrt(result) if root else result, truth, metric)

    score.__name__ = score.__qualname__ = metric
    return score


_SCORE_DOC = """{summary}

    Parameters
    ----------
    forecast : (time, [number], prediction_timedelta, [level], latitude, longitude); an
        ensemble dimension, if any, is kept in the result.
    truth : aligned by valid time (see :func:`weathermodel.evaluation.alignment.align`).
    regions : None (the whole grid, no ``region`` dim), names of
        :data:`weathermodel.evaluation.regions.REGIONS`, or a mapping name -> box(es).
    weighting : area weights, see :func:`weathermodel.data.weights.latitude_weights`
        (default ``"auto"``: ``"wb2_edges"`` on grids reaching the poles, else ``"edges"``).
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
    forecast, truth = aligned_pair(forecast, truth)
    averaging = Averaging.of(truth, regions, weighting, skipna)
    per_time = np.sqrt(averaging.space((forecast - truth) ** 2))
    return finish_score(averaging.time(per_time), truth, "rmse_sqrt_before_time_avg")


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
    forecast, truth = aligned_pair(forecast, truth)
    clim = climatology_for(as_dataset(climatology), truth)
    averaging = Averaging.of(truth, regions, weighting, skipna)
    forecast_anomaly, truth_anomaly = forecast - clim, truth - clim
    per_time = ratio_or_nan(averaging.space(forecast_anomaly * truth_anomaly), np.sqrt(
        averaging.space(forecast_anomaly ** 2) * averaging.space(truth_anomaly ** 2)))
    return finish_score(averaging.time(per_time), truth, "acc")


#: the deterministic scores by name, as ``evaluate`` computes them for every system
DETERMINISTIC_SCORES: dict[str, Callable[..., xr.Dataset]] = {
    "mse": mse, "rmse": rmse, "rmse_sqrt_before_time_avg": rmse_sqrt_before_time_avg,
    "mae": mae, "bias": bias}

"""Ensemble scores in WeatherBench 2 (WB2) conventions: fair CRPS, ensemble-mean RMSE, spread,
spread-skill ratio (with and without the finite-ensemble correction) and rank histograms.

Inputs are an ensemble forecast (dims ``time``, ``number``, ``prediction_timedelta``,
[``level``], ``latitude``, ``longitude``) and its truth aligned by valid time
(:func:`weathermodel.evaluation.alignment.align`). Pointwise quantities are averaged over
space (area-weighted, per region) and over the scored init times as every other score
(:mod:`weathermodel.evaluation.averaging`); root scores take the root after the time mean.

Definitions (M members X_1..X_M, truth y; <.> the area-weighted spatial mean, overline the
mean over init times)
------------------------------------------------------------------------------------------
* ``crps``: overline <(1/M) sum_i |X_i - y| - (1/(2 M (M-1))) sum_ij |X_i - X_j|> (WB2
  ``CRPS`` = ``CRPSSkill`` - 0.5 ``CRPSSpread``, the fair estimate).
* ``ensemble_mean_rmse`` (the *skill*): sqrt(overline <(mean_i X_i - y)^2>) (WB2
  ``EnsembleMeanMSE``, root after the time mean).
* ``spread``: sqrt(overline <var_i X_i>), the unbiased (ddof = 1) member variance (WB2
  ``EnsembleVariance``, root after the time mean; WB2's ``ensemble_stddev``).
* ``spread_skill_ratio``: spread / skill, as WB2's ``visualization.compute_spread_skill_ratio``
  divides them (no finite-size factor). For M members exchangeable with the truth its
  expectation is sqrt(M / (M + 1)), not 1.
* ``corrected_spread`` = sqrt((M + 1) / M) spread and ``corrected_spread_skill_ratio`` =
  corrected spread / skill: the finite-ensemble correction of Fortin et al. (2014, QJRMS 140)
  used by GenCast and AIFS-ENS, so that a calibrated ensemble of any size scores 1. The
  spread-skill *curve* is ``corrected_spread`` and ``ensemble_mean_rmse`` against lead time.
* ``rank_histogram``: per verifying point, the rank of the truth among the members (the number
  of members below it; when it equals e members, one of the e + 1 ranks drawn at random with
  a fixed seed, the standard tie-break; WB2 ``RankHistogram`` breaks ties by random
  perturbations to the same effect), one-hot over the M + 1 bins, then area-weighted spatial
  and time means: the frequency of each rank (the bins sum to 1). Flat for a calibrated
  ensemble, U-shaped for an under-dispersive one, a dome for an over-dispersive one.
"""
from __future__ import annotations

import functools
import zlib
from typing import Callable

import numpy as np
import xarray as xr

from weathermodel import conventions
from weathermodel.data.weights import DEFAULT_WEIGHTING
from weathermodel.errors import DataError
from weathermodel.evaluation.alignment import Data, aligned_pair, as_dataset
from weathermodel.evaluation.averaging import Averaging, finish_score, ratio_or_nan
from weathermodel.evaluation.layout import RANK
from weathermodel.evaluation.regions import Regions

#: the default seed of the random tie-break of rank histograms
RANK_SEED = 0


def ensemble_size(forecast: xr.Dataset, member_dim: str = conventions.MEMBER) -> int:
    """The number of members, refused with a fix when there is no ensemble dimension."""
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
    members = ensemble_size(forecast, member_dim)
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
    truth : aligned by valid time (see :func:`weathermodel.evaluation.alignment.align`).
    regions, weighting, skipna : as for :func:`weathermodel.evaluation.deterministic.rmse`.
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
         member_dim: str = conventions.MEMBER) -> xr.Dataset:
    """Fair (ensemble-size-unbiased) continuous ranked probability score (WB2 ``CRPS``).

    Pointwise CRPS = (1/M) sum_i |X_i - y| - (1 / (2 M (M - 1))) sum_{i,j} |X_i - X_j|, the
    unbiased estimate of E|X - y| - E|X - X'| / 2 for M >= 2 members (for M = 1 it is the
    absolute error); then area-weighted mean per init time and time mean. Units of the
    variable; 0 only for a perfect deterministic forecast.
    """
    forecast, truth = aligned_pair(forecast, truth)
    members = ensemble_size(forecast, member_dim)
    averaging = Averaging.of(truth, regions, weighting, skipna)
    skill = abs(forecast - truth).mean(member_dim, skipna=skipna)
    pointwise = skill - 0.5 * _mean_abs_pair_difference(forecast, member_dim)
    result = finish_score(averaging.time(averaging.space(pointwise)), truth, "crps")
    return result.assign_attrs(ensemble_size=members)


def _ensemble_mean_mse(forecast: xr.Dataset, truth: xr.Dataset, averaging: Averaging,
                       member_dim: str) -> xr.Dataset:
    mean = forecast.mean(member_dim, skipna=averaging.skipna)
    return averaging.time(averaging.space((mean - truth) ** 2))


def _ensemble_variance(forecast: xr.Dataset, averaging: Averaging,
                       member_dim: str) -> xr.Dataset:
    if ensemble_size(forecast, member_dim) < 2:
        variance = xr.zeros_like(forecast.isel({member_dim: 0}, drop=True))
    else:
        variance = forecast.var(member_dim, ddof=1, skipna=averaging.skipna)
    return averaging.time(averaging.space(variance))


def _finite_ensemble_factor(members: int) -> float:
    """sqrt((M + 1) / M) (Fortin et al. 2014): the spread of a calibrated M-member ensemble
    times this factor equals, in expectation, the RMSE of its mean."""
    return float(np.sqrt((members + 1) / members))


@_ensemble_doc
def ensemble_mean_rmse(forecast: Data, truth: Data, *, regions: Regions = None,
                       weighting: str = DEFAULT_WEIGHTING, skipna: bool = False,
                       member_dim: str = conventions.MEMBER) -> xr.Dataset:
    """RMSE of the ensemble mean: sqrt of the time mean of the area-weighted MSE of the member
    mean (WB2 ``EnsembleMeanMSE``, root after the time mean), the *skill* of the spread-skill
    relation. Units of the variable."""
    forecast, truth = aligned_pair(forecast, truth)
    members = ensemble_size(forecast, member_dim)
    averaging = Averaging.of(truth, regions, weighting, skipna)
    result = np.sqrt(_ensemble_mean_mse(forecast, truth, averaging, member_dim))
    return finish_score(result, truth, "ensemble_mean_rmse").assign_attrs(
        ensemble_size=members)


@_ensemble_doc
def spread(forecast: Data, truth: Data | None = None, *, regions: Regions = None,
           weighting: str = DEFAULT_WEIGHTING, skipna: bool = False,
           member_dim: str = conventions.MEMBER,
           finite_ensemble_correction: bool = False) -> xr.Dataset:
    """Ensemble spread: sqrt of the time mean of the area-weighted ensemble variance (unbiased,
    ddof = 1; 0 for one member), WB2 ``EnsembleVariance`` with the root after the time mean.
    ``finite_ensemble_correction=True`` multiplies it by sqrt((M + 1) / M) (Fortin et al.
    2014; metric ``corrected_spread``), the spread to compare with the ensemble-mean RMSE in
    a spread-skill curve. ``truth`` is only used for its ``valid_pair`` mask and units. Units
    of the variable."""
    forecast = as_dataset(forecast)
    members = ensemble_size(forecast, member_dim)
    truth = forecast.isel({member_dim: 0}, drop=True) if truth is None else truth
    forecast, truth = aligned_pair(forecast, truth)
    averaging = Averaging.of(truth, regions, weighting, skipna)
    result = np.sqrt(_ensemble_variance(forecast, averaging, member_dim))
    metric = "spread"
    if finite_ensemble_correction:
        result, metric = result * _finite_ensemble_factor(members), "corrected_spread"
    return finish_score(result, truth, metric).assign_attrs(ensemble_size=members)


@_ensemble_doc
def spread_skill_ratio(forecast: Data, truth: Data, *, regions: Regions = None,
                       weighting: str = DEFAULT_WEIGHTING, skipna: bool = False,
                       member_dim: str = conventions.MEMBER,
                       finite_ensemble_correction: bool = False) -> xr.Dataset:
    """Spread-skill ratio :func:`spread` / :func:`ensemble_mean_rmse` (WB2's definition).

    For a statistically consistent ensemble of M members (members and truth exchangeable) its
    expectation is sqrt(M / (M + 1)), not 1, because the ensemble mean's error includes the
    sampling error of the mean; ``finite_ensemble_correction=True`` multiplies by
    sqrt((M + 1) / M) (Fortin et al. 2014; metric ``corrected_spread_skill_ratio``) so that
    such an ensemble scores 1. Dimensionless.
    """
    forecast, truth = aligned_pair(forecast, truth)
    averaging = Averaging.of(truth, regions, weighting, skipna)
    members = ensemble_size(forecast, member_dim)
    ratio = np.sqrt(ratio_or_nan(_ensemble_variance(forecast, averaging, member_dim),
                                 _ensemble_mean_mse(forecast, truth, averaging, member_dim)))
    metric = "spread_skill_ratio"
    if finite_ensemble_correction:
        ratio, metric = ratio * _finite_ensemble_factor(members), "corrected_spread_skill_ratio"
    return finish_score(ratio, truth, metric).assign_attrs(
        ensemble_size=members, finite_ensemble_correction=int(finite_ensemble_correction))


def _rank_one_hot(members: np.ndarray, truth: np.ndarray, seed: int) -> np.ndarray:
    """members (..., M), truth (...) -> (..., M + 1): 1 in the bin of the truth's rank (the
    number of members below it, ties drawn at random among the tied ranks), NaN where the
    truth or a member is NaN.

    The random draws are seeded by ``seed`` and the bytes of the chunk, so a chunk gets the
    same ranks whatever the order dask computes it in, and chunks of equal truths do not
    repeat one sequence."""
    truth = np.asarray(truth, dtype=np.float64)
    members = np.asarray(members, dtype=np.float64)
    size = members.shape[-1]
    below = np.sum(members < truth[..., None], axis=-1)
    ties = np.sum(members == truth[..., None], axis=-1)
    entropy = zlib.crc32(np.ascontiguousarray(truth).tobytes())
    draw = np.random.default_rng([seed, entropy]).random(truth.shape)
    rank = below + np.floor(draw * (ties + 1)).astype(np.int64)
    one_hot = (rank[..., None] == np.arange(size + 1)).astype(np.float64)
    one_hot[np.isnan(truth) | np.isnan(members).any(axis=-1)] = np.nan
    return one_hot


def rank_histogram(forecast: Data, truth: Data, *, regions: Regions = None,
                   weighting: str = DEFAULT_WEIGHTING, skipna: bool = False,
                   member_dim: str = conventions.MEMBER, seed: int = RANK_SEED) -> xr.Dataset:
    """Rank histogram (Talagrand diagram) of the truth among the members (WB2
    ``RankHistogram``, its one-hot ranks averaged over space and time).

    At every verifying point the rank r = #{i: X_i < y} in 0..M, a truth equal to e members
    getting one of the ranks r..r + e at random (``seed``, as is standard); the one-hot ranks
    are averaged with the area weights per init time and then over the scored init times, so
    each bin holds the area-weighted frequency of its rank and the M + 1 bins sum to 1. A
    point where the truth or a member is missing counts as missing (``skipna`` as for every
    score).

    Parameters as :func:`crps`, and ``seed`` that of the random tie-break. Returns a Dataset
    per variable with dims ([region,] prediction_timedelta, [level], rank), ``rank`` 0..M:
    frequencies (units ``1``), expected 1 / (M + 1) in every bin for a calibrated ensemble;
    coordinate ``n_pairs``, attribute ``ensemble_size``.
    """
    forecast, truth = aligned_pair(forecast, truth)
    members = ensemble_size(forecast, member_dim)
    averaging = Averaging.of(truth, regions, weighting, skipna)
    one_hot = xr.apply_ufunc(
        _rank_one_hot, forecast.chunk({member_dim: -1}) if forecast.chunks else forecast,
        truth, input_core_dims=[[member_dim], []], output_core_dims=[[RANK]],
        dask="parallelized", output_dtypes=[np.float64], kwargs={"seed": seed},
        dask_gufunc_kwargs={"output_sizes": {RANK: members + 1}})
    one_hot = one_hot.assign_coords({RANK: np.arange(members + 1)})
    result = finish_score(averaging.time(averaging.space(one_hot)), truth, "rank_histogram")
    return result.assign_attrs(ensemble_size=members)


#: the ensemble scores by name, as ``evaluate`` computes them for every ensemble system
#: (the rank histogram, which has a ``rank`` dimension, is not among them)
ENSEMBLE_SCORES: dict[str, Callable[..., xr.Dataset]] = {
    "crps": crps, "ensemble_mean_rmse": ensemble_mean_rmse, "spread": spread,
    "spread_skill_ratio": spread_skill_ratio,
    "corrected_spread": functools.partial(spread, finite_ensemble_correction=True),
    "corrected_spread_skill_ratio": functools.partial(spread_skill_ratio,
                                                      finite_ensemble_correction=True)}

"""Evaluation: WeatherBench 2 scores of forecast stores and baselines against a truth.

* :mod:`~weathermodel.evaluation.alignment`: forecasts paired with the truth (and a
  climatology) by valid time.
* :mod:`~weathermodel.evaluation.regions`: WB2's regions and the area weights of every grid
  point (latitude weights from :mod:`weathermodel.data.weights`).
* :mod:`~weathermodel.evaluation.averaging`: area-weighted spatial means per region and time
  means over the scored pairs, shared by every score.
* :mod:`~weathermodel.evaluation.deterministic`: RMSE, MSE, MAE, bias, ACC.
* :mod:`~weathermodel.evaluation.ensemble`: fair CRPS, ensemble-mean RMSE, spread, spread-skill
  ratio (with and without the finite-ensemble correction), rank histograms.
* :mod:`~weathermodel.evaluation.spectra`: zonal energy spectra.
* :mod:`~weathermodel.evaluation.baselines`: persistence and climatology forecasts in the
  forecast-store schema, and the day-of-year x hour climatology.
* :mod:`~weathermodel.evaluation.layout`: the layout of score and spectra datasets.
* :mod:`~weathermodel.evaluation.evaluate`: opening stores, scoring several systems at once
  (lazily, optionally on a dask cluster), writing and printing the scores, energy spectra.
* :mod:`~weathermodel.evaluation.plots`: lead-time curves, scorecards, spread-skill curves,
  rank histograms, spectra, maps with the shipped coastlines (matplotlib and cartopy are
  imported only when a plot is made). Its entry point ``evaluate`` is not re-exported here, so
  that ``weathermodel.evaluation.evaluate`` stays the module:
  ``from weathermodel.evaluation.evaluate import evaluate``.
"""
from weathermodel.data.weights import latitude_weights, resolve_weighting
from weathermodel.evaluation.alignment import Aligned, align
from weathermodel.evaluation.averaging import spatial_mean
from weathermodel.evaluation.baselines import (climatology_forecast, compute_climatology,
                                               persistence_forecast)
from weathermodel.evaluation.deterministic import (acc, bias, mae, mse, rmse,
                                                   rmse_sqrt_before_time_avg)
from weathermodel.evaluation.ensemble import (crps, ensemble_mean_rmse, rank_histogram, spread,
                                              spread_skill_ratio)
from weathermodel.evaluation.evaluate import (make_climatology, open_forecast, score_system,
                                              score_table, truth_dataset)
from weathermodel.evaluation.regions import REGIONS, area_weights, region_mask
from weathermodel.evaluation.spectra import zonal_energy_spectrum

__all__ = [
    "REGIONS", "Aligned", "acc", "align", "area_weights", "bias", "climatology_forecast",
    "compute_climatology", "crps", "ensemble_mean_rmse", "latitude_weights", "mae",
    "make_climatology", "mse", "open_forecast", "persistence_forecast", "rank_histogram",
    "region_mask", "resolve_weighting", "rmse", "rmse_sqrt_before_time_avg", "score_system",
    "score_table", "spatial_mean", "spread", "spread_skill_ratio", "truth_dataset",
    "zonal_energy_spectrum",
]

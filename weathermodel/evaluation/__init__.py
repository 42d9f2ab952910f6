"""Evaluation: WeatherBench 2 scores of forecast stores and baselines against a truth.

* :mod:`~weathermodel.evaluation.metrics`: area-weighted scores (RMSE, MSE, MAE, bias, ACC,
  fair CRPS, ensemble-mean RMSE, spread, spread-skill ratio, zonal spectra), regions, and
  alignment of forecasts with the truth by valid time.
* :mod:`~weathermodel.evaluation.baselines`: persistence and climatology forecasts in the
  forecast-store schema, and the day-of-year x hour climatology.
* :mod:`~weathermodel.evaluation.evaluate`: opening stores, scoring several systems at once
  (lazily, optionally on a dask cluster), writing and printing the scores, energy spectra.
* :mod:`~weathermodel.evaluation.plots`: lead-time curves, scorecards, spectra, maps with the
  shipped coastlines (matplotlib and cartopy are imported only when a plot is made). Its entry point
  ``evaluate`` is not re-exported here, so that ``weathermodel.evaluation.evaluate`` stays the
  module: ``from weathermodel.evaluation.evaluate import evaluate``.
"""
from weathermodel.evaluation.baselines import (climatology_forecast, compute_climatology,
                                               persistence_forecast)
from weathermodel.evaluation.evaluate import (make_climatology, open_forecast, score_system,
                                              score_table, truth_dataset)
from weathermodel.evaluation.metrics import (REGIONS, Aligned, acc, align, area_weights, bias,
                                             crps, ensemble_mean_rmse, latitude_weights, mae,
                                             mse, region_mask, resolve_weighting, rmse,
                                             rmse_sqrt_before_time_avg, spatial_mean, spread, spread_skill_ratio,
                                             zonal_energy_spectrum)

__all__ = [
    "REGIONS", "Aligned", "acc", "align", "area_weights", "bias", "climatology_forecast",
    "compute_climatology", "crps", "ensemble_mean_rmse", "latitude_weights", "mae",
    "make_climatology", "mse", "open_forecast", "persistence_forecast", "region_mask", "resolve_weighting", "rmse",
    "rmse_sqrt_before_time_avg", "score_system", "score_table", "spatial_mean", "spread",
    "spread_skill_ratio", "truth_dataset", "zonal_energy_spectrum",
]

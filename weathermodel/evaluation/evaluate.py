"""``weathermodel evaluate``: forecast stores and baselines scored against a truth, WB2-style.

The whole evaluation is one lazy dask graph per call: forecasts, truth and climatology are
opened lazily, every score is reduced chunk by chunk (one init time and lead at a time for
``weathermodel forecast`` stores), and only the spatial means are gathered, so memory stays
bounded whatever the size of the forecasts. Pass ``scheduler`` (a ``dask.distributed``
scheduler address) to run it on a cluster.

Result layout (as WB2's evaluation output, plus a ``system`` dimension)::

    <xarray.Dataset>
    Dimensions: (system, metric, [region,] prediction_timedelta, [level])
    Coordinates: system, metric, [region,] prediction_timedelta, [level],
                 n_pairs (system, prediction_timedelta)   init times scored per lead
    Data variables: one per weather variable, in its units (mse: squared; acc,
                    spread-skill ratios, rank-histogram frequencies: 1)

Zonal energy spectra of the forecasts and the truth (:func:`energy_spectra`) and the plots
of :mod:`weathermodel.evaluation.plots` (:func:`plot_evaluation`) come from the same stores.

Metrics: every system gets ``mse``, ``rmse``, ``rmse_sqrt_before_time_avg``, ``mae``,
``bias`` and, given a climatology, ``acc`` (for an ensemble: of the ensemble mean); ensembles
(a ``number`` dimension) also ``crps``, ``ensemble_mean_rmse``, ``spread``,
``spread_skill_ratio``, ``corrected_spread``, ``corrected_spread_skill_ratio`` (definitions in
:mod:`weathermodel.evaluation.ensemble`) and their rank histogram, one metric per bin
``rank_histogram_00`` .. ``rank_histogram_<M>`` (see :mod:`weathermodel.evaluation.layout`;
:func:`score_table` prints them for ``metrics`` holding ``"rank_histogram"``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import dask
import numpy as np
import pandas as pd
import xarray as xr

from weathermodel import conventions
from weathermodel.data.weights import DEFAULT_WEIGHTING, resolve_weighting
from weathermodel.errors import ConfigError, DataError, OutputError
from weathermodel.evaluation.alignment import (DAYOFYEAR, HOUR, LEAD, N_PAIRS, SPACE, VALID_PAIR,
                                               align, climatology_for, latitude_ascending)
from weathermodel.evaluation.baselines import (climatology_forecast, compute_climatology,
                                               persistence_forecast)
from weathermodel.evaluation.deterministic import DETERMINISTIC_SCORES, acc
from weathermodel.evaluation.ensemble import ENSEMBLE_SCORES, RANK, rank_histogram
from weathermodel.evaluation.layout import (METRIC, RANK_HISTOGRAM, SYSTEM, TRUTH_SYSTEM,
                                            rank_histogram_metric, rank_histograms)
from weathermodel.evaluation.plots import write_evaluation_plots
from weathermodel.evaluation.regions import REGION, Regions
from weathermodel.evaluation.spectra import ZONAL_WAVENUMBER, zonal_energy_spectrum

log = logging.getLogger(__name__)

BASELINES = ("persistence", "climatology")
DETERMINISTIC_METRICS = tuple(DETERMINISTIC_SCORES)
ENSEMBLE_METRICS = tuple(ENSEMBLE_SCORES)
_RENAMES = {"init_time": conventions.TIME, "lead_time": LEAD, "realization": conventions.MEMBER,
            "lat": conventions.LATITUDE, "lon": conventions.LONGITUDE}


# --------------------------------------------------------------------------------------------
# opening
# --------------------------------------------------------------------------------------------
def _is_netcdf(path: str | Path) -> bool:
    return str(path).lower().endswith((".nc", ".nc4", ".netcdf"))


def _open_zarr(path: str) -> xr.Dataset:
    """Consolidated metadata when the store has it (WB2 stores), else plain."""
    try:
        return xr.open_zarr(path, consolidated=True, chunks={})
    except (KeyError, FileNotFoundError, ValueError):
        return xr.open_zarr(path, consolidated=False, chunks={})


def _open_any(path: str | Path, chunk_dims: Sequence[str] = ()) -> xr.Dataset:
    """A zarr (in its stored chunks) or netCDF dataset (one chunk per index along
    ``chunk_dims``, whole along the others), lazily."""
    if not Path(path).exists() and "://" not in str(path):
        raise DataError("does not exist", "give the path of an existing store or file",
                        path=str(path))
    try:
        if not _is_netcdf(path):
            return _open_zarr(str(path))
        dataset = xr.open_dataset(str(path))
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"cannot be opened as zarr or netCDF ({error}); it may be truncated "
                        "or corrupt", "write it again (e.g. run the same forecast command "
                        "again), or give a zarr store or a netCDF file", path=str(path)) \
            from error
    return dataset.chunk({d: (1 if d in chunk_dims else -1) for d in dataset.dims})


def open_forecast(path: str | Path) -> xr.Dataset:
    """A forecast store (``weathermodel forecast`` or any WB2-style zarr/netCDF), lazily.

    WB2's older names (``init_time``, ``lead_time``, ``realization``) are renamed; latitude
    made ascending; a size-1 ``number`` dimension squeezed out. netCDF files are chunked one
    (init time, member, lead) per chunk, zarr stores keep their own chunks.
    """
    forecast = _open_any(path, chunk_dims=(conventions.TIME, conventions.MEMBER, LEAD,
                                           "init_time", "lead_time", "realization"))
    forecast = forecast.rename({k: v for k, v in _RENAMES.items() if k in forecast.dims})
    for dim in (conventions.TIME, LEAD, conventions.LATITUDE, conventions.LONGITUDE):
        if dim not in forecast.dims:
            raise DataError(f"the forecast has no '{dim}' dimension (dims "
                            f"{tuple(forecast.dims)})", "give a forecast store in the "
                            "WeatherBench 2 layout (time, prediction_timedelta, ...)",
                            path=str(path))
    provenance = forecast.attrs.get("weathermodel_forecast")
    if isinstance(provenance, dict) and provenance.get("complete") is False:
        raise DataError("the forecast store is incomplete (the forecast was interrupted)",
                        "run the same 'weathermodel forecast' command again to finish it",
                        path=str(path))
    if conventions.MEMBER in forecast.dims and forecast.sizes[conventions.MEMBER] == 1:
        forecast = forecast.squeeze(conventions.MEMBER, drop=True)
    forecast = forecast.drop_vars([v for v in forecast.data_vars
                                   if not set(SPACE) <= set(forecast[v].dims)])
    return latitude_ascending(forecast)


def _truth_from_store(path: str, metadata: dict) -> xr.Dataset:
    from weathermodel.data.store import open_store

    state = open_store(path)["state"]
    if state.sizes[conventions.MEMBER] > 1:
        log.info("%s: truth has %d members; member 0 is used", path,
                 state.sizes[conventions.MEMBER])
    state = state.isel({conventions.MEMBER: 0}, drop=True)
    variables = np.array([str(v) for v in state["channel_variable"].values])
    levels = state["channel_level"].values.astype(np.float64)
    units = {v["name"]: v.get("units", "") for v in metadata.get("variables", [])}
    plain = state.drop_vars([c for c in state.coords if conventions.CHANNEL in state[c].dims])
    arrays = {}
    for name in dict.fromkeys(variables):
        channels = np.flatnonzero(variables == name)
        if np.isnan(levels[channels]).all():
            array = plain.isel({conventions.CHANNEL: channels[0]})
        else:
            channels = channels[np.argsort(levels[channels])]
            array = plain.isel({conventions.CHANNEL: channels}).rename(
                {conventions.CHANNEL: conventions.LEVEL})
            array = array.assign_coords({conventions.LEVEL: levels[channels]})
        arrays[name] = array.assign_attrs(units=units.get(name, ""))
    return xr.Dataset(arrays)


def _truth_from_source(path: str) -> xr.Dataset:
    from weathermodel.data.config import SourceSpec
    from weathermodel.data.normalize import to_canonical
    from weathermodel.data.sources import open_path

    source = to_canonical(open_path(path), SourceSpec(path=path), path)
    arrays = {}
    for name, array in source.variables.items():
        info = conventions.VARIABLES[name]
        if info.kind == "static":
            continue
        arrays[name] = array.isel({conventions.MEMBER: 0}, drop=True).assign_attrs(units=info.units)
    if not arrays:
        raise DataError("no time-dependent canonical variable found",
                        "give a training store or a dataset in canonical names", path=path)
    return xr.Dataset(arrays)


def truth_dataset(path: str | Path) -> xr.Dataset:
    """The verifying truth as one lazy array per variable, dims (time, [level], latitude,
    longitude), latitude ascending, canonical units (attribute ``units``).

    Parameters
    ----------
    path : a training store (``weathermodel prepare``; its ``state`` channels are split back
        into variables, levels sorted ascending, member 0 of an ensemble store) or any dataset
        that ``prepare`` can read: canonical names (e.g. a WB2 ERA5 zarr) or raw files with
        known names and units, converted as ``prepare`` converts them. Static fields are
        dropped.
    """
    from weathermodel.data.store import read_metadata

    path = str(path)
    if "://" not in path and not Path(path).exists():
        raise DataError("does not exist", "give the path of a training store or dataset",
                        path=path)
    metadata = read_metadata(path) if Path(path).is_dir() else None
    truth = _truth_from_store(path, metadata) if metadata else _truth_from_source(path)
    order = [d for d in (conventions.TIME, conventions.LEVEL, conventions.LATITUDE,
                         conventions.LONGITUDE) if d in truth.dims]
    return latitude_ascending(truth.transpose(*order))


def open_climatology(path: str | Path) -> xr.Dataset:
    """A climatology (dayofyear, [hour], [level], latitude, longitude), lazily, lat ascending."""
    climatology = _open_any(path, chunk_dims=(DAYOFYEAR,))
    if DAYOFYEAR not in climatology.dims:
        raise DataError(f"not a climatology: no 'dayofyear' dimension (dims "
                        f"{tuple(climatology.dims)})", "make one with 'weathermodel "
                        "climatology'", path=str(path))
    return latitude_ascending(climatology)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def save_dataset(dataset: xr.Dataset, path: str | Path) -> Path:
    """Write to netCDF (``.nc``) or zarr v3 (anything else), replacing what is there.

    The new output is written beside the old one and renamed over it once complete, so a
    failed write (disk full, interrupted) leaves a previous output at ``path`` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(temporary)
    try:
        if _is_netcdf(path):
            try:
                dataset.to_netcdf(temporary)
            except RuntimeError as error:  # the HDF5 library names no cause ("HDF error")
                raise OutputError(f"cannot write the netCDF file ({error})", "check the free "
                                  "space and the file-size limit, or choose another --out; a "
                                  "previous file at that path is intact", path=str(path)) \
                    from error
        else:
            # variable-length strings: zarr v3 has no specification for numpy's fixed-width ones
            strings = {name: dataset[name].astype(object) for name in dataset.coords
                       if dataset[name].dtype.kind == "U"}
            dataset.assign_coords(strings).to_zarr(temporary, mode="w", zarr_format=3,
                                                   consolidated=False)
        if path.is_dir() and not path.is_symlink():  # a folder cannot be renamed over
            retired = path.with_name(f".{path.name}.old{os.getpid()}")
            path.rename(retired)
            temporary.rename(path)
            _remove(retired)
        else:
            os.replace(temporary, path)
    finally:
        _remove(temporary)
    return path


def named_forecasts(items: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` items (command line) as {name: path}; a bare path is named
    after its file (``runs/graph.zarr`` -> ``graph``).

    Raises
    ------
    ConfigError : two forecasts with the same name, or a name of a baseline.
    """
    named: dict[str, str] = {}
    for item in items:
        name, path = item.split("=", 1) if "=" in item else (
            Path(item.rstrip("/")).name.split(".")[0], item)
        if name in named or name in BASELINES:
            raise ConfigError(f"forecast name '{name}' is used twice or is a baseline's",
                              "name the forecasts NAME=PATH with distinct names")
        named[name] = path
    return named


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def _stack(results: Mapping[str, xr.Dataset], dim: str) -> xr.Dataset:
    names = list(results)
    stacked = xr.concat([results[n] for n in names], dim=dim, coords="different",
                        compat="equals", join="outer", combine_attrs="drop")
    return stacked.assign_coords({dim: np.array(names)})


def _fewer_chunks(data: xr.Dataset, target_bytes: float = 32e6) -> xr.Dataset:
    """Merge the (init, lead) chunks of a forecast-store layout into chunks of all leads and
    as many init times as fit in ``target_bytes``: forecast stores hold one small chunk per
    (init, lead), and the scheduling cost of tiny chunks, not the arithmetic, would dominate."""
    if not data.chunks or conventions.TIME not in data.dims:
        return data
    per_init = sum(var.dtype.itemsize * var.size / var.sizes[conventions.TIME]
                   for var in data.data_vars.values() if conventions.TIME in var.dims)
    inits = int(max(1, min(data.sizes[conventions.TIME], target_bytes // max(per_init, 1))))
    chunks = {conventions.TIME: inits, **{dim: -1 for dim in data.dims if dim != conventions.TIME}}
    return data.chunk(chunks)


def score_system(forecast: xr.Dataset, truth: xr.Dataset,
                 climatology: xr.Dataset | None = None, *, regions: Regions = None,
                 weighting: str = DEFAULT_WEIGHTING, skipna: bool = False) -> xr.Dataset:
    """Every applicable score of one forecast (lazy), stacked along ``metric``.

    Parameters
    ----------
    forecast : (time, [number], prediction_timedelta, [level], latitude, longitude).
    truth : (time, [level], latitude, longitude), not yet aligned.
    climatology : for ``acc``; None to skip it.
    regions, weighting, skipna : see :func:`weathermodel.evaluation.deterministic.rmse`.

    Returns
    -------
    Dataset (metric, [region,] prediction_timedelta, [level]) with coordinate ``n_pairs``.
    An ensemble (a ``number`` dimension) also gets the metrics of
    :data:`ENSEMBLE_METRICS` and its rank histogram as the metrics ``rank_histogram_00`` ..
    ``rank_histogram_<M>`` (see :mod:`weathermodel.evaluation.layout`); its deterministic
    scores are those of the ensemble mean.
    """
    aligned = align(forecast, truth)
    options = {"regions": regions, "weighting": weighting, "skipna": skipna}
    prediction, verifying = _fewer_chunks(aligned.forecast), _fewer_chunks(aligned.truth)
    results: dict[str, xr.Dataset] = {}
    if conventions.MEMBER in prediction.dims:
        for name, score in ENSEMBLE_SCORES.items():
            results[name] = score(prediction, verifying, **options)
        histogram = rank_histogram(prediction, verifying, **options)
        for rank in histogram[RANK].values:
            results[rank_histogram_metric(int(rank))] = histogram.sel({RANK: rank}, drop=True)
        prediction = prediction.mean(conventions.MEMBER)
    for name, score in DETERMINISTIC_SCORES.items():
        results[name] = score(prediction, verifying, **options)
    if climatology is not None:
        at_valid_times = _fewer_chunks(climatology_for(climatology, verifying))
        results["acc"] = acc(prediction, verifying, at_valid_times, **options)
    return _stack(results, METRIC)


def _baseline(name: str, truth: xr.Dataset, climatology: xr.Dataset | None,
              reference: xr.Dataset) -> xr.Dataset | None:
    init_times, leads = reference[conventions.TIME].values, reference[LEAD].values
    variables = [v for v in reference.data_vars if v in truth.data_vars]
    if name == "persistence":
        return persistence_forecast(truth[variables], init_times, leads)
    if name == "climatology":
        if climatology is None:
            log.warning("baseline 'climatology' skipped: no climatology given "
                        "(make one with 'weathermodel climatology')")
            return None
        return climatology_forecast(climatology, init_times, leads)
    raise ConfigError(f"unknown baseline {name!r}", f"use some of {BASELINES}")


def _select(truth: xr.Dataset, forecasts: dict[str, xr.Dataset],
            variables: Sequence[str] | None) -> tuple[xr.Dataset, dict[str, xr.Dataset]]:
    wanted = list(variables) if variables else sorted(
        {str(v) for f in forecasts.values() for v in f.data_vars})
    missing = [v for v in wanted if v not in truth.data_vars]
    if missing:
        log.warning("variable(s) %s are not in the truth and are not scored", missing)
    wanted = [v for v in wanted if v in truth.data_vars]
    if not wanted:
        raise DataError("no forecast variable is in the truth",
                        f"the truth has {sorted(map(str, truth.data_vars))}")
    forecasts = {n: f[[v for v in wanted if v in f.data_vars]] for n, f in forecasts.items()}
    return truth[wanted], forecasts


def _init_range(forecast: xr.Dataset, start: str | None, end: str | None) -> xr.Dataset:
    selected = forecast.sel({conventions.TIME: slice(start, end)})
    if selected.sizes[conventions.TIME] == 0:
        raise DataError(f"no initialisation time within {start}..{end}", "widen the period")
    return selected


def _n_pairs_per_system(scores: xr.Dataset) -> xr.Dataset:
    """``n_pairs`` with a ``system`` dim (concat keeps a coordinate equal for all as it is)."""
    if SYSTEM in scores[N_PAIRS].dims:
        return scores
    per_system = scores[N_PAIRS].expand_dims({SYSTEM: scores[SYSTEM].values})
    return scores.assign_coords({N_PAIRS: per_system})


def _warn_about_unscored(scores: xr.Dataset) -> None:
    """Log a warning for every system and variable whose RMSE is missing at every lead (NaN in
    the forecast, e.g. a model that diverged: its forecast store's health report says where)."""
    for name in scores.data_vars:
        rmse = scores[name].sel({METRIC: "rmse"})
        others = [dim for dim in rmse.dims if dim not in (SYSTEM, LEAD)]
        unscored = rmse.isnull().all([LEAD, *others])
        for system in scores[SYSTEM].values[unscored.values]:
            reason = ("the climatology does not cover these dates: build it from a period "
                      "that does" if system == "climatology" else
                      "its forecast holds NaN (see the health report in the forecast store's "
                      "attributes)")
            log.warning("%s has no %s score at any lead: %s", system, name, reason)


def evaluate(forecast_paths: Mapping[str, str | Path], truth_path: str | Path,
             climatology_path: str | Path | None = None,
             baselines: Sequence[str] = BASELINES, regions: Regions = None,
             out: str | Path | None = None, *, weighting: str = DEFAULT_WEIGHTING,
             variables: Sequence[str] | None = None, start: str | None = None,
             end: str | None = None, skipna: bool = False,
             scheduler: str | None = None) -> xr.Dataset:
    """Score forecast stores and baselines against a truth.

    Parameters
    ----------
    forecast_paths : system name -> forecast store (zarr or netCDF, WB2 layout).
    truth_path : training store or canonical dataset (see :func:`truth_dataset`).
    climatology_path : climatology (``weathermodel climatology``) for ACC and the climatology
        baseline; None skips both (logged).
    baselines : any of ``persistence``, ``climatology``; they use the initialisation times and
        leads of the first forecast.
    regions : None (whole grid), names of :data:`weathermodel.evaluation.regions.REGIONS` or a
        mapping name -> (lat_min, lat_max, lon_min, lon_max).
    out : where to write the scores (``.nc``: netCDF, else zarr); None to only return them.
    weighting : area weights: ``"auto"`` (default: WB2's ``"wb2_edges"`` on global grids,
        ``"edges"`` on regional ones), or one of them, or ``"cos"``.
    variables : variables to score; default all forecast variables found in the truth.
    start, end : range of initialisation times to score (ISO, inclusive).
    skipna : leave NaN out of the means (default False, as WB2).
    scheduler : address of a ``dask.distributed`` scheduler; None for local threads.

    Returns
    -------
    The scores (see the module docstring), computed.
    """
    from weathermodel.data.prepare import dask_context

    if not forecast_paths:
        raise ConfigError("no forecast to evaluate", "give at least one forecast store")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}", f"use some of {BASELINES}")
    with dask_context(scheduler):
        truth = truth_dataset(truth_path)
        climatology = open_climatology(climatology_path) if climatology_path else None
        if climatology is None:
            log.warning("no climatology given: ACC is not computed")
        systems = {name: _init_range(open_forecast(path), start, end)
                   for name, path in forecast_paths.items()}
        truth, systems = _select(truth, systems, variables)
        reference = next(iter(systems.values()))
        for name in baselines:
            forecast = _baseline(name, truth, climatology, reference)
            if forecast is not None and name not in systems:
                systems[name] = forecast
        lazy = {}
        for name, forecast in systems.items():
            try:
                lazy[name] = score_system(forecast, truth, climatology, regions=regions,
                                          weighting=weighting, skipna=skipna)
            except DataError as error:  # e.g. another grid: name the forecast concerned
                if error.path is not None or name not in forecast_paths:
                    raise
                raise DataError(error.problem, error.fix, path=str(forecast_paths[name]),
                                variable=error.variable) from error
        log.info("computing scores of %s", list(lazy))
        (computed,) = dask.compute(lazy)
    scores = _n_pairs_per_system(_stack(computed, SYSTEM))
    _warn_about_unscored(scores)
    scores = scores.assign_attrs(
        weighting=resolve_weighting(weighting, truth[conventions.LATITUDE].values),
        skipna=int(skipna), truth=str(truth_path),
        climatology=str(climatology_path or ""),
        forecasts=json.dumps({k: str(v) for k, v in forecast_paths.items()}),
        conventions="WeatherBench 2: rmse = sqrt(time mean of area-weighted MSE); time = "
                    "initialisation time; valid time = time + prediction_timedelta")
    for name in scores.data_vars:
        scores[name].attrs = {"units": str(truth[name].attrs.get("units", ""))}
    if out is not None:
        save_dataset(scores, out)
        log.info("scores written to %s", out)
    return scores


def make_climatology(truth_path: str | Path, out: str | Path, *,
                     window_days: int | None = None, start: str | None = None,
                     end: str | None = None, variables: Sequence[str] | None = None,
                     scheduler: str | None = None) -> xr.Dataset:
    """Compute a climatology from a truth (see :func:`baselines.compute_climatology`) and
    write it to ``out`` (netCDF for ``.nc``, else zarr, in chunks of whole grids and about
    dask's ``array.chunk-size`` along dayofyear and hour). Returns it, opened lazily."""
    from weathermodel.data.prepare import dask_context

    with dask_context(scheduler):
        truth = truth_dataset(truth_path)
        if variables:
            truth = truth[list(variables)]
        climatology = compute_climatology(truth, window_days=window_days, start=start,
                                             end=end)
        climatology = climatology.chunk({DAYOFYEAR: "auto", HOUR: "auto"})
        path = save_dataset(climatology, out)
    return open_climatology(path)


# --------------------------------------------------------------------------------------------
# spectra and plots
# --------------------------------------------------------------------------------------------
def _select_leads(forecast: xr.Dataset, leads: Sequence[str | np.timedelta64] | None,
                  name: str) -> xr.Dataset:
    if leads is None:
        return forecast
    wanted = pd.to_timedelta(list(leads)).values.astype("timedelta64[ns]")
    available = forecast[LEAD].values
    missing = [_lead_label(lead) for lead in wanted if lead not in available]
    if missing:
        raise DataError(f"forecast '{name}' has no lead(s) {missing} (it has "
                        f"{[_lead_label(lead) for lead in available]})",
                        "ask for leads the forecast has")
    return forecast.sel({LEAD: wanted})


def _rows(latitude: np.ndarray, latitudes: tuple[float, float] | None) -> np.ndarray:
    """Boolean mask of the latitude rows within ``latitudes`` (all rows for None)."""
    if latitudes is None:
        return np.ones(latitude.shape, dtype=bool)
    low, high = sorted(latitudes)
    rows = (latitude >= low - 1e-6) & (latitude <= high + 1e-6)
    if not rows.any():
        raise DataError(f"no latitude row within {low:g}..{high:g} (the grid spans "
                        f"{latitude.min():g}..{latitude.max():g})",
                        "choose latitudes within the grid")
    return rows


def _mean_spectrum(fields: xr.Dataset, valid: xr.DataArray, rows: np.ndarray) -> xr.Dataset:
    """Zonal spectra of (time, [number], prediction_timedelta, [level], latitude, longitude)
    averaged over members, the valid (init, lead) pairs and the selected latitude rows."""
    selected = fields.isel({conventions.LATITUDE: np.flatnonzero(rows)})
    power = zonal_energy_spectrum(selected, average_dims=[conventions.MEMBER])
    attrs = {name: dict(power[name].attrs) for name in power.data_vars}
    wavelength = power["wavelength"].mean(conventions.LATITUDE)
    mean = power.where(valid).mean(conventions.TIME).mean(conventions.LATITUDE)
    mean = mean.drop_vars([c for c in mean.coords if c not in mean.dims])
    for name in mean.data_vars:
        mean[name].attrs = attrs[name]
    return mean.assign_coords(wavelength=wavelength.assign_attrs(units="m"))


def energy_spectra(forecasts: Mapping[str, xr.Dataset], truth: xr.Dataset,
                   leads: Sequence[str | np.timedelta64] | None = None, *,
                   latitudes: tuple[float, float] | None = None) -> xr.Dataset:
    """Zonal energy spectra of forecasts and of the truth they verify against (WB2 style).

    The spectrum of every latitude row (:func:`weathermodel.evaluation.spectra.
    zonal_energy_spectrum`, WB2's ``ZonalEnergySpectrum``: S[k] = 2 D |F[k]|^2 for k > 0,
    D the length of the row in m) is averaged over ensemble members, over the (init, lead)
    pairs whose valid time is in the truth, and then (unweighted) over the latitude rows, as
    WB2 averages its spectra over a latitude band. Averaging is per zonal wavenumber k; the
    coordinate ``wavelength`` is the mean row length over k (m; inf at k = 0).

    Parameters
    ----------
    forecasts : system name -> forecast (time, [number], prediction_timedelta, [level],
        latitude, longitude) on the truth's grid, longitudes uniformly spaced.
    truth : (time, [level], latitude, longitude), ``time`` the valid time. Its spectrum is the
        system ``"truth"``, taken at the valid times of the first forecast's (init, lead) pairs.
    leads : leads to compute (e.g. ``["1d", "5d"]``); default all leads of each forecast.
    latitudes : (min, max) degrees north of the rows averaged; default all rows of the grid.

    Returns
    -------
    Dataset, computed, one variable per weather variable, dims (system, prediction_timedelta,
    [level], zonal_wavenumber), units m times the variable's units squared; coordinate
    ``wavelength`` (zonal_wavenumber). A system without some lead or level holds NaN there.
    """
    if not forecasts:
        raise ConfigError("no forecast given for the spectra", "give at least one forecast")
    if TRUTH_SYSTEM in forecasts:
        raise ConfigError(f"a forecast is named '{TRUTH_SYSTEM}', the name of the truth's "
                          "spectrum", "rename the forecast")
    spectra: dict[str, xr.Dataset] = {}
    reference_truth: xr.Dataset | None = None
    for name, forecast in forecasts.items():
        aligned = align(_select_leads(forecast, leads, name), truth)
        valid = aligned.truth[VALID_PAIR]
        rows = _rows(aligned.truth[conventions.LATITUDE].values, latitudes)
        spectra[name] = _mean_spectrum(aligned.forecast, valid, rows)
        if reference_truth is None:
            reference_truth = _mean_spectrum(aligned.truth, valid, rows)
    spectra[TRUTH_SYSTEM] = reference_truth
    (computed,) = dask.compute(spectra)
    stacked = _stack(computed, SYSTEM)
    for name in stacked.data_vars:
        stacked[name].attrs = dict(computed[TRUTH_SYSTEM][name].attrs)
    order = [d for d in (SYSTEM, LEAD, conventions.LEVEL, ZONAL_WAVENUMBER) if d in stacked.dims]
    return stacked.transpose(*order)


def plot_evaluation(scores: xr.Dataset, forecast_paths: Mapping[str, str | Path],
                    truth_path: str | Path, out_dir: str | Path, *,
                    start: str | None = None, end: str | None = None,
                    reference: str = "persistence", scheduler: str | None = None,
                    spectra_out: str | Path | None = None) -> list[Path]:
    """Spectra of the forecast stores and the truth, then every plot of
    :func:`weathermodel.evaluation.plots.write_evaluation_plots` into ``out_dir``.

    Parameters
    ----------
    scores : from :func:`evaluate` for the same forecasts; its variables are plotted.
    forecast_paths, truth_path, start, end, scheduler : as given to :func:`evaluate`.
    reference : system the scorecards compare against.
    spectra_out : also write the spectra there (``.nc``: netCDF, else zarr).

    Returns
    -------
    The PNG files written.
    """
    from weathermodel.data.prepare import dask_context

    with dask_context(scheduler):
        truth = truth_dataset(truth_path)
        systems = {name: _init_range(open_forecast(path), start, end)
                   for name, path in forecast_paths.items()}
        truth, systems = _select(truth, systems, [str(v) for v in scores.data_vars])
        spectra = energy_spectra(systems, truth)
        if spectra_out is not None:
            save_dataset(spectra, spectra_out)
        return write_evaluation_plots(scores, out_dir, forecast=next(iter(systems.values())),
                                      truth=truth, spectra=spectra, reference=reference)


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------
def _lead_label(lead: np.timedelta64) -> str:
    hours = pd.Timedelta(lead).total_seconds() / 3600.0
    return f"{hours:g}h"


def _block(scores: xr.Dataset, name: str, metrics: list[str], title: str) -> list[str]:
    systems = [str(s) for s in scores[SYSTEM].values]
    columns = [(m, s) for m in metrics for s in systems]
    widths = [max(10, len(f"{m}:{s}") + 2) for m, s in columns]
    header = "".join(f"{m}:{s}".rjust(w) for (m, s), w in zip(columns, widths))
    lines = [title, "lead".ljust(8) + header]
    for lead in scores[LEAD].values:
        cells = []
        for (metric, system), width in zip(columns, widths):
            value = float(scores[name].sel({METRIC: metric, SYSTEM: system, LEAD: lead}))
            cells.append(("-" if np.isnan(value) else f"{value:.4g}").rjust(width))
        lines.append(_lead_label(lead).ljust(8) + "".join(cells))
    return lines


def _rank_histogram_blocks(histogram: xr.DataArray, label: str) -> list[str]:
    """Per system with a rank histogram: one row per lead, one column per rank (the
    frequency of the truth's rank among the M members, bins 0..M)."""
    lines: list[str] = []
    for system in histogram[SYSTEM].values:
        values = histogram.sel({SYSTEM: system}).transpose(LEAD, RANK)
        held = values.notnull().any(LEAD).values
        if not held.any():
            continue
        values = values.isel({RANK: np.flatnonzero(held)})
        header = "".join(f"r{int(rank)}".rjust(7) for rank in values[RANK].values)
        lines += [f"{label} rank histogram of {system} (frequency of each rank)",
                  "lead".ljust(8) + header]
        for lead, row in zip(values[LEAD].values, values.values):
            cells = "".join(("-" if np.isnan(v) else f"{v:.3f}").rjust(7) for v in row)
            lines.append(_lead_label(lead).ljust(8) + cells)
        lines.append("")
    return lines


def score_table(scores: xr.Dataset, metrics: Sequence[str] = ("rmse", "acc")) -> str:
    """A plain-text table: per variable, level and region, one row per lead and one column
    per (metric, system); ``-`` where a score is missing (e.g. ACC without climatology).
    Levels or regions where every value is missing are left out. With ``"rank_histogram"``
    among ``metrics``, each ensemble's rank histogram follows (one row per lead, one column
    per rank)."""
    shown = [m for m in metrics if m in scores[METRIC].values]
    histograms = rank_histograms(scores) if RANK_HISTOGRAM in metrics else None
    lines: list[str] = []
    for name in scores.data_vars:
        units = scores[name].attrs.get("units", "")
        levels = scores[conventions.LEVEL].values if conventions.LEVEL in scores[name].dims \
            else [None]
        regions = scores[REGION].values if REGION in scores[name].dims else [None]
        for level in levels:
            for region in regions:
                point = {k: v for k, v in ((conventions.LEVEL, level), (REGION, region))
                         if v is not None}
                label = f"{name}" + (f" {level:g} hPa" if level is not None else "")
                where = f" ({region})" if region else ""
                block = scores.sel(point)[[name]].sel({METRIC: shown})
                if not bool(block[name].isnull().all()):
                    title = label + (f" [{units}]" if units else "") + where
                    lines += _block(block, name, shown, title) + [""]
                if histograms is not None:
                    lines += _rank_histogram_blocks(histograms[name].sel(point), label + where)
    return "\n".join(lines).rstrip() + "\n"

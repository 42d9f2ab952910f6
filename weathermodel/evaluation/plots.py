"""Figures of an evaluation: lead-time curves, WeatherBench 2 style scorecards, spread-skill
curves and rank histograms of ensembles, zonal energy spectra and maps of forecast, truth and
error.

Every function builds a :class:`matplotlib.figure.Figure` on the Agg canvas (no ``pyplot``,
so nothing is left in a global figure registry and no display is needed), returns it, and
writes it as a PNG when ``out`` is given. matplotlib and cartopy are imported only when a
function is called (``import weathermodel`` stays light).

Inputs
------
* ``scores``: the Dataset of :func:`weathermodel.evaluation.evaluate.evaluate`, dims
  (system, metric, [region,] prediction_timedelta, [level]), one variable per weather
  variable with its units in the attribute ``units``.
* ``spectra``: the Dataset of :func:`weathermodel.evaluation.evaluate.energy_spectra`, dims
  (system, prediction_timedelta, [level], zonal_wavenumber), coordinate ``wavelength`` (m).
* maps: a forecast in the WeatherBench 2 layout (time = initialisation time,
  prediction_timedelta, [number], [level], latitude, longitude), e.g. from
  :func:`~weathermodel.evaluation.evaluate.open_forecast`, and a truth (time = valid time,
  [level], latitude, longitude), e.g. from :func:`~weathermodel.evaluation.evaluate.
  truth_dataset`.

Coastlines come from the Natural Earth 1:110m files shipped in the package
(:func:`use_shipped_coastlines`), so maps are drawn offline.
"""
from __future__ import annotations

import importlib
import logging
import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from weathermodel import conventions
from weathermodel.errors import ConfigError, DataError, WeatherModelError
from weathermodel.evaluation.alignment import LEAD, VALID_PAIR, align
from weathermodel.evaluation.averaging import score_units
from weathermodel.evaluation.layout import METRIC, RANK, SYSTEM, TRUTH_SYSTEM, rank_histograms
from weathermodel.evaluation.regions import REGION
from weathermodel.evaluation.spectra import ZONAL_WAVENUMBER

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

PLOT_EXTRA = "pip install matplotlib cartopy (dependencies of weathermodel)"
#: metrics where a larger value is better (the scorecard's colours flip for them)
HIGHER_IS_BETTER = ("acc",)
#: folder inside the package laid out as cartopy's ``pre_existing_data_dir``
COASTLINE_FOLDER = ("resources", "natural_earth")
COASTLINE_FILE = ("shapefiles", "natural_earth", "physical", "ne_110m_coastline.shp")
COASTLINE_RESOLUTION = "110m"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DPI = 100
PANEL_COLUMNS = 3


# --------------------------------------------------------------------------------------------
# optional dependencies, figures, files
# --------------------------------------------------------------------------------------------
def _require(module: str) -> Any:
    """Import an optional plotting dependency, or explain how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise WeatherModelError(f"plotting needs the package '{package}', which is not "
                                f"installed ({error})", f"install the plotting extras: "
                                f"{PLOT_EXTRA}") from error


def _new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot), constrained layout, size in inches."""
    figure = _require("matplotlib.figure").Figure(figsize=(width, height), layout="constrained")
    _require("matplotlib.backends.backend_agg").FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out: str | Path | None) -> Figure:
    """Write ``figure`` as a PNG at ``out`` (parents created) when given; return it."""
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=DPI, format="png")
    return figure


def shipped_coastline_dir() -> Path:
    """The package's Natural Earth folder, laid out as cartopy's ``pre_existing_data_dir``
    (``<dir>/shapefiles/natural_earth/physical/ne_110m_coastline.shp``).

    Raises
    ------
    WeatherModelError : the shapefile is not in the installation.
    """
    folder = Path(str(resources.files("weathermodel").joinpath(*COASTLINE_FOLDER)))
    if not folder.joinpath(*COASTLINE_FILE).is_file():
        raise WeatherModelError("the shipped Natural Earth coastlines are missing from the "
                                "installation", "reinstall weathermodel (pip install "
                                "--force-reinstall weathermodel)", path=str(folder))
    return folder


def use_shipped_coastlines() -> Path:
    """Point cartopy at the shipped Natural Earth 1:110m coastlines; returns the folder.

    Sets ``cartopy.config["pre_existing_data_dir"]`` (replacing ``$CARTOPY_DATA_DIR`` for this
    process). cartopy looks for every Natural Earth shapefile there first, as
    ``<dir>/shapefiles/natural_earth/<category>/ne_<resolution>_<name>.shp``, and only then in
    ``config["data_dir"]``, downloading into it what is missing. Only the 110m coastlines are
    shipped, so draw them with ``axes.coastlines(resolution="110m")`` (the default ``"auto"``
    may ask for the 50m or 10m files, which would be downloaded).
    """
    cartopy = _require("cartopy")
    folder = shipped_coastline_dir()
    cartopy.config["pre_existing_data_dir"] = folder
    return folder


# --------------------------------------------------------------------------------------------
# selections from the scores
# --------------------------------------------------------------------------------------------
def _check_choice(value: Any, available: Sequence[Any], what: str) -> None:
    if value not in list(available):
        names = [str(a) for a in available]
        raise ConfigError(f"{what} {value!r} is not available (available: {names})",
                          f"choose one of {names}")


def _one_along(data: xr.Dataset, dim: str, value: Any, kind: Callable[[Any], Any],
               fix_without_dim: str) -> tuple[xr.Dataset, Any]:
    """``data`` at ``value`` of ``dim`` (default: its first), and that value; ``data`` as it is
    and None when it has no ``dim`` (then asking for a value is an error)."""
    if dim not in data.dims:
        if value is not None:
            raise ConfigError(f"{dim} {value!r} asked for, but the data has no {dim} "
                              "dimension", fix_without_dim)
        return data, None
    available = [kind(v) for v in data[dim].values]
    value = available[0] if value is None else kind(value)
    _check_choice(value, available, dim)
    return data.sel({dim: value}), value


def _lead_hours(leads: np.ndarray) -> np.ndarray:
    return pd.to_timedelta(leads).total_seconds().to_numpy() / 3600.0


def _level_label(name: str, level: float | None) -> str:
    return name if level is None else f"{name} {level:g} hPa"


def _select_metric(scores: xr.Dataset, metric: str,
                   region: str | None) -> tuple[xr.Dataset, str | None]:
    """The scores of one metric and region (default: the first region), region's name."""
    _check_choice(metric, [str(m) for m in scores[METRIC].values], "metric")
    return _one_along(scores.sel({METRIC: metric}), REGION, region, str,
                      "leave region unset, or score with regions")


class _Panel(NamedTuple):
    """One variable (at one level): its label, values (system, lead) and units."""

    label: str
    values: xr.DataArray
    units: str
    variable: str
    level: float | None

    def of(self, selected: xr.Dataset) -> xr.DataArray:
        """The same variable and level in other scores (system, lead)."""
        array = selected[self.variable]
        if self.level is not None:
            array = array.sel({conventions.LEVEL: self.level})
        return array.transpose(SYSTEM, LEAD)


def _panels(selected: xr.Dataset, variables: Sequence[str] | None) -> list[_Panel]:
    """One panel per variable and level, leaving out those where every value is NaN."""
    names = [str(v) for v in selected.data_vars] if variables is None else list(variables)
    for name in names:
        _check_choice(name, [str(v) for v in selected.data_vars], "variable")
    panels = []
    for name in names:
        array = selected[name]
        units = str(array.attrs.get("units", ""))
        levels = array[conventions.LEVEL].values if conventions.LEVEL in array.dims else [None]
        for level in levels:
            values = array if level is None else array.sel({conventions.LEVEL: level})
            if bool(values.notnull().any()):
                level = None if level is None else float(level)
                panels.append(_Panel(_level_label(name, level), values.transpose(SYSTEM, LEAD),
                                     units, name, level))
    if not panels:
        raise DataError("every selected score is missing (NaN)", "choose another metric, "
                        "variable or region")
    return panels


def _grid(count: int) -> tuple[int, int]:
    """(rows, columns) of a panel grid."""
    columns = min(PANEL_COLUMNS, count)
    return math.ceil(count / columns), columns


def _title(metric: str, region: str | None) -> str:
    return metric + (f" ({region})" if region else "")


# --------------------------------------------------------------------------------------------
# lead-time curves
# --------------------------------------------------------------------------------------------
def _lead_panel(axes: Axes, panel: _Panel, metric: str, hours: np.ndarray) -> None:
    for index, system in enumerate(panel.values[SYSTEM].values):
        values = panel.values.sel({SYSTEM: system}).values
        if np.isfinite(values).any():
            axes.plot(hours, values, marker=MARKERS[index % len(MARKERS)], label=str(system))
    _label_lead_axes(axes, panel.label, f"{metric} [{score_units(metric, panel.units)}]", hours)


def _label_lead_axes(axes: Axes, title: str, ylabel: str, hours: np.ndarray) -> None:
    """Title, labels, at most 10 lead ticks (hours), grid and legend of a lead-time panel."""
    axes.set_title(title)
    axes.set_xlabel("lead time [h]")
    axes.set_ylabel(ylabel)
    axes.set_xticks(hours if hours.size <= 10 else hours[::math.ceil(hours.size / 10)])
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def plot_lead_time(scores: xr.Dataset, metric: str = "rmse",
                   variables: Sequence[str] | None = None, region: str | None = None,
                   out: str | Path | None = None) -> Figure:
    """A score against lead time: one panel per variable (and level), one line per system.

    Parameters
    ----------
    scores : from ``evaluate`` (see the module docstring).
    metric : e.g. ``rmse``, ``acc``, ``crps``.
    variables : variables to show; default all (levels where every score is NaN are skipped).
    region : region to show when the scores have regions; default the first.
    out : PNG file to write; None to only return the figure.

    Returns
    -------
    The figure; x = lead in hours, y = the score in the variable's units (mse: squared,
    acc: 1), a legend of the systems (each with its own marker).
    """
    selected, region = _select_metric(scores, metric, region)
    panels = _panels(selected, variables)
    rows, columns = _grid(len(panels))
    figure = _new_figure(4.2 * columns, 3.2 * rows)
    hours = _lead_hours(selected[LEAD].values)
    for index, panel in enumerate(panels):
        _lead_panel(figure.add_subplot(rows, columns, index + 1), panel, metric, hours)
    figure.suptitle(_title(metric, region))
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# scorecard
# --------------------------------------------------------------------------------------------
def scorecard_values(scores: xr.Dataset, reference: str = "persistence", metric: str = "rmse",
                     region: str | None = None) -> xr.DataArray:
    """Relative difference of every system to a reference, in percent.

    value = 100 (score(system) - score(reference)) / score(reference), per variable (and
    level) and lead; NaN where either score is missing or the reference is 0. For error
    metrics (rmse, mse, mae, crps, ...) negative is better; for :data:`HIGHER_IS_BETTER`
    metrics (acc) positive is better. The sign of the number is never flipped.

    Returns
    -------
    DataArray (system, row, prediction_timedelta) of every system but the reference (those
    without any comparable score, e.g. the ACC of the climatology, left out), ``row``
    labelled ``variable`` or ``variable LEVEL hPa``; attributes ``metric``, ``reference``,
    ``higher_is_better`` (0/1), ``units`` (``%``).

    Raises
    ------
    ConfigError : the reference (listing the systems), metric or region is not in the scores.
    """
    systems = [str(s) for s in scores[SYSTEM].values]
    if reference not in systems:
        raise ConfigError(f"reference system {reference!r} is not in the scores (systems: "
                          f"{systems})", f"pass reference= one of {systems}, or score the "
                          "reference too (e.g. the persistence baseline)")
    others = [s for s in systems if s != reference]
    if not others:
        raise ConfigError(f"the scores hold only the reference {reference!r}",
                          "score at least one other system")
    selected, region = _select_metric(scores, metric, region)
    rows = []
    for panel in _panels(selected, None):
        base = panel.values.sel({SYSTEM: reference})
        relative = 100.0 * (panel.values.sel({SYSTEM: others}) - base) / base.where(base != 0)
        rows.append(relative.reset_coords(drop=True).expand_dims(row=[panel.label]))
    values = xr.concat(rows, dim="row").transpose(SYSTEM, "row", LEAD)
    scored = values.notnull().any(("row", LEAD)).values
    if not scored.any():
        raise DataError(f"no {metric} of any system can be compared with the reference "
                        f"{reference!r} (missing, or the reference is 0)",
                        "choose another metric or reference")
    values = values.isel({SYSTEM: np.flatnonzero(scored)})
    return values.rename("relative_difference").assign_attrs(
        metric=metric, reference=reference, region=region or "",
        higher_is_better=int(metric in HIGHER_IS_BETTER), units="%")


def _colour_limit(values: np.ndarray) -> float:
    """Half-range of the symmetric colour scale: the largest |value|, at least 1 %."""
    finite = np.abs(values[np.isfinite(values)])
    return max(1.0, float(finite.max())) if finite.size else 1.0


def _annotate(axes: Axes, matrix: np.ndarray, limit: float) -> None:
    for (row, column), value in np.ndenumerate(matrix):
        strong = np.isfinite(value) and abs(value) > 0.6 * limit
        axes.text(column, row, "-" if np.isnan(value) else f"{value:+.1f}", ha="center",
                  va="center", fontsize="small", color="white" if strong else "black")


def _scorecard_panel(figure: Figure, axes: Axes, card: xr.DataArray, system: str,
                     limit: float) -> None:
    matrix = card.sel({SYSTEM: system}).values
    higher_is_better = bool(card.attrs["higher_is_better"])
    image = axes.imshow(matrix, cmap="RdBu" if higher_is_better else "RdBu_r", vmin=-limit,
                        vmax=limit, aspect="auto", interpolation="nearest")
    _annotate(axes, matrix, limit)
    hours = _lead_hours(card[LEAD].values)
    axes.set_xticks(range(hours.size), [f"{h:g}" for h in hours])
    axes.set_yticks(range(card.sizes["row"]), [str(r) for r in card["row"].values])
    axes.set_xlabel("lead time [h]")
    axes.set_title(f"{system} vs {card.attrs['reference']}")
    figure.colorbar(image, ax=axes, label="% (blue: better)")


def plot_scorecard(scores: xr.Dataset, reference: str = "persistence", metric: str = "rmse",
                   region: str | None = None, out: str | Path | None = None) -> Figure:
    """WeatherBench 2 style scorecard: per system, the % difference to a reference.

    One heat map per system other than the reference; rows = variable (and level), columns =
    lead; every cell annotated with 100 (system - reference) / reference (see
    :func:`scorecard_values`). The diverging colour scale is centred at 0 and symmetric; blue
    always means better than the reference: negative values for error metrics (rmse, mae,
    crps, ...), positive values for ``acc`` (higher is better; the colours flip, the numbers
    do not).

    Returns
    -------
    The figure, with the numbers shown as ``figure.scorecard_values`` (the DataArray of
    :func:`scorecard_values`).

    Raises
    ------
    ConfigError : the reference is not among the systems (the error lists them).
    """
    card = scorecard_values(scores, reference, metric, region)
    systems = [str(s) for s in card[SYSTEM].values]
    limit = _colour_limit(card.values)
    label_width = 0.09 * max(len(str(r)) for r in card["row"].values)
    figure = _new_figure(max(5.0, 2.2 + label_width + 0.6 * card.sizes[LEAD]),
                         0.9 + (0.45 * card.sizes["row"] + 1.0) * len(systems))
    for index, system in enumerate(systems):
        axes = figure.add_subplot(len(systems), 1, index + 1)
        _scorecard_panel(figure, axes, card, system, limit)
    sense = "higher" if card.attrs["higher_is_better"] else "lower"
    figure.suptitle(f"scorecard: {_title(metric, card.attrs['region'] or None)}, "
                    f"{sense} is better")
    figure.scorecard_values = card  # type: ignore[attr-defined]
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# ensembles: spread-skill curves and rank histograms
# --------------------------------------------------------------------------------------------
#: the metrics of the spread-skill curve: the skill and the spread compared with it
SKILL_METRIC = "ensemble_mean_rmse"
SPREAD_METRIC = "corrected_spread"


def _spread_skill_panel(axes: Axes, skill: _Panel, spread: xr.DataArray,
                        hours: np.ndarray) -> None:
    colours = _require("matplotlib").rcParams["axes.prop_cycle"].by_key()["color"]
    for index, system in enumerate(skill.values[SYSTEM].values):
        skill_values = skill.values.sel({SYSTEM: system}).values
        if not np.isfinite(skill_values).any():
            continue
        colour, marker = colours[index % len(colours)], MARKERS[index % len(MARKERS)]
        axes.plot(hours, skill_values, color=colour, marker=marker, label=f"{system} skill")
        axes.plot(hours, spread.sel({SYSTEM: system}).values, color=colour, marker=marker,
                  linestyle="--", fillstyle="none", label=f"{system} spread")
    _label_lead_axes(axes, skill.label, f"[{skill.units}]", hours)


def plot_spread_skill(scores: xr.Dataset, variables: Sequence[str] | None = None,
                      region: str | None = None, out: str | Path | None = None) -> Figure:
    """Spread-skill curves of the ensembles: skill (the RMSE of the ensemble mean, solid) and
    spread (sqrt((M + 1) / M) times the root of the mean ensemble variance, dashed; the
    metric ``corrected_spread``) against lead time, one panel per variable (and level), one
    colour per ensemble system. The two curves lie on each other for a calibrated ensemble;
    spread below skill means an under-dispersive one.

    Parameters
    ----------
    scores : from ``evaluate`` with at least one ensemble system.
    variables : variables to show; default all.
    region : region to show when the scores have regions; default the first.
    out : PNG file to write; None to only return the figure.

    Raises
    ------
    ConfigError : the scores hold no ensemble scores (the error lists the metrics).
    """
    selected, region = _select_metric(scores, SKILL_METRIC, region)
    _check_choice(SPREAD_METRIC, [str(m) for m in scores[METRIC].values], "metric")
    spread = scores.sel({METRIC: SPREAD_METRIC})
    if region is not None:
        spread = spread.sel({REGION: region})
    panels = _panels(selected, variables)
    rows, columns = _grid(len(panels))
    figure = _new_figure(4.2 * columns, 3.2 * rows)
    hours = _lead_hours(selected[LEAD].values)
    for index, panel in enumerate(panels):
        _spread_skill_panel(figure.add_subplot(rows, columns, index + 1), panel,
                            panel.of(spread), hours)
    figure.suptitle(_title("spread (dashed) and skill (solid)", region))
    return _save(figure, out)


def _rank_histogram_panel(axes: Axes, histogram: xr.DataArray, label: str) -> None:
    """Bars of every system's frequencies (system, rank), side by side per rank, and the
    flat frequency 1 / (M + 1) of a calibrated ensemble of each as a dashed line."""
    colours = _require("matplotlib").rcParams["axes.prop_cycle"].by_key()["color"]
    systems = list(histogram[SYSTEM].values)
    width = 0.8 / len(systems)
    for index, system in enumerate(systems):
        values = histogram.sel({SYSTEM: system})
        values = values.isel({RANK: np.flatnonzero(values.notnull().values)})
        ranks = values[RANK].values
        colour = colours[index % len(colours)]
        axes.bar(ranks + (index - (len(systems) - 1) / 2) * width, values.values, width=width,
                 color=colour, label=str(system))
        axes.axhline(1.0 / ranks.size, color=colour, linestyle="--", linewidth=1.0)
    axes.set_xlabel("rank of the truth among the members")
    axes.set_ylabel("frequency")
    axes.set_title(label)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize="small")


def plot_rank_histogram(scores: xr.Dataset, variable: str,
                        lead: str | np.timedelta64 | None = None, region: str | None = None,
                        out: str | Path | None = None) -> Figure:
    """Rank histograms of the ensembles for one variable at one lead: the area-weighted
    frequency of the truth's rank among the M members (bins 0..M), bars per ensemble system,
    the flat 1 / (M + 1) of a calibrated ensemble dashed; one panel per level.

    Parameters
    ----------
    scores : from ``evaluate`` with at least one ensemble system (the metrics
        ``rank_histogram_<k>``, see :mod:`weathermodel.evaluation.layout`).
    variable : the variable to show.
    lead : e.g. ``"2d"``; default the longest lead.
    region : region to show when the scores have regions; default the first.
    out : PNG file to write; None to only return the figure.

    Raises
    ------
    DataError : the scores hold no rank histogram of this variable at this lead.
    """
    histograms = rank_histograms(scores)
    if histograms is None:
        raise DataError("the scores hold no rank histogram", "evaluate an ensemble forecast "
                        "(a forecast store with a 'number' dimension)")
    _check_choice(variable, [str(v) for v in histograms.data_vars], "variable")
    histograms, region = _one_along(histograms, REGION, region, str,
                                    "leave region unset, or score with regions")
    lead = _pick_lead(histograms, lead)
    array = histograms[variable].sel({LEAD: lead})
    held = array.notnull().any([d for d in array.dims if d != SYSTEM]).values
    if not held.any():
        raise DataError(f"no rank histogram of {variable} at this lead", "choose another "
                        "variable or lead", variable=variable)
    array = array.isel({SYSTEM: np.flatnonzero(held)})
    levels = array[conventions.LEVEL].values if conventions.LEVEL in array.dims else [None]
    rows, columns = _grid(len(levels))
    figure = _new_figure(4.6 * columns, 3.4 * rows)
    for index, level in enumerate(levels):
        panel = array if level is None else array.sel({conventions.LEVEL: level})
        _rank_histogram_panel(figure.add_subplot(rows, columns, index + 1),
                              panel.transpose(SYSTEM, RANK),
                              _level_label(variable, None if level is None else float(level)))
    hours = _lead_hours(np.array([lead]))[0]
    figure.suptitle(_title(f"rank histogram, lead {hours:g} h", region))
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------
def _pick_lead(data: xr.Dataset | xr.DataArray, lead: str | np.timedelta64 | None
               ) -> np.timedelta64:
    """``lead`` (a timedelta or e.g. ``"2d"``) checked to be in ``data``; None: the longest."""
    leads = data[LEAD].values
    if lead is None:
        return leads.max()
    wanted = pd.Timedelta(lead).to_timedelta64().astype(leads.dtype)
    if wanted not in leads:
        hours = [f"{h:g}h" for h in _lead_hours(leads)]
        raise ConfigError(f"lead {pd.Timedelta(wanted)} is not available (leads: {hours})",
                          f"choose one of {hours}")
    return wanted


def _spectrum_panel(axes: Axes, array: xr.DataArray, label: str) -> None:
    positive = array[ZONAL_WAVENUMBER].values > 0
    wavelength_km = array["wavelength"].values[positive] / 1000.0
    for index, system in enumerate(array[SYSTEM].values):
        energy = array.sel({SYSTEM: system}).values[positive]
        if not np.isfinite(energy).any():
            continue
        truth = str(system) == TRUTH_SYSTEM
        axes.plot(wavelength_km, energy, label=str(system), color="black" if truth else None,
                  linewidth=2.0 if truth else 1.2, linestyle="--" if truth else "-",
                  marker=None if truth else MARKERS[index % len(MARKERS)], markersize=3)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.invert_xaxis()  # large scales on the left, as WeatherBench 2 draws spectra
    axes.set_xlabel("zonal wavelength [km]")
    axes.set_ylabel(f"energy [{array.attrs.get('units', '')}]")
    axes.set_title(label)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")


def plot_spectra(spectra: xr.Dataset, variable: str, lead: str | np.timedelta64 | None = None,
                 out: str | Path | None = None) -> Figure:
    """Zonal energy spectra (log-log, energy against wavelength in km) of every system and the
    truth (black, dashed) at one lead; one panel per level.

    Parameters
    ----------
    spectra : from ``energy_spectra`` (see the module docstring).
    variable : the variable to show.
    lead : e.g. ``"2d"``; default the longest lead.
    out : PNG file to write; None to only return the figure.
    """
    _check_choice(variable, [str(v) for v in spectra.data_vars], "variable")
    lead = _pick_lead(spectra, lead)
    array = spectra[variable].sel({LEAD: lead})
    levels = array[conventions.LEVEL].values if conventions.LEVEL in array.dims else [None]
    rows, columns = _grid(len(levels))
    figure = _new_figure(4.8 * columns, 3.8 * rows)
    for index, level in enumerate(levels):
        panel = array if level is None else array.sel({conventions.LEVEL: level})
        axes = figure.add_subplot(rows, columns, index + 1)
        _spectrum_panel(axes, panel, _level_label(variable, None if level is None
                                                  else float(level)))
    figure.suptitle(f"zonal energy spectra, lead {_lead_hours(np.array([lead]))[0]:g} h")
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------
class _MapFields(NamedTuple):
    """Forecast, truth and their grid for one map, latitude ascending."""

    forecast: np.ndarray
    truth: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray
    units: str
    init: pd.Timestamp
    lead: pd.Timedelta
    label: str


def _member(forecast: xr.Dataset, member: int | None) -> tuple[xr.Dataset, str]:
    if conventions.MEMBER not in forecast.dims:
        return forecast, ""
    if member is None:
        return forecast.mean(conventions.MEMBER), ", ensemble mean"
    _check_choice(member, [int(m) for m in forecast[conventions.MEMBER].values], "member")
    return forecast.sel({conventions.MEMBER: member}), f", member {member}"


def _level(data: xr.Dataset, level: float | None) -> tuple[xr.Dataset, float | None]:
    """One level (default the first) when there is a level dimension."""
    return _one_along(data, conventions.LEVEL, level, float, "leave level unset")


def _map_fields(forecast: xr.Dataset, truth: xr.Dataset, variable: str, init_time: Any,
                lead: Any, level: float | None, member: int | None) -> _MapFields:
    """The forecast from ``init_time`` at ``lead`` and the truth at its valid time."""
    _check_choice(variable, [str(v) for v in forecast.data_vars], "forecast variable")
    _check_choice(variable, [str(v) for v in truth.data_vars], "truth variable")
    times = forecast[conventions.TIME].values
    init = pd.Timestamp(init_time).to_datetime64().astype(times.dtype)
    if init not in times:
        raise ConfigError(f"initialisation time {pd.Timestamp(init)} is not in the forecast "
                          f"({times.size} from {pd.Timestamp(times.min())} to "
                          f"{pd.Timestamp(times.max())})", "choose one of its init times")
    lead = _pick_lead(forecast, lead)
    chosen, member_label = _member(forecast[[variable]].sel(
        {conventions.TIME: [init], LEAD: [lead]}), member)
    aligned = align(chosen, truth[[variable]])
    if not bool(aligned.truth[VALID_PAIR].all()):
        raise DataError(f"the truth has no field at the valid time {pd.Timestamp(init + lead)}",
                        "choose an initialisation time and lead whose valid time the truth "
                        "covers", variable=variable)
    pair = {conventions.TIME: 0, LEAD: 0}
    prediction, level = _level(aligned.forecast.isel(pair), level)
    verifying, _ = _level(aligned.truth.isel(pair), level)
    units = str(truth[variable].attrs.get("units", "") or
                forecast[variable].attrs.get("units", ""))
    return _MapFields(
        forecast=np.asarray(prediction[variable].values, dtype=np.float64),
        truth=np.asarray(verifying[variable].values, dtype=np.float64),
        latitude=aligned.truth[conventions.LATITUDE].values,
        longitude=aligned.truth[conventions.LONGITUDE].values,
        units=units, init=pd.Timestamp(init), lead=pd.Timedelta(lead),
        label=_level_label(variable, level) + member_label)


def _edges(centres: np.ndarray, low: float | None = None,
           high: float | None = None) -> np.ndarray:
    """Cell edges halfway between centres, the end cells as wide as their neighbours,
    clipped to [low, high]."""
    centres = np.asarray(centres, dtype=np.float64)
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[:-1] + centres[1:]) / 2.0
    edges = np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])
    return np.clip(edges, low if low is not None else -np.inf, high if high is not None else np.inf)


def _is_global(longitude: np.ndarray) -> bool:
    """Whether the longitudes go all round the globe (with one spacing to close it)."""
    if longitude.size < 2:
        return False
    spacing = float(np.median(np.abs(np.diff(longitude))))
    return float(np.ptp(longitude)) + spacing >= 360.0 - 1e-6


def _map_aspect(fields: _MapFields) -> float:
    """Height / width of a map panel of the grid (degrees, PlateCarree), within [0.3, 1]."""
    if _is_global(fields.longitude):
        return 0.5
    height = np.ptp(_edges(fields.latitude, -90.0, 90.0))
    return float(np.clip(height / max(np.ptp(_edges(fields.longitude)), 1e-6), 0.3, 1.0))


def _map_axes(figure: Figure, position: int, fields: _MapFields) -> Axes:
    """A PlateCarree panel centred on the grid, with the shipped 110m coastlines; extent of
    the grid for regional grids, the whole globe for global ones."""
    ccrs = _require("cartopy.crs")
    lon_edges, lat_edges = _edges(fields.longitude), _edges(fields.latitude, -90.0, 90.0)
    centre = float((lon_edges[0] + lon_edges[-1]) / 2.0)
    axes = figure.add_subplot(1, 3, position, projection=ccrs.PlateCarree(centre))
    if _is_global(fields.longitude):
        axes.set_global()
    else:
        axes.set_extent([lon_edges[0], lon_edges[-1], lat_edges[0], lat_edges[-1]],
                        crs=ccrs.PlateCarree())
    use_shipped_coastlines()
    axes.coastlines(resolution=COASTLINE_RESOLUTION, linewidth=0.7)
    return axes


def _draw_field(figure: Figure, axes: Axes, fields: _MapFields, values: np.ndarray,
                title: str, colour_label: str, **style: Any) -> None:
    ccrs = _require("cartopy.crs")
    mesh = axes.pcolormesh(_edges(fields.longitude), _edges(fields.latitude, -90.0, 90.0),
                           values, transform=ccrs.PlateCarree(), shading="flat", **style)
    axes.set_title(title, fontsize="medium")
    figure.colorbar(mesh, ax=axes, orientation="horizontal", label=colour_label, shrink=0.9)


def _time_label(time: pd.Timestamp) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC")


def plot_maps(forecast: xr.Dataset, truth: xr.Dataset, variable: str, init_time: Any,
              lead: Any, level: float | None = None, member: int | None = None,
              out: str | Path | None = None) -> Figure:
    """Three maps: the forecast, the truth at its valid time, and forecast - truth.

    Parameters
    ----------
    forecast : WB2 layout (time, prediction_timedelta, [number], [level], latitude,
        longitude), e.g. ``open_forecast(path)``.
    truth : (time = valid time, [level], latitude, longitude) on the forecast's grid, e.g.
        ``truth_dataset(path)``; the units are read from its ``units`` attribute.
    variable : the variable to map.
    init_time : initialisation time (anything pandas reads, e.g. ``"2013-10-01T00"``).
    lead : lead time (e.g. ``"2d"``, a timedelta); the valid time is init_time + lead.
    level : pressure level (hPa) for a variable with levels; default the first level.
    member : ensemble member; default the ensemble mean when the forecast has members.
    out : PNG file to write; None to only return the figure.

    Returns
    -------
    The figure: PlateCarree panels with the shipped Natural Earth coastlines (offline), the
    extent of the grid (or the globe for a global grid), forecast and truth on one colour
    scale, the error on a symmetric diverging scale, colour bars labelled with the units.
    """
    fields = _map_fields(forecast, truth, variable, init_time, lead, level, member)
    both = np.concatenate([fields.forecast.ravel(), fields.truth.ravel()])
    scale = {"vmin": float(np.nanmin(both)), "vmax": float(np.nanmax(both)), "cmap": "viridis"}
    error = fields.forecast - fields.truth
    largest = float(np.nanmax(np.abs(error))) if np.isfinite(error).any() else 0.0
    limit = largest if largest > 0 else 1.0
    valid = fields.init + fields.lead
    hours = fields.lead.total_seconds() / 3600.0
    figure = _new_figure(15.0, 1.9 + 4.6 * _map_aspect(fields))
    label = f"{fields.label} [{fields.units}]"
    panels = [(fields.forecast, f"forecast: init {_time_label(fields.init)} + {hours:g} h",
               label, scale),
              (fields.truth, f"truth: valid {_time_label(valid)}", label, scale),
              (error, "forecast - truth", f"error [{fields.units}]",
               {"vmin": -limit, "vmax": limit, "cmap": "RdBu_r"})]
    for position, (values, title, colour_label, style) in enumerate(panels, start=1):
        axes = _map_axes(figure, position, fields)
        _draw_field(figure, axes, fields, values, title, colour_label, **style)
    figure.suptitle(f"{fields.label}: init {_time_label(fields.init)}, lead {hours:g} h, "
                    f"valid {_time_label(valid)}")
    return _save(figure, out)


# --------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------
def _has_metric(scores: xr.Dataset, metric: str) -> bool:
    if metric not in [str(m) for m in scores[METRIC].values]:
        return False
    return any(bool(scores[v].sel({METRIC: metric}).notnull().any()) for v in scores.data_vars)


def _score_plots(scores: xr.Dataset, out_dir: Path, reference: str) -> list[Path]:
    regions = [str(r) for r in scores[REGION].values] if REGION in scores.dims else [None]
    systems = [str(s) for s in scores[SYSTEM].values]
    if reference not in systems:
        log.warning("no scorecard: the reference %r is not among the systems %s", reference,
                    systems)
    paths = []
    for region in regions:
        suffix = f"_{region}" if region else ""
        for metric in [m for m in ("rmse", "acc") if _has_metric(scores, m)]:
            path = out_dir / f"lead_time_{metric}{suffix}.png"
            plot_lead_time(scores, metric, region=region, out=path)
            paths.append(path)
            if reference in systems and len(systems) > 1:
                path = out_dir / f"scorecard_{metric}{suffix}.png"
                try:
                    plot_scorecard(scores, reference, metric, region=region, out=path)
                except DataError as error:  # e.g. every system's acc is NaN
                    log.warning("no %s scorecard: %s", metric, error)
                    continue
                paths.append(path)
    return paths


#: rank histograms are drawn at this many leads at most, evenly spread, the longest included
RANK_HISTOGRAM_LEADS = 4


def _spread_leads(leads: np.ndarray, most: int = RANK_HISTOGRAM_LEADS) -> np.ndarray:
    """Up to ``most`` leads evenly spread over ``leads``, the first and the last included."""
    return leads[np.unique(np.linspace(0, leads.size - 1, min(most, leads.size)).round()
                           .astype(int))]


def _ensemble_plots(scores: xr.Dataset, out_dir: Path) -> list[Path]:
    """Spread-skill curves and rank histograms of the ensemble systems, per region."""
    histograms = rank_histograms(scores)
    regions = [str(r) for r in scores[REGION].values] if REGION in scores.dims else [None]
    paths = []
    for region in regions:
        suffix = f"_{region}" if region else ""
        if _has_metric(scores, SKILL_METRIC) and _has_metric(scores, SPREAD_METRIC):
            path = out_dir / f"spread_skill{suffix}.png"
            plot_spread_skill(scores, region=region, out=path)
            paths.append(path)
        if histograms is None:
            continue
        for variable in [str(v) for v in histograms.data_vars]:
            if not bool(histograms[variable].notnull().any()):
                continue
            for lead in _spread_leads(histograms[LEAD].values):
                hours = _lead_hours(np.array([lead]))[0]
                path = out_dir / f"rank_histogram_{variable}_{hours:g}h{suffix}.png"
                plot_rank_histogram(scores, variable, lead, region=region, out=path)
                paths.append(path)
    return paths


def _map_plots(forecast: xr.Dataset, truth: xr.Dataset, out_dir: Path) -> list[Path]:
    """One map per variable common to both: first init time, longest lead."""
    init, lead = forecast[conventions.TIME].values[0], forecast[LEAD].values.max()
    paths = []
    for variable in [str(v) for v in forecast.data_vars if v in truth.data_vars]:
        path = out_dir / f"map_{variable}.png"
        plot_maps(forecast, truth, variable, init, lead, out=path)
        paths.append(path)
    return paths


def write_evaluation_plots(scores: xr.Dataset, out_dir: str | Path,
                           forecast: xr.Dataset | None = None, truth: xr.Dataset | None = None,
                           spectra: xr.Dataset | None = None,
                           reference: str = "persistence") -> list[Path]:
    """Write every plot of an evaluation as PNG files into ``out_dir``.

    * ``lead_time_rmse.png`` and ``lead_time_acc.png`` (when ACC was scored),
    * ``scorecard_rmse.png`` and ``scorecard_acc.png`` against ``reference`` (skipped, with a
      warning, when the reference is not among the systems),
    * for ensembles: ``spread_skill.png`` (:func:`plot_spread_skill`) and
      ``rank_histogram_<variable>_<hours>h.png`` (:func:`plot_rank_histogram`) at up to
      :data:`RANK_HISTOGRAM_LEADS` leads evenly spread, the longest included,

      each of these with the suffix ``_<region>`` per region when the scores have regions,
    * ``spectra_<variable>.png`` at the longest lead, when ``spectra`` is given,
    * ``map_<variable>.png`` for the first init time and the longest lead, when ``forecast``
      and ``truth`` are given.

    Returns
    -------
    The files written, in that order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _score_plots(scores, out_dir, reference) + _ensemble_plots(scores, out_dir)
    if spectra is not None:
        for variable in [str(v) for v in spectra.data_vars]:
            path = out_dir / f"spectra_{variable}.png"
            plot_spectra(spectra, variable, out=path)
            paths.append(path)
    if forecast is not None and truth is not None:
        paths += _map_plots(forecast, truth, out_dir)
    log.info("%d plots written to %s", len(paths), out_dir)
    return paths

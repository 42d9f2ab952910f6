"""GRIB2 output of forecasts: ``weathermodel forecast --format grib``.

A finished forecast (the WeatherBench 2 layout of :mod:`weathermodel.inference.output`: dims
``time`` (initialisation), [``number``], ``prediction_timedelta``, [``level``], ``latitude``,
``longitude``) becomes one GRIB2 file, one message per (start date, member, lead, variable,
level), in that order, written with ecCodes from its GRIB2 samples.

Encoding
--------
* Parameters: :data:`GRIB_PARAMETERS`, the one table from canonical names to ecCodes
  ``paramId`` (which sets discipline / parameterCategory / parameterNumber), the level and, for
  accumulations and averages, the statistical processing. Only WMO-standard parameters are used
  (no centre-local ones), so any GRIB2 reader decodes them; the originating centre is left
  "missing" (255): these are not a weather centre's products.
* Levels: ``isobaricInhPa`` (pressure levels), ``surface``, ``heightAboveGround`` 2 m / 10 m,
  ``meanSea``, ``nominalTop`` (TOA radiation). A level a variable does not have (all missing in
  the first field) is not written.
* Time: ``dataDate`` / ``dataTime`` = the start date (UTC), ``stepUnits`` hours (minutes when a
  lead or window is not a whole number of hours). Instantaneous fields (product definition
  template 4.0, or 4.1 for ensemble members) have ``step`` = the lead. Accumulations and means
  (template 4.8, or 4.11 for members) cover the window ending at the valid time:
  ``stepRange`` = ``lead - window`` to ``lead``, with ``typeOfStatisticalProcessing`` 1
  (accumulation) or 0 (average). Windows: ``total_precipitation`` 1 h (ERA5's hourly
  accumulation), ``total_precipitation_6hr`` 6 h, ``toa_incident_solar_radiation`` 1 h (ERA5),
  ``mean_total_precipitation_rate`` the model's time step (the model predicts one rate per step).
  A window reaching before the start date cannot be encoded and is refused.
* Units: canonical SI units, except precipitation amounts, written as WMO's ``tp`` in kg m-2
  (= mm of water: metres x 1000).
* Ensembles (templates 4.1 / 4.11): ``number`` = member, ``numberOfForecastsInEnsemble`` =
  members; member 0, the unperturbed control, is a control forecast (``dataType`` ``cf``), the
  others perturbed forecasts (``pf``), as in ECMWF's ensemble: cfgrib opens them one
  ``dataType`` at a time.
* Grid: ``regular_ll`` for equispaced latitudes, ``regular_gg`` for Gaussian latitudes (``N`` =
  half the number of latitudes). Rows are written north to south (``jScansPositively`` = 0, as
  ECMWF and NCEP products; the store keeps latitudes ascending, so rows are reversed) and
  longitudes west to east, in [0, 360) (a region crossing the prime meridian starts east of it;
  cfgrib reads it back with negative longitudes, e.g. -20..40). Irregular latitudes are refused.
* Packing: simple packing, 16 bits per value (error at most the field's range / (2**16 - 1));
  missing values (NaN, e.g. sea surface temperature over land) are encoded with a bitmap.

The file is written to a temporary name beside the target and renamed once complete, so a
reader never sees half a file.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import numpy as np
import xarray as xr

from weathermodel import conventions
from weathermodel.data.grid import describe_grid
from weathermodel.errors import ConfigError, DataError
from weathermodel.inference.output import variable_layout
from weathermodel.models.forecaster import ModelMetadata
from weathermodel.models.io import read_payload

#: Bits per packed value (simple packing): the largest error is the field's range / 2**16.
BITS_PER_VALUE = 16
#: Value standing for "missing" while encoding (outside any plausible range of every variable).
_MISSING = 9.999e20
#: The originating centre: WMO code table C-11, 255 = missing (not a weather centre's product).
_CENTRE = 255


@dataclass(frozen=True)
class GribParameter:
    """How one canonical variable is written to GRIB2.

    Attributes
    ----------
    param_id : ecCodes ``paramId`` (WMO discipline / category / number follow from it).
    short_name : the ecCodes ``shortName`` that ``param_id`` decodes to (checked when writing).
    type_of_level : ecCodes ``typeOfLevel``; pressure-level variables use ``isobaricInhPa``.
    level : the level's value (m for ``heightAboveGround``; ignored for pressure levels).
    statistic : ``""`` (instantaneous), ``"accumulation"`` or ``"average"`` over ``window``.
    window_hours : length of the statistical window ending at the valid time (h); 0 means the
        model's time step.
    scale : factor from canonical units to the GRIB parameter's units.
    """

    param_id: int
    short_name: str
    type_of_level: str
    level: float = 0.0
    statistic: str = ""
    window_hours: float = 0.0
    scale: float = 1.0


_PRESSURE = "isobaricInhPa"
#: Code table 4.10 (type of statistical processing).
_STATISTIC_CODES = {"average": 0, "accumulation": 1}
#: metres of water -> kg m-2 (density of water 1000 kg m-3)
_WATER_KG_PER_M = 1000.0

#: Canonical variable -> GRIB2 encoding. The one place where GRIB names and levels live.
GRIB_PARAMETERS: dict[str, GribParameter] = {
    "temperature": GribParameter(130, "t", _PRESSURE),
    "geopotential": GribParameter(129, "z", _PRESSURE),
    "geopotential_height": GribParameter(156, "gh", _PRESSURE),
    "u_component_of_wind": GribParameter(131, "u", _PRESSURE),
    "v_component_of_wind": GribParameter(132, "v", _PRESSURE),
    "vorticity": GribParameter(138, "vo", _PRESSURE),
    "divergence": GribParameter(155, "d", _PRESSURE),
    "vertical_velocity": GribParameter(135, "w", _PRESSURE),
    "specific_humidity": GribParameter(133, "q", _PRESSURE),
    "relative_humidity": GribParameter(157, "r", _PRESSURE),
    "specific_cloud_ice_water_content": GribParameter(247, "ciwc", _PRESSURE),
    "specific_cloud_liquid_water_content": GribParameter(246, "clwc", _PRESSURE),
    "2m_temperature": GribParameter(167, "2t", "heightAboveGround", 2),
    "2m_dewpoint_temperature": GribParameter(168, "2d", "heightAboveGround", 2),
    "10m_u_component_of_wind": GribParameter(165, "10u", "heightAboveGround", 10),
    "10m_v_component_of_wind": GribParameter(166, "10v", "heightAboveGround", 10),
    "mean_sea_level_pressure": GribParameter(151, "msl", "meanSea"),
    "surface_pressure": GribParameter(134, "sp", "surface"),
    "total_precipitation": GribParameter(228228, "tp", "surface", 0, "accumulation", 1,
                                         _WATER_KG_PER_M),
    "total_precipitation_6hr": GribParameter(228228, "tp", "surface", 0, "accumulation", 6,
                                             _WATER_KG_PER_M),
    "mean_total_precipitation_rate": GribParameter(235055, "avg_tprate", "surface", 0,
                                                   "average", 0),
    "sea_surface_temperature": GribParameter(34, "sst", "surface"),
    "sea_ice_cover": GribParameter(31, "ci", "surface"),
    "toa_incident_solar_radiation": GribParameter(212, "tisr", "nominalTop", 0, "accumulation",
                                                  1),
    "land_sea_mask": GribParameter(172, "lsm", "surface"),
    "geopotential_at_surface": GribParameter(129, "z", "surface"),
}


def import_eccodes() -> ModuleType:
    """The ecCodes Python bindings, or a :class:`ConfigError` saying how to install them."""
    try:
        import eccodes
    except (ImportError, RuntimeError) as error:  # RuntimeError: bindings without the library
        raise ConfigError(f"GRIB output needs ecCodes, which cannot be imported ({error})",
                          "install the GRIB extra: pip install 'weathermodel[grib]' (eccodes "
                          "and cfgrib), or choose --format zarr or netcdf") from error
    return eccodes


def grib_parameter(variable: str) -> GribParameter:
    """The GRIB2 encoding of ``variable``, or a :class:`ConfigError` naming it."""
    if variable not in GRIB_PARAMETERS:
        raise ConfigError(f"no GRIB2 encoding is known for '{variable}'",
                          "choose --format zarr or netcdf for this model, or add the variable "
                          "to GRIB_PARAMETERS in weathermodel/inference/grib.py",
                          variable=variable)
    return GRIB_PARAMETERS[variable]


def _grid_kind(latitude: np.ndarray, longitude: np.ndarray) -> str:
    """``regular_ll`` or ``regular_gg`` for a canonical (ascending) grid; others refused."""
    kind = describe_grid(latitude, longitude).kind
    if kind == "irregular" or longitude.size > 1 and not np.allclose(
            np.diff(longitude), np.diff(longitude)[0], rtol=1e-4, atol=1e-6):
        raise DataError("GRIB output needs a regular or Gaussian latitude-longitude grid with "
                        "equispaced longitudes; this grid has irregular spacing",
                        "choose --format zarr or netcdf")
    return {"regular": "regular_ll", "gaussian": "regular_gg"}[kind]


def check_grib_output(variables: Iterable[str], latitude: Any, longitude: Any) -> None:
    """Refuse, before anything is computed, a forecast that cannot be written as GRIB2:
    ecCodes missing, a variable without encoding, or an irregular grid."""
    import_eccodes()
    for variable in variables:
        grib_parameter(variable)
    _grid_kind(np.asarray(latitude, dtype="float64"), np.asarray(longitude, dtype="float64"))


def check_checkpoint_for_grib(checkpoint: str | Path) -> None:
    """:func:`check_grib_output` for the variables a checkpoint predicts and its grid."""
    metadata = ModelMetadata.from_dict(read_payload(checkpoint)["metadata"])
    check_grib_output(variable_layout(metadata), metadata.latitude, metadata.longitude)


def _grid_template(eccodes: ModuleType, latitude: np.ndarray, longitude: np.ndarray) -> Any:
    """A GRIB2 handle with the grid, packing and originating centre set (no data yet)."""
    kind = _grid_kind(latitude, longitude)
    handle = eccodes.codes_grib_new_from_samples(f"{kind}_sfc_grib2")
    eccodes.codes_set(handle, "centre", _CENTRE)
    keys: dict[str, Any] = {"Ni": longitude.size, "Nj": latitude.size,
                            "iScansNegatively": 0, "jScansPositively": 0,
                            "latitudeOfFirstGridPointInDegrees": float(latitude[-1]),
                            "latitudeOfLastGridPointInDegrees": float(latitude[0]),
                            "longitudeOfFirstGridPointInDegrees": float(longitude[0] % 360),
                            "longitudeOfLastGridPointInDegrees": float(longitude[-1] % 360),
                            "iDirectionIncrementInDegrees":
                                float(np.diff(longitude)[0]) if longitude.size > 1 else 0.0}
    if kind == "regular_ll":
        keys["jDirectionIncrementInDegrees"] = (float(np.diff(latitude)[0])
                                                if latitude.size > 1 else 0.0)
    else:
        keys["N"] = latitude.size // 2
    for key, value in keys.items():
        eccodes.codes_set(handle, key, value)
    eccodes.codes_set(handle, "packingType", "grid_simple")
    eccodes.codes_set(handle, "bitsPerValue", BITS_PER_VALUE)
    return handle


def _step_unit(hours: Iterable[float]) -> tuple[int, float]:
    """(``stepUnits`` code, hours per unit): hours (1) when every time is whole hours, else
    minutes (0) (WMO code table 4.4)."""
    whole = all(abs(h - round(h)) < 1e-9 for h in hours)
    return (1, 1.0) if whole else (0, 1 / 60)


def _parameter_template(eccodes: ModuleType, grid: Any, variable: str,
                        parameter: GribParameter, level: float | None, ensemble: bool) -> Any:
    """A copy of the grid handle with the product definition template, level and parameter
    keys of one variable and level set (made once, cloned for every message)."""
    statistical = bool(parameter.statistic)
    handle = eccodes.codes_clone(grid)
    template = (11 if statistical else 1) if ensemble else (8 if statistical else 0)
    eccodes.codes_set(handle, "productDefinitionTemplateNumber", template)
    type_of_level, value = parameter.type_of_level, parameter.level
    if level is not None:  # a pressure level (hPa); GRIB levels are integers
        type_of_level, value = ((_PRESSURE, level) if float(level).is_integer()
                                else ("isobaricInPa", level * 100))
    eccodes.codes_set(handle, "typeOfLevel", type_of_level)
    eccodes.codes_set(handle, "level", int(round(value)))
    if statistical:
        eccodes.codes_set(handle, "typeOfStatisticalProcessing",
                          _STATISTIC_CODES[parameter.statistic])
    eccodes.codes_set(handle, "paramId", parameter.param_id)
    decoded = eccodes.codes_get(handle, "shortName")
    if decoded != parameter.short_name:
        eccodes.codes_release(handle)
        raise ConfigError(f"GRIB_PARAMETERS maps '{variable}' to paramId {parameter.param_id}, "
                          f"which this ecCodes writes as '{decoded}', not "
                          f"'{parameter.short_name}'", "correct the table entry, or use the "
                          "ecCodes version the package requires", variable=variable)
    eccodes.codes_set(handle, "significanceOfReferenceTime", 1)  # start of forecast
    eccodes.codes_set(handle, "typeOfGeneratingProcess", 4 if ensemble else 2)
    return handle


def _set_time_and_member(eccodes: ModuleType, handle: Any, variable: str,
                         parameter: GribParameter, init: np.datetime64, lead_hours: float,
                         step_hours: float, member: int | None, n_members: int) -> None:
    """Start date, step (or statistical window) and ensemble keys of one message."""
    timestamp = np.datetime64(init, "m").astype(object)
    eccodes.codes_set(handle, "dataDate", int(timestamp.strftime("%Y%m%d")))
    eccodes.codes_set(handle, "dataTime", int(timestamp.strftime("%H%M")))
    # code table 1.4: 1 forecast, 3 control forecast, 4 perturbed forecast
    eccodes.codes_set(handle, "typeOfProcessedData",
                      1 if member is None else (3 if member == 0 else 4))
    if member is not None:  # code table 4.6: 0 unperturbed control, 3 perturbed
        eccodes.codes_set(handle, "typeOfEnsembleForecast", 0 if member == 0 else 3)
        eccodes.codes_set(handle, "perturbationNumber", member)
        eccodes.codes_set(handle, "numberOfForecastsInEnsemble", n_members)
    window = (parameter.window_hours or step_hours) if parameter.statistic else 0.0
    unit, hours_per_unit = _step_unit([lead_hours, window])
    eccodes.codes_set(handle, "stepUnits", unit)
    end = int(round(lead_hours / hours_per_unit))
    if not parameter.statistic:
        eccodes.codes_set(handle, "step", end)
        return
    start = end - int(round(window / hours_per_unit))
    if start < 0:
        raise DataError(f"'{variable}' at lead {lead_hours:g} h is a {window:g}-hour "
                        f"{parameter.statistic} that starts before the forecast does, which "
                        "GRIB2 cannot encode", "choose --format zarr or netcdf, or a model "
                        "whose time step is at least the window", variable=variable)
    eccodes.codes_set(handle, "startStep", start)
    eccodes.codes_set(handle, "endStep", end)


def _set_values(eccodes: ModuleType, handle: Any, field: np.ndarray, scale: float) -> None:
    """Rows north to south, missing values through the bitmap."""
    values = np.asarray(field, dtype="float64")[::-1].ravel() * scale
    missing = ~np.isfinite(values)
    if missing.any():
        eccodes.codes_set(handle, "bitmapPresent", 1)
        eccodes.codes_set(handle, "missingValue", _MISSING)
        values = np.where(missing, _MISSING, values)
    eccodes.codes_set_values(handle, values)


def _defined_levels(data: xr.DataArray) -> list[int]:
    """Indices of the levels a pressure-level variable has: those not entirely missing in its
    first field (the store holds NaN at levels a variable lacks)."""
    first = data.isel({dim: 0 for dim in data.dims
                       if dim not in (conventions.LEVEL, conventions.LATITUDE,
                                      conventions.LONGITUDE)}).values
    return [i for i in range(first.shape[0]) if np.isfinite(first[i]).any()]


def write_grib(dataset: xr.Dataset, path: str | Path) -> Path:
    """Write a forecast dataset (WeatherBench 2 layout, canonical names) as one GRIB2 file.

    Parameters
    ----------
    dataset : dims ``time`` (start dates, UTC), optional ``number`` (members),
        ``prediction_timedelta``, optional ``level`` (hPa), ``latitude`` (ascending, degrees
        north), ``longitude`` (degrees east); one variable per canonical name, canonical units.
        Read one field at a time (a lazily opened store stays out of memory).
    path : the GRIB2 file; written to a temporary name beside it, then renamed.

    Returns
    -------
    ``path``.

    Raises
    ------
    ConfigError : ecCodes missing, or a variable without a GRIB2 encoding.
    DataError : an irregular grid, or a statistical window that starts before the forecast.
    """
    eccodes = import_eccodes()
    path = Path(path)
    absent = [name for name in (conventions.TIME, "prediction_timedelta", conventions.LATITUDE,
                                conventions.LONGITUDE) if name not in dataset.coords]
    if absent:
        raise DataError(f"the dataset is not a forecast in the WeatherBench 2 layout: it lacks "
                        f"the coordinates {absent}", "pass a forecast store or a dataset with "
                        "dims time, prediction_timedelta, [level,] latitude, longitude",
                        path=str(path))
    variables = [name for name in dataset.data_vars
                 if conventions.LATITUDE in dataset[name].dims]
    for name in variables:
        grib_parameter(name)
    latitude = np.asarray(dataset[conventions.LATITUDE].values, dtype="float64")
    longitude = np.asarray(dataset[conventions.LONGITUDE].values, dtype="float64")
    inits = dataset[conventions.TIME].values.astype("datetime64[ns]")
    leads = dataset["prediction_timedelta"].values.astype("timedelta64[ns]")
    lead_hours = leads / np.timedelta64(1, "h")
    step_hours = float(lead_hours[0]) if lead_hours.size == 1 else float(np.diff(lead_hours)[0])
    has_members = conventions.MEMBER in dataset.dims
    members = list(range(dataset.sizes[conventions.MEMBER])) if has_members else [None]
    levels = (np.asarray(dataset[conventions.LEVEL].values, dtype="float64")
              if conventions.LEVEL in dataset.coords else np.array([]))
    level_indices = {name: _defined_levels(dataset[name]) for name in variables
                     if conventions.LEVEL in dataset[name].dims}
    grid = _grid_template(eccodes, latitude, longitude)
    templates: dict[tuple[str, float | None], Any] = {}  # (variable, level) -> handle
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as out:
            for t, init in enumerate(inits):
                for member in members:
                    for k, hours in enumerate(lead_hours):
                        where = {conventions.TIME: t, "prediction_timedelta": k,
                                 **({conventions.MEMBER: member} if has_members else {})}
                        for name in variables:
                            parameter = GRIB_PARAMETERS[name]
                            fields = dataset[name].isel(where).values
                            pairs = ([(float(levels[i]), fields[i]) for i in level_indices[name]]
                                     if name in level_indices else [(None, fields)])
                            for level, field in pairs:
                                if (name, level) not in templates:
                                    templates[name, level] = _parameter_template(
                                        eccodes, grid, name, parameter, level, has_members)
                                handle = eccodes.codes_clone(templates[name, level])
                                try:
                                    _set_time_and_member(eccodes, handle, name, parameter, init,
                                                         float(hours), step_hours, member,
                                                         len(members))
                                    _set_values(eccodes, handle, field, parameter.scale)
                                    eccodes.codes_write(handle, out)
                                finally:
                                    eccodes.codes_release(handle)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        for handle in [grid, *templates.values()]:
            eccodes.codes_release(handle)
        tmp.unlink(missing_ok=True)
    return path


def forecast_store_to_grib(store: str | Path, path: str | Path,
                           remove_store: bool = False) -> Path:
    """Convert a finished forecast store (:mod:`weathermodel.inference.output`) to one GRIB2
    file with :func:`write_grib`; with ``remove_store`` the store is deleted once the file is
    complete (as the netCDF conversion does)."""
    with xr.open_zarr(store, chunks=None) as dataset:  # reads one chunk per field, no dask
        write_grib(dataset, path)
    if remove_store:
        shutil.rmtree(store)
    return Path(path)

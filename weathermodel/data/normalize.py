"""The ingest edge: bring one opened source to the canonical form of :mod:`weathermodel.conventions`.

Each step checks before it converts. Conversions that are exact (Celsius to Kelvin, hPa to Pa,
geopotential height to geopotential, a flipped latitude axis, a -180..180 longitude axis) are
applied and returned in a log; anything ambiguous raises :class:`DataError` naming the file,
the variable and the fix.

What is left out, on purpose: CF cell-bounds variables (``time_bnds``, ``lat_bnds``...), names
that are not known variables, and variables the package computes itself (kind ``computed``,
e.g. ``tisr``); each is recorded in the notes. A source without any time axis is a file of
static fields (ERA5's ``static.nc``: surface geopotential ``z``, land-sea mask ``lsm``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from weathermodel import conventions
from weathermodel.data.config import SourceSpec, VariableSpec, parse_time, parse_timedelta
from weathermodel.errors import DataError
from weathermodel.units import GEOPOTENTIAL_FROM_HEIGHT, find_conversion, normalise_units

log = logging.getLogger(__name__)

_TIME_UNITS = re.compile(r"^\s*(\w+)\s+since\s+(.+?)\s*(\(.*\))?\s*$")


@dataclass
class CanonicalSource:
    """One source in canonical form: a DataArray per canonical variable.

    Each array has dims ``(time, number, [level,] latitude, longitude)``, float32, lazily
    loaded. ``notes`` lists every conversion applied, for the store's provenance.
    """

    path: str
    variables: dict[str, xr.DataArray]
    notes: list[str] = field(default_factory=list)
    #: time-invariant fields (kind ``static``), dims ``(latitude, longitude)``, float32
    statics: dict[str, xr.DataArray] = field(default_factory=dict)
    #: names of the source's data variables that were not ingested (unknown or computed)
    skipped: list[str] = field(default_factory=list)

    def any_field(self) -> xr.DataArray | None:
        """One ingested field (time-varying first), to read the grid from; None if none."""
        return next(iter(self.variables.values()), next(iter(self.statics.values()), None))


# --------------------------------------------------------------------------------------------
# time
# --------------------------------------------------------------------------------------------
def _decode_numeric_time(values: np.ndarray, units: str, path: str, name: str) -> np.ndarray:
    match = _TIME_UNITS.match(units)
    if not match:
        raise DataError(f"time coordinate '{name}' has units {units!r}, not '<unit> since <date>'",
                        "give the time units as e.g. 'hours since 1940-01-01'", path=path)
    unit, reference = match.group(1).lower(), match.group(2)
    step = {"seconds": "s", "second": "s", "minutes": "min", "minute": "min", "hours": "h",
            "hour": "h", "days": "D", "day": "D"}.get(unit)
    if step is None:
        raise DataError(f"time unit '{unit}' of '{name}' is not supported",
                        "use seconds, minutes, hours or days", path=path)
    origin = parse_time(reference.replace("_", " "), f"reference time of '{name}'")
    return (origin + pd.to_timedelta(np.asarray(values, dtype="int64"), unit=step)).values


def _time_dimension(ds: xr.Dataset) -> str | None:
    for name in conventions.DIMENSION_ALIASES[conventions.TIME]:
        if name in ds.dims:
            return name
    return None


def has_time_axis(ds: xr.Dataset, spec: SourceSpec) -> bool:
    """Whether :func:`decode_time` can give the source a time: a time dimension, a scalar
    datetime ``time`` coordinate, or an ``assume_time`` in the spec."""
    if _time_dimension(ds) is not None or spec.assume_time is not None:
        return True
    scalar = ds.coords.get("time")
    return scalar is not None and scalar.ndim == 0 and np.issubdtype(scalar.dtype, np.datetime64)


def decode_time(ds: xr.Dataset, spec: SourceSpec, path: str, notes: list[str]) -> xr.Dataset:
    """Give the dataset a ``time`` dimension of UTC valid times (datetime64[ns]).

    Handles CF times (already decoded), integer offsets with units in the variable's or the
    dataset's attributes, a char ``reftime`` plus integer ``timestep``, forecast-style
    ``time x step`` sources (flattened to valid times or one step selected), a scalar time,
    and time-less sources given ``assume_time``.
    """
    if "step" in ds.dims and "time" in ds.dims:
        if spec.forecast_step is not None:
            step = parse_timedelta(spec.forecast_step, "forecast_step")
            if step not in pd.to_timedelta(ds["step"].values):
                raise DataError(f"forecast step {spec.forecast_step} is not in the file (steps: "
                                f"{list(pd.to_timedelta(ds['step'].values).astype(str))})",
                                "choose one of the steps the file has", path=path)
            ds = ds.sel(step=step.to_timedelta64())
            notes.append(f"{path}: kept forecast step {spec.forecast_step}")
        else:
            valid = ds["time"] + ds["step"]
            ds = ds.assign_coords(valid_time=valid).stack(sample=("time", "step"))
            ds = ds.drop_vars(["sample", "time", "step"]).rename({"sample": "time"})
            ds = ds.assign_coords(time=ds["valid_time"].values).drop_vars("valid_time")
            if pd.Index(ds["time"].values).has_duplicates:
                raise DataError("forecast start times and steps give duplicated valid times",
                                "choose one step with forecast_step (e.g. 0h)", path=path)
            ds = ds.sortby("time")
            notes.append(f"{path}: flattened (start time, step) to valid time")
    if "valid_time" in ds.coords and "time" in ds.dims and ds["valid_time"].dims == ("time",):
        ds = ds.assign_coords(time=ds["valid_time"].values).drop_vars("valid_time")
    for extra in ("valid_time", "step"):
        if extra in ds.coords and extra not in ds.dims:
            ds = ds.drop_vars(extra)

    name = _time_dimension(ds)
    if name is None:
        scalar = ds.coords.get("time")
        if scalar is not None and scalar.ndim == 0 and np.issubdtype(scalar.dtype, np.datetime64):
            return ds.expand_dims(time=[scalar.values])
        if spec.assume_time is not None:
            stamp = parse_time(spec.assume_time, "assume_time")
            notes.append(f"{path}: no time axis; assumed time {stamp}")
            return ds.drop_vars("time", errors="ignore").expand_dims(time=[stamp.to_datetime64()])
        raise DataError(f"the source has no time dimension (dimensions: {sorted(map(str, ds.dims))})",
                        "give the source an assume_time (one state); select one value of any "
                        "other leading dimension with select: {DIM: VALUE}", path=path)

    values = ds[name].values
    if not np.issubdtype(values.dtype, np.datetime64):
        units = ds[name].attrs.get("units") or spec_time_units(ds, name, spec.time_units)
        if units is None:
            raise DataError(f"time coordinate '{name}' is numeric with no units, and no "
                            "reference time is given",
                            "set time_units in the source spec ('hours' when the file has a "
                            "reftime variable, else e.g. 'hours since 1996-01-05')", path=path)
        values = _decode_numeric_time(values, units, path, name)
        notes.append(f"{path}: decoded non-CF time '{name}' with units {units!r}")
        ds = ds.drop_vars([v for v in ("reftime",) if v in ds.variables])
    if name != conventions.TIME:
        ds = ds.drop_vars(name).rename({name: conventions.TIME})
    return ds.assign_coords(time=pd.DatetimeIndex(values).as_unit("ns").values)


def spec_time_units(ds: xr.Dataset, name: str, declared: str | None) -> str | None:
    """Time units found outside the CF place: the source spec, dataset attributes, or a unit
    declared in the spec combined with a ``reftime`` variable."""
    if declared and "since" in declared:
        return declared
    for key in ("time_units", f"{name}_units", "units"):
        if key in ds.attrs:
            return str(ds.attrs[key])
    if "reftime" in ds.variables:
        raw = ds["reftime"].values
        text = raw.item().decode() if isinstance(raw.item(), bytes) else str(raw.item())
        if declared is None:
            return None
        return f"{declared} since {text.strip().replace(' ', '-', 2)}"
    return None


# --------------------------------------------------------------------------------------------
# dimensions and grid
# --------------------------------------------------------------------------------------------
#: Dimensions that only CF cell-bounds variables have (CDO, NCO, CMOR, xESMF spellings).
BOUNDS_DIMENSIONS = ("nv", "nv2", "nb2", "nbnd", "nbnds", "bnds", "bnd", "bounds", "vertices",
                     "nvertex")


def drop_bounds(ds: xr.Dataset, path: str, notes: list[str]) -> xr.Dataset:
    """Drop CF cell-bounds variables: those a coordinate names in its ``bounds`` (or
    ``climatology``) attribute, and any variable with a bounds dimension (``nv``, ``bnds``...).

    Cell bounds describe the grid, they are not data; left in, their extra dimension would make
    the whole source refused.
    """
    named = set()
    for variable in ds.variables.values():
        for key in ("bounds", "climatology"):
            value = variable.attrs.get(key, variable.encoding.get(key))
            if isinstance(value, str):
                named.add(value)
    drop = sorted(str(name) for name, variable in ds.variables.items()
                  if name in named or any(d in BOUNDS_DIMENSIONS for d in variable.dims))
    if not drop:
        return ds
    notes.append(f"{path}: ignored cell-bounds variable(s) {drop}")
    return ds.drop_vars(drop)


def rename_dimensions(ds: xr.Dataset, spec: SourceSpec, path: str) -> xr.Dataset:
    """Rename aliased dims to canonical names, select or squeeze the others."""
    for canonical in (conventions.MEMBER, conventions.LEVEL, conventions.LATITUDE, conventions.LONGITUDE):
        for alias in conventions.DIMENSION_ALIASES[canonical]:
            if alias in ds.dims and alias != canonical:
                if canonical in ds.dims:
                    raise DataError(f"both '{alias}' and '{canonical}' dimensions are present",
                                    "drop one of them before ingest", path=path)
                ds = ds.rename({alias: canonical})
                break
    for name, value in spec.select.items():
        if name not in ds.dims:
            raise DataError(f"select names dimension '{name}', which the source does not have "
                            f"(dimensions: {sorted(ds.dims)})", "fix the select option", path=path)
        ds = ds.sel({name: value}).drop_vars(name, errors="ignore")
    for name in list(ds.dims):
        if name in conventions.CANONICAL_DIMS:
            continue
        if ds.sizes[name] == 1:
            ds = ds.squeeze(name, drop=True)
            continue
        values = ds[name].values.tolist() if name in ds.coords else list(range(ds.sizes[name]))
        raise DataError(f"dimension '{name}' (size {ds.sizes[name]}) is not a time, level, "
                        "member or grid dimension",
                        f"pick one value with select: {{{name}: VALUE}} in the source spec "
                        f"(values: {values[:10]})", path=path)
    return ds


def _check_monotonic(values: np.ndarray, name: str, path: str) -> None:
    steps = np.diff(values)
    if values.size > 1 and not (np.all(steps > 0) or np.all(steps < 0)):
        bad = int(np.argmax(np.sign(steps) != np.sign(steps[0])))
        raise DataError(f"coordinate '{name}' is not strictly monotonic (at index {bad + 1}: "
                        f"{values[bad]} then {values[bad + 1]})",
                        f"sort the data by {name} and remove duplicated {name} values", path=path)


def _longitude_convention(lon360: np.ndarray) -> str:
    """'0..360' unless the points only form a contiguous region across the prime meridian."""
    ordered = np.sort(lon360)
    if ordered.size < 2:
        return "0..360"
    gaps = np.diff(np.concatenate([ordered, [ordered[0] + 360.0]]))
    return "0..360" if gaps[-1] >= gaps.max() - 1e-6 else "-180..180"


def normalise_grid(ds: xr.Dataset, path: str, notes: list[str]) -> xr.Dataset:
    """Latitude ascending in [-90, 90]; longitude ascending in the convention that keeps the
    region contiguous (see :mod:`weathermodel.conventions`)."""
    for name in (conventions.LATITUDE, conventions.LONGITUDE):
        if name not in ds.dims:
            raise DataError(f"no '{name}' dimension (dimensions: {sorted(ds.dims)})",
                            "only latitude-longitude grids are supported; regrid first", path=path)
        if ds[name].ndim != 1:
            raise DataError(f"'{name}' is not a 1-D coordinate (curvilinear grid)",
                            "regrid to a latitude-longitude grid first", path=path)
    lat = ds[conventions.LATITUDE].values.astype("float64")
    _check_monotonic(lat, conventions.LATITUDE, path)
    if lat.min() < -90.0001 or lat.max() > 90.0001:
        raise DataError(f"latitudes outside [-90, 90] (from {lat.min()} to {lat.max()})",
                        "check the latitude coordinate", path=path)
    if lat[0] > lat[-1]:
        ds = ds.isel({conventions.LATITUDE: slice(None, None, -1)})
        notes.append(f"{path}: flipped latitude to ascending")
    lon = ds[conventions.LONGITUDE].values.astype("float64")
    lon360 = np.mod(lon, 360.0)
    # a source may wrap once, as stored (180..359, 0..179 of a global grid; 350..357.5, 0..2
    # of a region across the prime meridian): unwrapped, the axis must then be monotonic
    unwrapped = np.unwrap(lon360, period=360.0)
    _check_monotonic(unwrapped, conventions.LONGITUDE, path)
    if np.ptp(unwrapped) > 360.0 + 1e-6:
        raise DataError(f"longitudes go round the globe more than once ({lon[0]:g} .. "
                        f"{lon[-1]:g}, {lon.size} points)",
                        "keep one turn of longitudes (drop the repeated columns)", path=path)
    convention = _longitude_convention(lon360)
    new_lon = lon360 if convention == "0..360" else np.mod(lon360 + 180.0, 360.0) - 180.0
    if np.unique(np.round(new_lon, 6)).size != new_lon.size:
        keep = np.unique(np.round(new_lon, 6), return_index=True)[1]
        ds, new_lon = ds.isel({conventions.LONGITUDE: np.sort(keep)}), new_lon[np.sort(keep)]
        notes.append(f"{path}: dropped a duplicated longitude column (e.g. 0 and 360)")
    if not np.allclose(new_lon, lon):
        notes.append(f"{path}: longitude converted to {convention}")
    ds = ds.assign_coords({conventions.LONGITUDE: new_lon}).sortby(conventions.LONGITUDE)
    return ds.assign_coords({conventions.LATITUDE: ds[conventions.LATITUDE].values.astype("float64")})


def normalise_levels(ds: xr.Dataset, original_name: str | None, path: str,
                     notes: list[str]) -> xr.Dataset:
    """Pressure levels in hPa, whatever the file used."""
    if conventions.LEVEL not in ds.dims:
        return ds
    units = ds[conventions.LEVEL].attrs.get("units") if conventions.LEVEL in ds.coords else None
    values = ds[conventions.LEVEL].values.astype("float64")
    if units is None and original_name == "isobaricInPa":
        units = "Pa"
    if units is None:
        if values.max() > 1100:
            raise DataError(f"level values up to {values.max()} with no units attribute",
                            "add units (Pa or hPa) to the level coordinate", path=path)
        units = "hPa"
        notes.append(f"{path}: level has no units; values <= 1100 read as hPa")
    normalised = normalise_units(str(units))
    if normalised == "Pa":
        values = values / 100.0
        notes.append(f"{path}: levels converted from Pa to hPa")
    elif normalised != "hPa":
        raise DataError(f"level units {units!r} are not pressure (Pa or hPa)",
                        "only pressure levels are supported", path=path)
    return ds.assign_coords({conventions.LEVEL: values}).sortby(conventions.LEVEL)


def _original_level_name(ds: xr.Dataset) -> str | None:
    return next((a for a in conventions.DIMENSION_ALIASES[conventions.LEVEL] if a in ds.dims), None)


# --------------------------------------------------------------------------------------------
# variables and units
# --------------------------------------------------------------------------------------------
_ACCUMULATION_PERIOD = re.compile(r".+_\d+hr")


def _identify(name: str, array: xr.DataArray) -> conventions.VariableInfo | None:
    """The canonical variable of a source variable, by name, GRIB short name or alias; the
    level dimension (under any of its names) tells ``z`` (geopotential) from ``z`` (surface
    geopotential)."""
    has_levels = any(dim in conventions.DIMENSION_ALIASES[conventions.LEVEL] for dim in array.dims)
    candidates = [name, array.attrs.get("GRIB_shortName"), array.attrs.get("short_name")]
    if _ACCUMULATION_PERIOD.fullmatch(name):
        # WB2 tags total_precipitation_24hr with ERA5's short name 'tp' (an hourly amount):
        # a name stating another accumulation period is identified by its name only
        candidates = [name]
    for candidate in candidates:
        if candidate:
            info = conventions.lookup_variable(str(candidate), has_levels)
            if info is not None:
                return info
    return None


def _plausibility_hint(info: conventions.VariableInfo, mean: float) -> str:
    if info.units == "K" and -90.0 < mean < 60.0:
        return " The values look like degrees Celsius."
    if info.units == "Pa" and 850.0 < mean < 1100.0:
        return " The values look like hPa."
    if info.units == "m2 s-2" and 0 < mean < 4.0e4 and info.name == "geopotential":
        return " The values look like geopotential height in m."
    return ""


def _standard_height(level_hpa: np.ndarray) -> np.ndarray:
    """Height (m) of a pressure level in the ICAO standard atmosphere (troposphere formula)."""
    return 44330.8 * (1.0 - (level_hpa / 1013.25) ** 0.190263)


def check_plausible(array: xr.DataArray, info: conventions.VariableInfo, path: str) -> None:
    """Refuse values that cannot be ``info`` in canonical units (wrong units, garbage).

    Checks the first time step only, so it stays cheap for long records.
    """
    sample = array.isel({d: 0 for d in (conventions.TIME, conventions.MEMBER) if d in array.dims})
    sample = sample.values.astype("float64")
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return  # all missing: the missing-value check reports it
    low, high = info.plausible_range
    outside = float(np.mean((finite < low) | (finite > high)))
    mean = float(finite.mean())
    if outside > 0.01:
        raise DataError(
            f"{outside:.0%} of the values at the first time are outside the plausible range "
            f"[{low:g}, {high:g}] {info.units} of '{info.name}' (mean {mean:.4g})."
            + _plausibility_hint(info, mean),
            "check the units: set the correct units in the source spec "
            f"(variables: {{{array.name}: {{name: {info.name}, units: ...}}}})",
            path=path, variable=str(array.name))
    if info.name == "geopotential" and conventions.LEVEL in array.dims:
        level_means = np.nanmean(sample.reshape(sample.shape[0], -1), axis=1)
        expected = _standard_height(array[conventions.LEVEL].values) * conventions.STANDARD_GRAVITY
        looks_like_height = np.abs(level_means - expected / conventions.STANDARD_GRAVITY) < np.abs(
            level_means - expected)
        if np.any(looks_like_height & (expected > 5000.0)):
            raise DataError(
                "values are about g times smaller than geopotential at their levels: they look "
                "like geopotential height (m), not geopotential (m2 s-2)",
                "declare units: m (geopotential height) for this variable so it is converted, "
                "or give the variable as geopotential_height", path=path,
                variable=str(array.name))


def _convert_units(array: xr.DataArray, spec: VariableSpec | None, info: conventions.VariableInfo,
                   path: str, source_name: str, notes: list[str]) -> tuple[xr.DataArray,
                                                                           conventions.VariableInfo]:
    file_units = array.attrs.get("units") or array.attrs.get("GRIB_units")
    units = spec.units if spec is not None and spec.units else file_units
    if spec is not None and spec.units and file_units and \
            normalise_units(spec.units) != normalise_units(str(file_units)):
        notes.append(f"{path}: {source_name}: units {spec.units!r} from the config override the "
                     f"file's {file_units!r}")
    if units is None:
        raise DataError(
            "no units attribute; units are checked, not guessed",
            f"declare them in the source spec: variables: {{{source_name}: {{name: {info.name}, "
            f"units: {info.units}}}}}", path=path, variable=source_name)
    target = info
    if info.name == "geopotential_height" or (
            info.name == "geopotential" and normalise_units(str(units)) in ("m", "dam")):
        target = conventions.VARIABLES["geopotential"]
    conversion = find_conversion(str(units), target.units)
    if conversion is None:
        raise DataError(f"units {units!r} cannot be converted to {target.units!r}, the units of "
                        f"'{target.name}'",
                        f"convert the data to {target.units}, or declare the right units in the "
                        "source spec", path=path, variable=source_name)
    if conversion.scale != 1.0 or conversion.offset != 0.0:
        array = array * conversion.scale + conversion.offset
        notes.append(f"{path}: {source_name} -> {target.name}: {conversion.description}")
        if conversion is GEOPOTENTIAL_FROM_HEIGHT or target is not info:
            log.info("%s: %s converted to geopotential", path, source_name)
    return array, target


def _refuse_time_dependent_fields(ds: xr.Dataset, spec: SourceSpec, path: str) -> None:
    """A source with no time axis may hold static fields only (ERA5's ``static.nc``)."""
    dynamic = []
    for name in map(str, ds.data_vars):
        if spec.variables:
            info = conventions.VARIABLES[spec.variables[name].name] if name in spec.variables else None
        else:
            info = _identify(name, ds[name])
        if info is not None and info.kind not in ("static", "computed"):
            dynamic.append(name)
    if dynamic:
        raise DataError(f"the source has no time dimension (dimensions: "
                        f"{sorted(map(str, ds.dims))}), and {dynamic} are not static fields",
                        "give the source an assume_time (one state); select one value of any "
                        "other leading dimension with select: {DIM: VALUE}", path=path)


def _note_experiment_versions(ds: xr.Dataset, path: str, notes: list[str]) -> xr.Dataset:
    """Record which times come from which ERA5 experiment version, then drop ``expver``.

    ERA5 downloads mix final ERA5 (``0001``) with preliminary ERA5T (``0005``) for the last
    months; ERA5T is replaced by final data about two to three months later.
    """
    expver = ds.coords.get("expver")
    if expver is None or expver.dims != (conventions.TIME,):
        return ds
    versions = np.asarray(expver.values).astype(str)
    times = pd.DatetimeIndex(ds[conventions.TIME].values)
    parts = []
    for version in dict.fromkeys(versions):
        where = times[versions == version]
        parts.append(f"{version} for {where.size} step(s) from {where[0]} to {where[-1]}")
    notes.append(f"{path}: expver (ERA5 experiment version) {'; '.join(parts)}"
                 + ("; 0005 is preliminary ERA5T" if "0005" in versions else ""))
    return ds.drop_vars("expver")


def _choose_variables(ds: xr.Dataset, spec: SourceSpec, path: str, notes: list[str],
                      skipped: list[str]) -> dict[str, tuple[VariableSpec | None,
                                                             conventions.VariableInfo]]:
    """The source variables to ingest, with their spec and canonical variable.

    Without a mapping in the spec, every variable whose name or alias is known; unknown names
    are skipped. Variables the package computes itself (kind ``computed``) are skipped either
    way, with a note.
    """
    if spec.variables:
        missing = [name for name in spec.variables if name not in ds.data_vars]
        if missing:
            raise DataError(f"variable(s) {missing} not found (the file has "
                            f"{sorted(map(str, ds.data_vars))})",
                            "fix the names under 'variables' in the source spec",
                            path=path, variable=missing[0])
        candidates = {name: (spec.variables[name], conventions.VARIABLES[spec.variables[name].name])
                      for name in spec.variables}
    else:
        candidates = {}
        for name in map(str, ds.data_vars):
            info = _identify(name, ds[name])
            if info is None:
                log.info("%s: skipping variable '%s' (not a known variable)", path, name)
                skipped.append(name)
                continue
            candidates[name] = (None, info)
    chosen = {}
    for name, (var_spec, info) in candidates.items():
        if info.kind == "computed":
            note = (f"{path}: skipped '{name}' ({info.name}): it is computed by weathermodel "
                    "as a forcing, not read from sources")
            log.info(note)
            notes.append(note)
            skipped.append(name)
            continue
        chosen[name] = (var_spec, info)
    return chosen


def _attach_level(array: xr.DataArray, var_spec: VariableSpec | None, info: conventions.VariableInfo,
                  path: str, source_name: str) -> xr.DataArray:
    """Give a field the level its spec names, and check levels against the variable."""
    if var_spec is not None and var_spec.level is not None:
        if conventions.LEVEL in array.dims:
            raise DataError("a level is given in the config but the variable has levels",
                            "remove 'level' from its spec", path=path, variable=source_name)
        array = array.expand_dims({conventions.LEVEL: [float(var_spec.level)]},
                                  axis=array.dims.index(conventions.LATITUDE))
    if info.has_levels and conventions.LEVEL not in array.dims:
        raise DataError(f"'{info.name}' is a pressure-level variable but this field has no "
                        "level", "give its level in the source spec (level: 500)",
                        path=path, variable=source_name)
    if not info.has_levels and conventions.LEVEL in array.dims:
        raise DataError(f"'{info.name}' is a single-level variable but this field has "
                        "levels", "map it to the pressure-level variable instead",
                        path=path, variable=source_name)
    return array


def to_canonical(ds: xr.Dataset, spec: SourceSpec, path: str) -> CanonicalSource:
    """Convert one opened dataset to canonical variables (see module docstring).

    Time-varying fields go to ``variables`` with dims ``(time, number, [level,] latitude,
    longitude)``; static fields (kind ``static``: land-sea mask, surface geopotential, i.e.
    ``z`` without levels) to ``statics`` with dims ``(latitude, longitude)``, the first time
    and member of a source that has them. A source with no time axis (and no
    ``assume_time``) may hold static fields only.
    """
    notes: list[str] = []
    skipped: list[str] = []
    level_name = _original_level_name(ds)
    ds = drop_bounds(ds, path, notes)
    timed = has_time_axis(ds, spec)
    if timed:
        ds = decode_time(ds, spec, path, notes)
        ds = _note_experiment_versions(ds, path, notes)
    else:
        _refuse_time_dependent_fields(ds, spec, path)
        notes.append(f"{path}: no time axis; read as static fields")
    ds = rename_dimensions(ds, spec, path)
    ds = normalise_grid(ds, path, notes)
    ds = normalise_levels(ds, level_name, path, notes)
    if conventions.MEMBER in ds.coords and conventions.MEMBER not in ds.dims:
        ds = ds.drop_vars(conventions.MEMBER)
    if timed and conventions.MEMBER not in ds.dims:
        ds = ds.expand_dims({conventions.MEMBER: [0]}, axis=1)

    variables: dict[str, xr.DataArray] = {}
    statics: dict[str, xr.DataArray] = {}
    for source_name, (var_spec, info) in _choose_variables(ds, spec, path, notes,
                                                           skipped).items():
        array = ds[source_name]
        if conventions.LATITUDE not in array.dims or conventions.LONGITUDE not in array.dims:
            raise DataError(f"variable has dims {array.dims}, not a latitude-longitude field",
                            "drop it from the source spec", path=path, variable=source_name)
        if info.kind == "static":  # time-invariant: the first time and member
            array = array.isel({d: 0 for d in (conventions.TIME, conventions.MEMBER) if d in array.dims},
                               drop=True)
        elif conventions.TIME not in array.dims:
            raise DataError(f"'{info.name}' has no time dimension, but it is not a static "
                            "field", "give the variable a time axis, or map it to a static "
                            "variable", path=path, variable=source_name)
        elif conventions.MEMBER not in array.dims:
            array = array.expand_dims({conventions.MEMBER: ds[conventions.MEMBER].values[:1]}, axis=1)
        array = _attach_level(array, var_spec, info, path, source_name)
        order = [d for d in (conventions.TIME, conventions.MEMBER, conventions.LEVEL, conventions.LATITUDE, conventions.LONGITUDE)
                 if d in array.dims]
        array = array.transpose(*order)
        array, target = _convert_units(array, var_spec, info, path, source_name, notes)
        array = array.astype("float32")
        array.name = source_name
        check_plausible(array, target, path)
        destination = statics if target.kind == "static" else variables
        if target.name in destination:
            raise DataError(f"two variables of the source map to '{target.name}'",
                            "map only one of them in the source spec", path=path,
                            variable=source_name)
        array = array.rename(target.name).drop_attrs()
        if target.kind == "static":
            array = array.reset_coords(drop=True)
        destination[target.name] = array
    return CanonicalSource(path=path, variables=variables, notes=notes, statics=statics,
                           skipped=skipped)

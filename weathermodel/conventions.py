"""Canonical names, dimensions and units used everywhere inside ``weathermodel``.

Every source is converted to these conventions once, at ingest (``weathermodel.data``), and
every output is written with them; no other module renames or converts.

Canonical form
--------------
* Dimensions: ``time`` (valid time, UTC, ``datetime64[ns]``), ``number`` (ensemble member,
  size 1 for deterministic data), ``level`` (pressure level in hPa), ``latitude`` (degrees north,
  **ascending**), ``longitude`` (degrees east, ascending, in ``[0, 360)`` unless the region
  crosses the prime meridian, then in ``[-180, 180)``).
* Variables: WeatherBench 2 / ARCO-ERA5 long names (``2m_temperature``, ``geopotential``, ...)
  in SI units (K, Pa, m2 s-2, m s-1, kg kg-1, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

TIME = "time"
MEMBER = "number"
LEVEL = "level"
LATITUDE = "latitude"
LONGITUDE = "longitude"
CHANNEL = "channel"
CANONICAL_DIMS = (TIME, MEMBER, LEVEL, LATITUDE, LONGITUDE)

#: Standard gravity (m s-2), WMO value, used for geopotential <-> geopotential height.
STANDARD_GRAVITY = 9.80665

#: Names under which real files carry each canonical dimension.
DIMENSION_ALIASES: dict[str, tuple[str, ...]] = {
    TIME: ("time", "valid_time", "time_index", "timestep", "t", "Time", "date"),
    MEMBER: ("number", "member", "ensemble", "realization", "ensemble_member"),
    LEVEL: ("level", "isobaricInhPa", "pressure_level", "plev", "lev", "pressure", "isobaricInPa"),
    LATITUDE: ("latitude", "lat", "nav_lat", "y_lat", "Latitude"),
    LONGITUDE: ("longitude", "lon", "nav_lon", "x_lon", "Longitude"),
}


@dataclass(frozen=True)
class VariableInfo:
    """One canonical variable.

    Attributes
    ----------
    name : WeatherBench 2 long name (the canonical name).
    standard_name : CF standard name ("" where CF has none).
    units : canonical units, in the normalised spelling of :mod:`weathermodel.units`.
    has_levels : True for variables on pressure levels, False for single-level fields.
    aliases : short names found in real files (ECMWF paramId short names, CMIP, NCEP).
    plausible_range : (low, high) in canonical units; a source whose values fall outside is
        refused, because that almost always means wrong units.
    kind : the variable's default role (Anemoi's variable roles; a training config overrides
        them per variable):

        * ``"state"``: prognostic, an input and a predicted output fed back in the rollout;
        * ``"forcing"``: read from the data, an input only, never predicted (e.g. sea surface
          temperature, Anemoi's ``forcing:``);
        * ``"diagnostic"``: predicted, never an input (e.g. precipitation, Anemoi's
          ``diagnostic:``);
        * ``"computed"``: a forcing the package computes itself (TOA incident radiation); a
          source's copy is not ingested;
        * ``"static"``: time-invariant, stored with the statics.
    """

    name: str
    standard_name: str
    units: str
    has_levels: bool
    aliases: tuple[str, ...] = ()
    plausible_range: tuple[float, float] = (-float("inf"), float("inf"))
    kind: str = "state"
    long_name: str = field(default="")


_VARIABLES: tuple[VariableInfo, ...] = (
    VariableInfo("temperature", "air_temperature", "K", True, ("t", "ta", "air", "T", "temp"),
                 (150.0, 350.0)),
    VariableInfo("geopotential", "geopotential", "m2 s-2", True, ("z", "phi", "geopot"),
                 (-5.0e3, 5.0e5)),
    VariableInfo("geopotential_height", "geopotential_height", "m", True, ("gh", "zg", "hgt"),
                 (-600.0, 5.0e4)),
    VariableInfo("u_component_of_wind", "eastward_wind", "m s-1", True, ("u", "ua", "uwnd", "U"),
                 (-250.0, 250.0)),
    VariableInfo("v_component_of_wind", "northward_wind", "m s-1", True, ("v", "va", "vwnd", "V"),
                 (-250.0, 250.0)),
    VariableInfo("vorticity", "atmosphere_relative_vorticity", "s-1", True, ("vo", "vor", "rv"),
                 (-0.02, 0.02)),
    VariableInfo("divergence", "divergence_of_wind", "s-1", True, ("d", "div"), (-0.02, 0.02)),
    VariableInfo("vertical_velocity", "lagrangian_tendency_of_air_pressure", "Pa s-1", True,
                 ("w", "wap", "omega"), (-50.0, 50.0)),
    VariableInfo("specific_humidity", "specific_humidity", "kg kg-1", True, ("q", "hus", "shum"),
                 (-1e-3, 0.1)),
    VariableInfo("relative_humidity", "relative_humidity", "%", True, ("r", "hur", "rh", "rhum"),
                 (-5.0, 200.0)),
    VariableInfo("specific_cloud_ice_water_content", "", "kg kg-1", True, ("ciwc",), (-1e-3, 0.1)),
    VariableInfo("specific_cloud_liquid_water_content", "", "kg kg-1", True, ("clwc",),
                 (-1e-3, 0.1)),
    VariableInfo("2m_temperature", "air_temperature", "K", False, ("t2m", "2t", "tas", "air"),
                 (150.0, 350.0)),
    VariableInfo("2m_dewpoint_temperature", "dew_point_temperature", "K", False, ("d2m", "2d"),
                 (150.0, 350.0)),
    VariableInfo("10m_u_component_of_wind", "eastward_wind", "m s-1", False,
                 ("u10", "10u", "uas"), (-150.0, 150.0)),
    VariableInfo("10m_v_component_of_wind", "northward_wind", "m s-1", False,
                 ("v10", "10v", "vas"), (-150.0, 150.0)),
    VariableInfo("mean_sea_level_pressure", "air_pressure_at_mean_sea_level", "Pa", False,
                 ("msl", "mslp", "psl", "prmsl", "slp"), (8.5e4, 1.1e5)),
    VariableInfo("surface_pressure", "surface_air_pressure", "Pa", False, ("sp", "ps"),
                 (4.0e4, 1.1e5)),
    VariableInfo("total_precipitation", "precipitation_amount", "m", False, ("tp",),
                 (-1e-3, 1.0), kind="diagnostic"),
    VariableInfo("total_precipitation_6hr", "precipitation_amount", "m", False, ("tp6",),
                 (-1e-3, 1.0), kind="diagnostic"),
    VariableInfo("mean_total_precipitation_rate", "precipitation_flux", "kg m-2 s-1", False,
                 ("tprate", "mtpr", "pr"), (-1e-4, 0.1), kind="diagnostic"),
    VariableInfo("sea_surface_temperature", "sea_surface_temperature", "K", False,
                 ("sst", "tos"), (260.0, 320.0), kind="forcing"),
    VariableInfo("sea_ice_cover", "sea_ice_area_fraction", "1", False, ("siconc", "ci"),
                 (0.0, 1.0), kind="forcing"),
    VariableInfo("toa_incident_solar_radiation", "toa_incoming_shortwave_flux", "J m-2", False,
                 ("tisr",), (0.0, 5.5e6), kind="computed"),
    VariableInfo("land_sea_mask", "land_binary_mask", "1", False, ("lsm", "sftlf", "land"),
                 (0.0, 1.0), kind="static"),
    VariableInfo("geopotential_at_surface", "surface_geopotential", "m2 s-2", False,
                 ("z", "orography", "orog", "zs"), (-5.0e3, 1.0e5), kind="static"),
)

VARIABLES: dict[str, VariableInfo] = {info.name: info for info in _VARIABLES}

#: Computed forcings (time-dependent) stored beside the state, in this channel order.
FORCING_NAMES: tuple[str, ...] = (
    "toa_incident_solar_radiation",
    "sin_local_time",
    "cos_local_time",
    "sin_year_progress",
    "cos_year_progress",
)
#: Static channels computed from the grid, in this order; source statics are appended after.
GRID_STATIC_NAMES: tuple[str, ...] = (
    "sin_latitude",
    "cos_latitude",
    "sin_longitude",
    "cos_longitude",
)


#: Roles of the channels a model sees (see :class:`VariableInfo`): prognostic (in and out),
#: forcing (in only) and diagnostic (out only).
PROGNOSTIC, FORCING, DIAGNOSTIC = "prognostic", "forcing", "diagnostic"
_DEFAULT_ROLE = {"state": PROGNOSTIC, "forcing": FORCING, "diagnostic": DIAGNOSTIC}


def default_role(variable: str) -> str:
    """The role a variable takes unless a config says otherwise (its registry kind)."""
    info = VARIABLES.get(variable)
    return _DEFAULT_ROLE.get(info.kind, PROGNOSTIC) if info is not None else PROGNOSTIC


def lookup_variable(name: str, has_levels: bool | None = None) -> VariableInfo | None:
    """Find the canonical variable for a name found in a file.

    Parameters
    ----------
    name : canonical long name, CF-less short name or alias (``t2m``, ``air``, ``z``...).
    has_levels : whether the source variable has a level dimension. Used to tell apart
        aliases shared by a level and a single-level variable (``air``, ``t``).

    Returns
    -------
    The matching :class:`VariableInfo`, or None when the name is unknown or ambiguous.
    """
    if name in VARIABLES:
        return VARIABLES[name]
    candidates = [v for v in _VARIABLES if name in v.aliases]
    if has_levels is not None and len(candidates) > 1:
        candidates = [v for v in candidates if v.has_levels == has_levels]
    if len(candidates) == 1:
        return candidates[0]
    return None


def channel_name(variable: str, level: float | None) -> str:
    """Name of one channel of the store: ``temperature_850`` or ``2m_temperature``."""
    if level is None:
        return variable
    return f"{variable}_{int(level) if float(level).is_integer() else level}"

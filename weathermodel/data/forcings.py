"""Time-dependent forcings and grid-derived static channels.

Everything here is computed from the valid time and the grid alone, so it is exactly known at
forecast time and never has to be read from a file.

Conventions
-----------
* ``time`` is ``datetime64`` in UTC (timezone-naive values are taken to be UTC), shape ``(T,)``.
* ``latitude`` is in degrees north, within ``[-90, 90]``, any order; ``longitude`` is in degrees
  east in any convention (``[0, 360)``, ``[-180, 180)``, ...): only its value modulo 360 matters.
* Output arrays are laid out ``(time, latitude, longitude)`` (with a channel axis after ``time``
  for :func:`compute_forcings`), in the order of the coordinates given.

Solar geometry
--------------
The position of the Sun uses the low-order astronomical series of the ECMWF IFS
(``ifs/fcmsolar.h`` in ecRad, https://github.com/ecmwf-ifs/ecrad), the same one GraphCast uses
in ``graphcast/solar_radiation.py`` because it reproduces the ERA5 ``tisr`` field. With
``d`` the days since the J2000.0 epoch (2000-01-01 12:00) and ``theta = d / 365.25``
(Julian years):

* mean longitude ``REL = 1.7535 + 6.283076 theta``, mean anomaly
  ``REM = 6.240075 + 6.283020 theta``, ``RLLS = 4.8951 + 6.283076 theta`` (radians);
* ecliptic longitude of the Sun ``RLLLS = 4.8952 + 6.283320 theta - 0.0075 sin REL
  - 0.0326 cos REL - 0.0003 sin 2REL + 0.0002 cos 2REL``;
* declination ``sin(delta) = sin(0.409093) sin(RLLLS)`` (obliquity 23.4393 deg);
* equation of time (s) ``591.8 sin 2RLLS - 459.4 sin REM + 39.5 sin REM cos 2RLLS
  - 12.7 sin 4RLLS - 4.8 sin 2REM``;
* Earth-Sun distance (AU) ``r = 1.0001 - 0.0163 sin REL + 0.0037 cos REL``.

The hour angle is ``2 pi (d mod 1 + EoT / 86400) + longitude`` (zero at local apparent noon),
``cos(zenith) = sin(lat) sin(delta) + cos(lat) cos(delta) cos(hour angle)``, and the incident
flux on a horizontal surface at the top of the atmosphere is
``S0 / r**2 * max(cos(zenith), 0)`` with ``S0 = SOLAR_CONSTANT_W_M2``. The UTC/TT difference
(about a minute) is neglected, as in the IFS and GraphCast: it moves the Sun's orbital position
by far less than the accuracy of the series.

Accumulated radiation follows the ERA5 ``tisr`` convention: the energy (J m-2) received during
the period *ending* at the valid time, computed by the midpoint rule over equal sub-intervals.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from weathermodel import conventions

__all__ = [
    "SOLAR_CONSTANT_W_M2",
    "toa_incident_solar_radiation",
    "instantaneous_toa_flux",
    "local_time_encoding",
    "year_progress_encoding",
    "compute_forcings",
    "grid_static_fields",
]

#: Total solar irradiance at 1 AU (W m-2); the reference value of ecRad and GraphCast.
SOLAR_CONSTANT_W_M2 = 1361.0

_SECONDS_PER_DAY = 86_400
_NS_PER_DAY = _SECONDS_PER_DAY * 1_000_000_000
#: The J2000.0 epoch, 2000-01-01 12:00 (taken as UTC, see the module docstring).
_J2000_EPOCH = np.datetime64("2000-01-01T12:00:00", "ns")
_UNIX_EPOCH = np.datetime64("1970-01-01T00:00:00", "ns")
_JULIAN_YEAR_DAYS = 365.25
#: Mean tropical year (days), GraphCast's ``AVG_DAY_PER_YEAR``.
_MEAN_YEAR_DAYS = 365.24219
#: The mean year in integer nanoseconds (365.24219 * 86400 s = 31 556 925.216 s, exact).
_MEAN_YEAR_NS = 31_556_925_216_000_000
#: Obliquity of the ecliptic used by the IFS series (rad), 23.4393 deg.
_OBLIQUITY_RAD = 0.409093
#: Largest number of (time, lat, lon) points evaluated at once, to bound memory (float64).
_MAX_CHUNK_POINTS = 1 << 22

#: Channel order produced by :func:`compute_forcings`.
_FORCING_CHANNELS: tuple[str, ...] = (
    "toa_incident_solar_radiation",
    "sin_local_time",
    "cos_local_time",
    "sin_year_progress",
    "cos_year_progress",
)
#: Channel order produced by :func:`grid_static_fields`.
_GRID_STATIC_CHANNELS: tuple[str, ...] = (
    "sin_latitude",
    "cos_latitude",
    "sin_longitude",
    "cos_longitude",
)


class _SunPosition(NamedTuple):
    """Earth-Sun geometry at a set of times; every field has the shape of the input days.

    Attributes
    ----------
    sin_declination, cos_declination : sine and cosine of the solar declination.
    hour_angle_greenwich : hour angle of the Sun at longitude 0 (rad), zero at apparent noon.
    inverse_distance_squared : ``(1 AU / r)**2``, the flux factor from the Earth-Sun distance.
    """

    sin_declination: np.ndarray
    cos_declination: np.ndarray
    hour_angle_greenwich: np.ndarray
    inverse_distance_squared: np.ndarray


# --------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------
def _as_time(time: ArrayLike) -> np.ndarray:
    """Return ``time`` as a 1-D ``datetime64[ns]`` array (UTC)."""
    values = np.atleast_1d(np.asarray(time))
    if not np.issubdtype(values.dtype, np.datetime64):
        values = values.astype("datetime64[ns]")
    values = values.astype("datetime64[ns]")
    if values.ndim != 1:
        raise ValueError(f"time must be 1-D, got shape {values.shape}")
    if np.isnat(values).any():
        raise ValueError("time contains NaT")
    return values


def _as_degrees(values: ArrayLike, name: str) -> np.ndarray:
    """Return a 1-D float64 array of degrees, refusing NaN and multi-dimensional input."""
    array = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains non-finite values")
    return array


def _as_latitude(latitude: ArrayLike) -> np.ndarray:
    """Return latitude in degrees as 1-D float64, checking it lies in ``[-90, 90]``."""
    array = _as_degrees(latitude, "latitude")
    if (np.abs(array) > 90.0).any():
        raise ValueError("latitude must lie in [-90, 90] degrees")
    return array


def _as_longitude(longitude: ArrayLike) -> np.ndarray:
    """Return longitude in degrees east as 1-D float64, wrapped to ``[0, 360)``."""
    return np.mod(_as_degrees(longitude, "longitude"), 360.0)


def _as_timedelta_ns(period: np.timedelta64) -> np.int64:
    """Return a positive time interval as integer nanoseconds."""
    nanoseconds = np.timedelta64(period).astype("timedelta64[ns]").astype(np.int64)
    if nanoseconds <= 0:
        raise ValueError(f"integration_period must be positive, got {period!r}")
    return nanoseconds


# --------------------------------------------------------------------------------------------
# Solar geometry
# --------------------------------------------------------------------------------------------
def _j2000_days(time_ns: np.ndarray) -> np.ndarray:
    """Days (float64) since the J2000.0 epoch for ``datetime64[ns]`` times."""
    return (time_ns - _J2000_EPOCH).astype(np.int64) / _NS_PER_DAY


def _sun_position(j2000_days: np.ndarray) -> _SunPosition:
    """Solar declination, Greenwich hour angle and Earth-Sun distance (IFS / ecRad series).

    Parameters
    ----------
    j2000_days : days since 2000-01-01 12:00 UTC, any shape.

    Returns
    -------
    :class:`_SunPosition` with fields of the shape of ``j2000_days``.
    """
    theta = j2000_days / _JULIAN_YEAR_DAYS
    rel = 1.7535 + 6.283076 * theta
    rem = 6.240075 + 6.283020 * theta
    rlls = 4.8951 + 6.283076 * theta
    ecliptic_longitude = (4.8952 + 6.283320 * theta - 0.0075 * np.sin(rel)
                          - 0.0326 * np.cos(rel) - 0.0003 * np.sin(2.0 * rel)
                          + 0.0002 * np.cos(2.0 * rel))
    sin_declination = np.sin(_OBLIQUITY_RAD) * np.sin(ecliptic_longitude)
    cos_declination = np.sqrt(1.0 - sin_declination**2)
    sin_rem = np.sin(rem)
    equation_of_time_s = (591.8 * np.sin(2.0 * rlls) - 459.4 * sin_rem
                          + 39.5 * sin_rem * np.cos(2.0 * rlls) - 12.7 * np.sin(4.0 * rlls)
                          - 4.8 * np.sin(2.0 * rem))
    distance_au = 1.0001 - 0.0163 * np.sin(rel) + 0.0037 * np.cos(rel)
    # The epoch is at noon, so the fractional day is the mean hour angle at Greenwich.
    apparent_day_phase = np.mod(j2000_days, 1.0) + equation_of_time_s / _SECONDS_PER_DAY
    return _SunPosition(
        sin_declination=sin_declination,
        cos_declination=cos_declination,
        hour_angle_greenwich=2.0 * np.pi * apparent_day_phase,
        inverse_distance_squared=distance_au**-2.0,
    )


def _flux_at_days(j2000_days: np.ndarray, latitude_deg: np.ndarray,
                  longitude_deg: np.ndarray) -> np.ndarray:
    """Instantaneous TOA flux (W m-2, float64) of shape ``(T, lat, lon)``.

    Parameters
    ----------
    j2000_days : shape ``(T,)``, days since J2000.0.
    latitude_deg, longitude_deg : 1-D degrees (already validated).
    """
    sun = _sun_position(j2000_days)
    latitude = np.deg2rad(latitude_deg)
    longitude = np.deg2rad(longitude_deg)
    # (T, lon) and (T, 1) terms first: cheap, then one broadcast to (T, lat, lon).
    cos_hour_angle = np.cos(sun.hour_angle_greenwich[:, None] + longitude[None, :])
    east_west = (sun.cos_declination[:, None] * cos_hour_angle)[:, None, :]
    north_south = np.sin(latitude)[None, :, None] * sun.sin_declination[:, None, None]
    cos_zenith = np.cos(latitude)[None, :, None] * east_west
    cos_zenith += north_south
    np.maximum(cos_zenith, 0.0, out=cos_zenith)
    cos_zenith *= (SOLAR_CONSTANT_W_M2 * sun.inverse_distance_squared)[:, None, None]
    return cos_zenith


def _time_chunks(num_times: int, points_per_time: int) -> list[slice]:
    """Slices over the time axis so that each chunk holds at most ``_MAX_CHUNK_POINTS``."""
    step = max(1, _MAX_CHUNK_POINTS // max(1, points_per_time))
    return [slice(start, min(start + step, num_times)) for start in range(0, num_times, step)]


def instantaneous_toa_flux(time: ArrayLike, latitude: ArrayLike,
                           longitude: ArrayLike) -> np.ndarray:
    """Instantaneous top-of-atmosphere incident solar flux on a horizontal surface.

    Parameters
    ----------
    time : ``datetime64`` (UTC), shape ``(T,)``.
    latitude : degrees north in ``[-90, 90]``, shape ``(lat,)``.
    longitude : degrees east, any convention, shape ``(lon,)``.

    Returns
    -------
    float64 array ``(T, lat, lon)`` in W m-2: ``S0 / r**2 * max(cos(zenith), 0)``, zero when the
    Sun is below the (astronomical) horizon.
    """
    days = _j2000_days(_as_time(time))
    return _flux_at_days(days, _as_latitude(latitude), _as_longitude(longitude))


def toa_incident_solar_radiation(
    time: ArrayLike,
    latitude: ArrayLike,
    longitude: ArrayLike,
    integration_period: np.timedelta64 = np.timedelta64(1, "h"),
    num_integration_bins: int = 12,
) -> np.ndarray:
    """Top-of-atmosphere incident solar radiation accumulated over the period ending at ``time``.

    This is the ERA5 ``tisr`` convention (also GraphCast's): the value at ``T`` is the energy
    received per unit horizontal area during ``[T - integration_period, T]``.

    Parameters
    ----------
    time : ``datetime64`` (UTC), shape ``(T,)``.
    latitude : degrees north in ``[-90, 90]``, shape ``(lat,)``.
    longitude : degrees east, any convention, shape ``(lon,)``.
    integration_period : length of the accumulation window (1 hour for ERA5 ``tisr``).
    num_integration_bins : number of equal sub-intervals; the flux is evaluated at their
        midpoints (midpoint rule) and the mean is multiplied by the period in seconds.

    Returns
    -------
    float32 array ``(T, lat, lon)`` in J m-2.
    """
    if int(num_integration_bins) < 1:
        raise ValueError("num_integration_bins must be >= 1")
    bins = int(num_integration_bins)
    times = _as_time(time)
    lat = _as_latitude(latitude)
    lon = _as_longitude(longitude)
    period_ns = _as_timedelta_ns(integration_period)
    period_days = period_ns / _NS_PER_DAY
    end_days = _j2000_days(times)
    # Midpoints of the sub-intervals, as offsets (days) from the end of the window.
    offsets_days = -period_days + (np.arange(bins) + 0.5) * (period_days / bins)

    out = np.empty((times.size, lat.size, lon.size), dtype=np.float32)
    # every bin of a chunk's times in one evaluation: (time, bin) flattened
    for chunk in _time_chunks(times.size, bins * lat.size * lon.size):
        days = (end_days[chunk][:, None] + offsets_days[None]).ravel()
        flux = _flux_at_days(days, lat, lon).reshape(-1, bins, lat.size, lon.size)
        out[chunk] = flux.sum(axis=1) * (period_ns / 1e9 / bins)
    return out


# --------------------------------------------------------------------------------------------
# Clock encodings
# --------------------------------------------------------------------------------------------
def _ns_since_unix_epoch(time: ArrayLike) -> np.ndarray:
    """Integer nanoseconds since 1970-01-01 00:00 UTC, shape ``(T,)``."""
    return (_as_time(time) - _UNIX_EPOCH).astype(np.int64)


def _encode(fraction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sin`` and ``cos`` of ``2 pi * fraction`` as float32."""
    angle = 2.0 * np.pi * fraction
    return np.sin(angle).astype(np.float32), np.cos(angle).astype(np.float32)


def local_time_encoding(time: ArrayLike, longitude: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sine and cosine of local mean solar time.

    Local mean solar time (hours) is ``UTC hours + longitude / 15``, modulo 24; the encoding is
    ``sin`` and ``cos`` of ``2 pi * local time / 24 h`` (GraphCast's ``day_progress``). It ignores
    the equation of time, so it is a clock, not the Sun's position.

    Parameters
    ----------
    time : ``datetime64`` (UTC), shape ``(T,)``.
    longitude : degrees east, any convention (``-90`` and ``270`` give identical output).

    Returns
    -------
    ``(sin, cos)``, each float32 of shape ``(T, lon)``.
    """
    # Integer modulo keeps full precision however far the time is from 1970.
    utc_day_fraction = np.mod(_ns_since_unix_epoch(time), _NS_PER_DAY) / _NS_PER_DAY
    longitude_fraction = _as_longitude(longitude) / 360.0
    local_fraction = np.mod(utc_day_fraction[:, None] + longitude_fraction[None, :], 1.0)
    return _encode(local_fraction)


def year_progress_encoding(time: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sine and cosine of the fraction of the year elapsed.

    Follows GraphCast's ``year_progress``: the fraction is ``(seconds since 1970-01-01 00 UTC)
    modulo (365.24219 days, the mean tropical year)``, divided by that length. The phase is thus
    anchored at 1970-01-01 00 UTC and is a smooth function of time (no jump at leap days); it
    differs from "days since 1 January of the current year / year length" by under two days.

    Parameters
    ----------
    time : ``datetime64`` (UTC), shape ``(T,)``.

    Returns
    -------
    ``(sin, cos)``, each float32 of shape ``(T,)``; values repeat after 365.24219 days.
    """
    fraction = np.mod(_ns_since_unix_epoch(time), _MEAN_YEAR_NS) / _MEAN_YEAR_NS
    return _encode(fraction)


# --------------------------------------------------------------------------------------------
# Stacked outputs
# --------------------------------------------------------------------------------------------
def _check_order(produced: tuple[str, ...], expected: tuple[str, ...], what: str) -> None:
    """Raise if the channel order produced here differs from the canonical one."""
    if tuple(produced) != tuple(expected):
        raise AssertionError(f"{what} channel order {produced} != conventions {expected}")


def compute_forcings(time: ArrayLike, latitude: ArrayLike, longitude: ArrayLike) -> np.ndarray:
    """All time-dependent forcings stacked as channels.

    Parameters
    ----------
    time : ``datetime64`` (UTC), shape ``(T,)``.
    latitude : degrees north, shape ``(lat,)``.
    longitude : degrees east, any convention, shape ``(lon,)``.

    Returns
    -------
    float32 array ``(T, 5, lat, lon)`` with channels, in the order of
    ``weathermodel.conventions.FORCING_NAMES``: ``toa_incident_solar_radiation`` (J m-2,
    accumulated over the hour ending at ``time``), ``sin_local_time``, ``cos_local_time``,
    ``sin_year_progress``, ``cos_year_progress`` (dimensionless, broadcast over the grid).
    """
    _check_order(_FORCING_CHANNELS, conventions.FORCING_NAMES, "forcing")
    times = _as_time(time)
    lat = _as_latitude(latitude)
    lon = _as_longitude(longitude)
    out = np.empty((times.size, len(_FORCING_CHANNELS), lat.size, lon.size), dtype=np.float32)
    out[:, 0] = toa_incident_solar_radiation(times, lat, lon)
    sin_local, cos_local = local_time_encoding(times, lon)
    out[:, 1] = sin_local[:, None, :]
    out[:, 2] = cos_local[:, None, :]
    sin_year, cos_year = year_progress_encoding(times)
    out[:, 3] = sin_year[:, None, None]
    out[:, 4] = cos_year[:, None, None]
    return out


def grid_static_fields(latitude: ArrayLike, longitude: ArrayLike) -> np.ndarray:
    """Static channels derived from the grid coordinates.

    Parameters
    ----------
    latitude : degrees north in ``[-90, 90]``, shape ``(lat,)``.
    longitude : degrees east, any convention, shape ``(lon,)``.

    Returns
    -------
    float32 array ``(4, lat, lon)``: ``sin_latitude``, ``cos_latitude``, ``sin_longitude``,
    ``cos_longitude`` (order of ``weathermodel.conventions.GRID_STATIC_NAMES``).
    """
    _check_order(_GRID_STATIC_CHANNELS, conventions.GRID_STATIC_NAMES, "grid static")
    lat = np.deg2rad(_as_latitude(latitude))
    lon = np.deg2rad(_as_longitude(longitude))
    shape = (lat.size, lon.size)
    fields = (
        np.broadcast_to(np.sin(lat)[:, None], shape),
        np.broadcast_to(np.cos(lat)[:, None], shape),
        np.broadcast_to(np.sin(lon)[None, :], shape),
        np.broadcast_to(np.cos(lon)[None, :], shape),
    )
    return np.stack(fields).astype(np.float32)

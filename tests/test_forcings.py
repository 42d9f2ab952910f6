"""Tests of ``weathermodel.data.forcings`` against independent oracles.

Oracles: closed-form daily insolation (equator at equinox, pole at solstice, polar night),
the Spencer (1971) Fourier series for the Earth-Sun distance, pvlib's NREL solar position
algorithm, and brute-force fine-step integration of the instantaneous flux.
"""
from __future__ import annotations

import time as _time

import numpy as np
import pandas as pd
import pytest

from weathermodel import conventions
from weathermodel.data import forcings
from weathermodel.data.forcings import (
    SOLAR_CONSTANT_W_M2 as S0,
    compute_forcings,
    grid_static_fields,
    instantaneous_toa_flux,
    local_time_encoding,
    toa_incident_solar_radiation,
    year_progress_encoding,
)

HOUR = np.timedelta64(1, "h")
MINUTE = np.timedelta64(60_000_000_000, "ns")


def _t(value: str) -> np.datetime64:
    return np.datetime64(value, "ns")


def spencer_inverse_r2(day: np.datetime64) -> float:
    """(1 AU / r)**2 from Spencer (1971), Search 2(5) p. 172, an oracle independent of the code."""
    day_of_year = pd.Timestamp(day).day_of_year
    gamma = 2.0 * np.pi * (day_of_year - 1) / 365.0
    return (1.000110 + 0.034221 * np.cos(gamma) + 0.001280 * np.sin(gamma)
            + 0.000719 * np.cos(2 * gamma) + 0.000077 * np.sin(2 * gamma))


def daily_mean_flux(day_start: str, latitude, longitude) -> np.ndarray:
    """Mean flux (W m-2) over 24 h from ``day_start``, from the 24 hourly accumulations."""
    ends = _t(day_start) + HOUR * np.arange(1, 25)
    return toa_incident_solar_radiation(ends, latitude, longitude).astype(np.float64).sum(0) / 86400


def brute_force_integral(start: np.datetime64, end: np.datetime64, latitude, longitude,
                         step: np.timedelta64 = MINUTE) -> np.ndarray:
    """Integral (J m-2) of the instantaneous flux over [start, end], midpoint rule at ``step``."""
    step = step.astype("timedelta64[ns]")
    midpoints = np.arange(start, end, step) + step // 2
    flux = instantaneous_toa_flux(midpoints, latitude, longitude)
    return flux.sum(0) * (step / np.timedelta64(1, "s"))


# --------------------------------------------------------------------------------------------
# Analytic insolation
# --------------------------------------------------------------------------------------------
def test_equator_daily_mean_at_equinox_is_s0_over_pi():
    # March equinox 2013: 2013-03-20 11:02 UTC. Daily mean at the equator = S0 / (pi r**2).
    lon = np.arange(0.0, 360.0, 30.0)
    mean = daily_mean_flux("2013-03-20T00:00", [0.0], lon)
    expected = S0 / np.pi * spencer_inverse_r2(_t("2013-03-20"))
    np.testing.assert_allclose(mean, expected, rtol=0.01)
    # The daily mean does not depend on longitude.
    np.testing.assert_allclose(mean, mean.mean(), rtol=2e-3)


def test_equator_noon_at_equinox_is_overhead_sun():
    # 2013-03-20 12:00 UTC, 0N 0E: Sun within ~2 degrees of the zenith (declination ~0,
    # equation of time ~-7.5 min), so the flux is S0 / r**2 to within 0.1 %.
    flux = instantaneous_toa_flux([_t("2013-03-20T12:00")], [0.0], [0.0])[0, 0, 0]
    expected = S0 * spencer_inverse_r2(_t("2013-03-20"))
    assert flux == pytest.approx(expected, rel=2e-3)


def test_north_pole_daily_mean_at_june_solstice():
    # At the pole the Sun's elevation equals the declination all day: mean = S0 sin(23.44) / r**2.
    mean = daily_mean_flux("2013-06-21T00:00", [90.0], [0.0, 120.0, 240.0])
    expected = S0 * np.sin(np.deg2rad(23.44)) * spencer_inverse_r2(_t("2013-06-21"))
    np.testing.assert_allclose(mean, expected, rtol=5e-3)
    assert 520.0 < mean.min() and mean.max() < 530.0
    # ... and constant through the day.
    hourly = instantaneous_toa_flux(_t("2013-06-21T00:00") + HOUR * np.arange(24), [90.0], [0.0])
    np.testing.assert_allclose(hourly, expected, rtol=5e-3)


def test_polar_night_in_december_is_zero():
    ends = _t("2013-12-21T00:00") + HOUR * np.arange(1, 25)
    tisr = toa_incident_solar_radiation(ends, [75.0, 80.0, 90.0], np.arange(0.0, 360.0, 45.0))
    assert np.all(tisr == 0.0)
    # Meanwhile the South Pole is in polar day.
    south = toa_incident_solar_radiation(ends, [-90.0], [0.0])
    assert np.all(south > 0.0)


@pytest.mark.parametrize(("when", "r2"), [("2013-01-03T12:00", 0.967), ("2013-07-04T12:00", 1.034)])
def test_maximum_flux_is_s0_over_r2(when, r2):
    lat = np.arange(-90.0, 90.01, 0.25)
    lon = np.arange(0.0, 360.0, 0.25)
    peak = instantaneous_toa_flux([_t(when)], lat, lon).max()
    assert peak == pytest.approx(S0 * spencer_inverse_r2(_t(when)), rel=5e-3)
    assert S0 / peak == pytest.approx(r2, abs=2e-3)


def test_flux_is_nonnegative_and_bounded():
    times = _t("2013-01-01") + np.timedelta64(97, "h") * np.arange(90)
    flux = instantaneous_toa_flux(times, np.linspace(-90, 90, 19), np.arange(0, 360, 20.0))
    assert flux.dtype == np.float64
    assert flux.shape == (90, 19, 18)
    assert flux.min() == 0.0
    assert flux.max() <= S0 / 0.98**2


# --------------------------------------------------------------------------------------------
# Second implementation: pvlib (NREL SPA)
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:DatetimeIndex.dayofyear is deprecated")  # inside pvlib
def test_instantaneous_flux_agrees_with_pvlib():
    pvlib = pytest.importorskip("pvlib")
    rng = np.random.default_rng(20130101)
    n = 50
    seconds = rng.integers(0, 365 * 86400, n)
    times = _t("2013-01-01T00:00") + seconds.astype("timedelta64[s]")
    lats = rng.uniform(-89.0, 89.0, n)
    # Longitudes chosen so that local mean time is 04-20 h: mostly daytime, some night.
    utc_hours = (seconds % 86400) / 3600.0
    local_hours = rng.uniform(4.0, 20.0, n)
    lons = np.mod(15.0 * (local_hours - utc_hours) + 180.0, 360.0) - 180.0
    ours = np.empty(n)
    reference = np.empty(n)
    for i in range(n):
        index = pd.DatetimeIndex([times[i]], tz="UTC")
        position = pvlib.solarposition.get_solarposition(index, lats[i], lons[i],
                                                         method="nrel_numpy")
        extra = pvlib.irradiance.get_extra_radiation(index, solar_constant=S0, method="spencer")
        cos_zenith = np.cos(np.deg2rad(float(position["zenith"].iloc[0])))
        reference[i] = float(np.asarray(extra)[0]) * max(cos_zenith, 0.0)
        # Alternate longitude conventions: the result must not depend on it.
        lon = lons[i] + 360.0 if i % 2 else lons[i]
        ours[i] = instantaneous_toa_flux([times[i]], [lats[i]], [lon])[0, 0, 0]
    sun_up = reference > 0.0
    assert sun_up.sum() >= 30, "too few daytime samples for a meaningful comparison"
    np.testing.assert_array_less(np.abs(ours - reference)[sun_up], 15.0)
    # Where pvlib has the Sun down we are at most grazing the horizon.
    np.testing.assert_array_less(ours[~sun_up], 15.0)


# --------------------------------------------------------------------------------------------
# Integration
# --------------------------------------------------------------------------------------------
def test_hourly_accumulation_matches_brute_force_integral():
    ends = _t("2013-05-07T00:00") + np.timedelta64(7, "h") * np.arange(8)
    lat = np.arange(-80.0, 81.0, 20.0)
    lon = np.arange(0.0, 360.0, 40.0)
    tisr = toa_incident_solar_radiation(ends, lat, lon).astype(np.float64)
    brute = np.stack([brute_force_integral(end - HOUR, end, lat, lon) for end in ends])
    assert brute.shape == tisr.shape
    daytime = brute > 0.05 * S0 * 3600
    assert daytime.sum() > 50
    np.testing.assert_allclose(tisr[daytime], brute[daytime], rtol=5e-3)
    # Hours cut by sunrise / sunset: within 0.5 % of a full-sun hour in absolute terms.
    np.testing.assert_allclose(tisr, brute, rtol=0, atol=5e-3 * S0 * 3600)


def test_hourly_accumulations_sum_to_daily_integral():
    lat = np.arange(-90.0, 91.0, 15.0)
    lon = np.arange(-180.0, 180.0, 45.0)
    start = _t("2013-09-10T00:00")
    ends = start + HOUR * np.arange(1, 25)
    daily_from_hours = toa_incident_solar_radiation(ends, lat, lon).astype(np.float64).sum(0)
    brute = brute_force_integral(start, start + 24 * HOUR, lat, lon)
    np.testing.assert_allclose(daily_from_hours, brute, rtol=5e-3, atol=1e-6 * S0 * 86400)
    # One 24 h window with the same sub-intervals is the same sum.
    daily = toa_incident_solar_radiation([start + 24 * HOUR], lat, lon,
                                         integration_period=np.timedelta64(24, "h"),
                                         num_integration_bins=24 * 12)[0]
    np.testing.assert_allclose(daily, daily_from_hours, rtol=1e-5, atol=1.0)


def test_accumulation_ends_at_valid_time():
    # 0N 0E at the March 2013 equinox: apparent noon ~12:07 UTC (equation of time ~-7.5 min),
    # so sunrise ~06:07 and sunset ~18:07. A window ending at T is dark at 06:00 but not at
    # 07:00; a window starting (or centred) at 06:00 would not be dark.
    ends = [_t("2013-03-20T06:00"), _t("2013-03-20T07:00"), _t("2013-03-20T19:00"),
            _t("2013-03-20T20:00")]
    tisr = toa_incident_solar_radiation(ends, [0.0], [0.0])[:, 0, 0]
    assert tisr[0] == 0.0 and tisr[1] > 0.0
    assert tisr[2] > 0.0 and tisr[3] == 0.0


def test_tisr_output_format_and_speed():
    times = _t("2013-01-01T00:00") + np.timedelta64(6, "h") * np.arange(1460)
    lat = np.linspace(-90.0, 90.0, 25)
    lon = np.linspace(0.0, 360.0, 53, endpoint=False)
    start = _time.perf_counter()
    tisr = toa_incident_solar_radiation(times, lat, lon)
    elapsed = _time.perf_counter() - start
    assert tisr.shape == (1460, 25, 53) and tisr.dtype == np.float32
    low, high = conventions.VARIABLES["toa_incident_solar_radiation"].plausible_range
    assert low <= tisr.min() and tisr.max() <= high
    assert elapsed < 2.0, f"toa_incident_solar_radiation took {elapsed:.2f} s"


def test_tisr_accepts_pandas_period_and_rejects_bad_input():
    t = [_t("2013-06-01T12:00")]
    a = toa_incident_solar_radiation(t, [10.0], [20.0], integration_period=pd.Timedelta(hours=1))
    b = toa_incident_solar_radiation(t, [10.0], [20.0])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        toa_incident_solar_radiation(t, [95.0], [0.0])
    with pytest.raises(ValueError):
        toa_incident_solar_radiation(t, [0.0], [0.0], integration_period=np.timedelta64(0, "h"))
    with pytest.raises(ValueError):
        toa_incident_solar_radiation(t, [0.0], [0.0], num_integration_bins=0)


# --------------------------------------------------------------------------------------------
# Clock encodings
# --------------------------------------------------------------------------------------------
def test_local_time_at_greenwich_midnight_and_90e_at_06utc():
    sin_lt, cos_lt = local_time_encoding([_t("2013-04-02T00:00"), _t("2013-04-02T06:00")],
                                         [0.0, 90.0])
    assert sin_lt.shape == cos_lt.shape == (2, 2)
    assert sin_lt.dtype == cos_lt.dtype == np.float32
    assert sin_lt[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert cos_lt[0, 0] == pytest.approx(1.0, abs=1e-6)
    # 90E at 06 UTC: local time 12 h.
    assert cos_lt[1, 1] == pytest.approx(-1.0, abs=1e-6)
    assert sin_lt[1, 1] == pytest.approx(0.0, abs=1e-6)
    # 90E at 00 UTC: 06 local, sin = 1.
    assert sin_lt[0, 1] == pytest.approx(1.0, abs=1e-6)


def test_local_time_independent_of_longitude_convention():
    times = _t("2013-01-01T00:00") + np.timedelta64(5, "h") * np.arange(30)
    east = np.array([0.0, 90.0, 180.0, 270.0, 359.75])
    west = np.array([0.0, 90.0, -180.0, -90.0, -0.25])
    for a, b in zip(local_time_encoding(times, east), local_time_encoding(times, west)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(compute_forcings(times[:3], [0.0], east),
                                  compute_forcings(times[:3], [0.0], west))


def test_year_progress_range_period_and_anchor():
    times = _t("2013-01-01T00:00") + np.timedelta64(13, "h") * np.arange(2000)
    sin_yp, cos_yp = year_progress_encoding(times)
    assert sin_yp.shape == cos_yp.shape == (2000,)
    assert sin_yp.dtype == cos_yp.dtype == np.float32
    assert np.all(np.abs(sin_yp) <= 1.0) and np.all(np.abs(cos_yp) <= 1.0)
    np.testing.assert_allclose(sin_yp.astype(np.float64) ** 2 + cos_yp.astype(np.float64) ** 2,
                               1.0, atol=1e-6)
    mean_year = np.timedelta64(int(round(365.24219 * 86400 * 1e9)), "ns")
    for a, b in zip((sin_yp, cos_yp), year_progress_encoding(times + mean_year)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Anchored at 1970-01-01 00 UTC, and within ~2 days of 1 January in later years.
    s0, c0 = year_progress_encoding([_t("1970-01-01T00:00")])
    assert s0[0] == pytest.approx(0.0, abs=1e-7) and c0[0] == pytest.approx(1.0, abs=1e-7)
    s, c = year_progress_encoding([_t(f"{y}-01-01T00:00") for y in (2000, 2013, 2020, 2023)])
    fraction = np.mod(np.arctan2(s, c) / (2 * np.pi) + 0.5, 1.0) - 0.5
    np.testing.assert_array_less(np.abs(fraction), 2.0 / 365.0)
    # Midyear (2 July) is about half way round.
    s, c = year_progress_encoding([_t("2013-07-02T12:00")])
    assert c[0] == pytest.approx(-1.0, abs=1e-3)


# --------------------------------------------------------------------------------------------
# Stacked outputs
# --------------------------------------------------------------------------------------------
def test_compute_forcings_layout_matches_conventions():
    times = _t("2013-02-01T00:00") + np.timedelta64(6, "h") * np.arange(12)
    lat = np.linspace(-90.0, 90.0, 7)
    lon = np.arange(0.0, 360.0, 60.0)
    stacked = compute_forcings(times, lat, lon)
    assert stacked.shape == (12, len(conventions.FORCING_NAMES), 7, 6)
    assert stacked.dtype == np.float32
    assert np.isfinite(stacked).all()
    assert forcings._FORCING_CHANNELS == conventions.FORCING_NAMES
    channel = {name: stacked[:, i] for i, name in enumerate(conventions.FORCING_NAMES)}
    np.testing.assert_array_equal(channel["toa_incident_solar_radiation"],
                                  toa_incident_solar_radiation(times, lat, lon))
    sin_lt, cos_lt = local_time_encoding(times, lon)
    sin_yp, cos_yp = year_progress_encoding(times)
    expected = {"sin_local_time": sin_lt[:, None, :], "cos_local_time": cos_lt[:, None, :],
                "sin_year_progress": sin_yp[:, None, None],
                "cos_year_progress": cos_yp[:, None, None]}
    for name, value in expected.items():
        np.testing.assert_array_equal(channel[name], np.broadcast_to(value, (12, 7, 6)))


def test_grid_static_fields():
    lat = np.array([-90.0, 0.0, 30.0, 90.0])
    lon = np.array([0.0, 90.0, -90.0, 180.0, 270.0])
    fields = grid_static_fields(lat, lon)
    assert fields.shape == (len(conventions.GRID_STATIC_NAMES), 4, 5)
    assert fields.dtype == np.float32
    named = dict(zip(conventions.GRID_STATIC_NAMES, fields))
    np.testing.assert_allclose(named["sin_latitude"][:, 0], [-1.0, 0.0, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(named["cos_latitude"][:, 0], [0.0, 1.0, np.sqrt(0.75), 0.0],
                               atol=1e-7)
    np.testing.assert_allclose(named["sin_longitude"][0], [0.0, 1.0, -1.0, 0.0, -1.0], atol=1e-7)
    np.testing.assert_allclose(named["cos_longitude"][0], [1.0, 0.0, 0.0, -1.0, 0.0], atol=1e-7)
    # Constant along the other axis.
    assert np.all(named["sin_latitude"] == named["sin_latitude"][:, :1])
    assert np.all(named["cos_longitude"] == named["cos_longitude"][:1, :])

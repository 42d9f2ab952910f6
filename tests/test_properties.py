"""Property-based tests of the parsers and the coordinate normalisation at the ingest edge.

* ``--init START/END/STEP`` and ``--lead``: every spelling of a time and a duration round-trips
  to the exact times and step counts; empty, reversed, non-positive or out-of-range requests
  are refused with a ``ConfigError``, and nothing else ever escapes.
* ``to_canonical``: whatever the order of the dimensions, the direction of latitude and levels,
  the longitude convention (0..360 or -180..180, wrapped once or not) and the level units, the
  result has ascending latitude and levels (hPa), strictly ascending longitudes in one
  canonical range, and every value still at its (time, level, latitude, longitude): the oracle
  is a look-up by coordinates in the input.

The configuration parser's properties are in test_configuration_units.py.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from weathermodel import conventions
from weathermodel.data.config import SourceSpec
from weathermodel.data.normalize import to_canonical
from weathermodel.errors import ConfigError, DataError
from weathermodel.inference.forecast import lead_steps, parse_init_times

# --------------------------------------------------------------------------------------------
# --init and --lead
# --------------------------------------------------------------------------------------------
#: datetime64[ns] holds 1677-09-21T00:12:43 to 2262-04-11T23:47:16
NS_FIRST, NS_LAST = pd.Timestamp.min.ceil("D") + pd.Timedelta("1D"), pd.Timestamp("2262-04-10")

_starts = st.datetimes(min_value=NS_FIRST.to_pydatetime(), max_value=NS_LAST.to_pydatetime()
                       ).map(lambda t: pd.Timestamp(t).floor("min"))


def _spell_time(stamp: pd.Timestamp, style: int) -> str:
    """One of the ISO spellings users write; all mean the same UTC time."""
    return [stamp.isoformat(), stamp.strftime("%Y-%m-%d %H:%M"),
            stamp.strftime("%Y-%m-%dT%H:%M:%S") + "Z", stamp.isoformat() + "+00:00",
            (stamp + pd.Timedelta("2h")).isoformat() + "+02:00"][style]


def _spell_duration(minutes: int, style: int) -> str:
    """One of the duration spellings pandas reads (``d`` is deprecated by pandas: ``D``)."""
    hours, days = minutes / 60, minutes / 1440
    whole_days, rest = divmod(minutes, 1440)
    iso = f"P{whole_days}DT{rest // 60}H{rest % 60}M"  # pandas wants minutes < 60 in ISO 8601
    spellings = [f"{minutes}min", f"{minutes * 60}s", iso, f"{minutes} minutes"]
    if hours == int(hours):
        spellings += [f"{int(hours)}h", f"{int(hours)} hours", f"{int(hours)}hours"]
    if days == int(days):
        spellings += [f"{int(days)}D", f"{int(days)} days"]
    return spellings[style % len(spellings)]


_step_minutes = st.sampled_from([30, 60, 180, 360, 720, 1440, 2880])


@settings(max_examples=150, deadline=None)
@given(start=_starts, step=_step_minutes, count=st.integers(0, 40), offset=st.floats(0, 0.99),
       start_style=st.integers(0, 4), end_style=st.integers(0, 4), step_style=st.integers(0, 8))
def test_init_range_round_trips(start: pd.Timestamp, step: int, count: int, offset: float,
                                start_style: int, end_style: int, step_style: int) -> None:
    """START/END/STEP gives START, START+STEP, ... up to END inclusive, however it is spelt,
    also when END does not fall on a step."""
    delta = pd.Timedelta(minutes=step)
    end = start + count * delta + pd.Timedelta(minutes=int(offset * step))
    assume(end <= NS_LAST)
    text = "/".join([_spell_time(start, start_style), _spell_time(end, end_style),
                     _spell_duration(step, step_style)])
    times = parse_init_times(text)
    assert times.dtype == np.dtype("datetime64[ns]")
    assert times.size == count + 1, text
    assert times[0] == start.to_datetime64() and times[-1] <= end.to_datetime64(), text
    assert (np.diff(times) == delta.to_timedelta64()).all(), text
    assert parse_init_times(_spell_time(start, start_style)) == start.to_datetime64()


@settings(max_examples=80, deadline=None)
@given(start=_starts, step=_step_minutes, counts=st.lists(st.integers(0, 12), min_size=1,
                                                          max_size=4),
       shifts=st.lists(st.integers(-5000, 5000), min_size=4, max_size=4))
def test_init_lists_are_the_sorted_union_of_their_items(start: pd.Timestamp, step: int,
                                                        counts: list[int],
                                                        shifts: list[int]) -> None:
    """``A,B,...`` (each START or START/END/STEP) gives every time of every item, once, in
    time order."""
    delta = pd.Timedelta(minutes=step)
    items, expected = [], set()
    for count, shift in zip(counts, shifts):
        first = start + pd.Timedelta(minutes=shift)
        assume(NS_FIRST <= first and first + count * delta <= NS_LAST)
        items.append(f"{first.isoformat()}/{(first + count * delta).isoformat()}/{step}min"
                     if count else first.isoformat())
        expected.update((first + k * delta).to_datetime64() for k in range(count + 1))
    times = parse_init_times(" , ".join(items))
    assert times.dtype == np.dtype("datetime64[ns]")
    assert list(times) == sorted(expected)


@settings(max_examples=80, deadline=None)
@given(start=_starts, back=st.integers(1, 10_000), step=_step_minutes,
       step_style=st.integers(0, 8), bad_step=st.sampled_from(["0h", "-6h", "0 days", "-PT6H"]))
def test_init_range_in_the_wrong_order_or_with_no_step_is_refused(
        start: pd.Timestamp, back: int, step: int, step_style: int, bad_step: str) -> None:
    earlier = start - pd.Timedelta(minutes=back)
    assume(earlier >= NS_FIRST)
    step_text = _spell_duration(step, step_style)
    with pytest.raises(ConfigError, match="empty"):
        parse_init_times(f"{start.isoformat()}/{earlier.isoformat()}/{step_text}")
    with pytest.raises(ConfigError, match="empty"):
        parse_init_times(f"{earlier.isoformat()}/{start.isoformat()}/{bad_step}")
    with pytest.raises(ConfigError, match="START/END/STEP"):
        parse_init_times(f"{earlier.isoformat()}/{start.isoformat()}")


@settings(max_examples=60, deadline=None)
@given(year=st.one_of(st.integers(1, 1676), st.integers(2263, 9999)), month=st.integers(1, 12))
def test_init_times_beyond_nanosecond_range_are_refused_not_wrapped(year: int,
                                                                   month: int) -> None:
    """pandas reads 3000-01-01 (in seconds); as datetime64[ns] it would wrap to 1830."""
    text = f"{year:04d}-{month:02d}-01"
    for request in (text, f"2000-01-01/{text}/6h", f"{text}/2000-01-01/6h"):
        with pytest.raises(ConfigError, match="1678 to 2261|not valid"):
            parse_init_times(request)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from("0123456789-/:TZ+ .hdDminsPHM"), max_size=30))
def test_init_parser_only_ever_raises_config_errors(text: str) -> None:
    """Any string either parses to sorted, evenly spaced times or is refused with a
    ConfigError, never with another exception (a traceback on the command line)."""
    try:
        times = parse_init_times(text)
    except ConfigError:
        return
    assert times.size >= 1 and times.dtype == np.dtype("datetime64[ns]")
    if times.size > 1:
        steps = np.diff(times)
        assert (steps > np.timedelta64(0)).all() and (steps == steps[0]).all()


@settings(max_examples=150, deadline=None)
@given(model_step=st.sampled_from([60, 180, 360, 720, 1440]), multiple=st.integers(1, 400),
       style=st.integers(0, 8), remainder=st.integers(1, 59))
def test_lead_round_trips_and_refuses_non_multiples(model_step: int, multiple: int, style: int,
                                                    remainder: int) -> None:
    seconds = model_step * 60
    lead = _spell_duration(model_step * multiple, style)
    assert lead_steps(lead, seconds) == multiple, lead
    with pytest.raises(ConfigError, match="multiple"):
        lead_steps(_spell_duration(model_step * multiple + remainder, 0), seconds)
    with pytest.raises(ConfigError, match="multiple"):
        lead_steps(f"-{lead}", seconds)


# --------------------------------------------------------------------------------------------
# coordinate normalisation
# --------------------------------------------------------------------------------------------
_DIM_NAMES = {conventions.LATITUDE: ["latitude", "lat"], conventions.LONGITUDE: ["longitude", "lon"],
              conventions.LEVEL: ["level", "isobaricInhPa", "plev"], conventions.TIME: ["time"]}


@st.composite
def grids(draw: st.DrawFn) -> dict:
    """A small source grid in any of the layouts found in real files."""
    lat_step = draw(st.sampled_from([0.75, 1.0, 2.5, 5.0]))
    n_lat = draw(st.integers(2, 6))
    lat0 = draw(st.integers(-90, int(90 - (n_lat - 1) * lat_step)))
    lat = lat0 + lat_step * np.arange(n_lat)
    lat_order = draw(st.sampled_from(["ascending", "descending", "shuffled"]))
    if lat_order == "descending":
        lat = lat[::-1]
    elif lat_order == "shuffled":
        lat = np.asarray(draw(st.permutations(list(lat))))
    lon_step = draw(st.sampled_from([2.5, 5.0, 10.0, 30.0]))
    n_lon = draw(st.integers(2, min(12, int(360 / lon_step))))
    lon0 = draw(st.integers(0, 359))
    lon360 = np.mod(lon0 + lon_step * np.arange(n_lon), 360.0)  # may cross 0 (wraps once)
    convention = draw(st.sampled_from(["0..360", "-180..180"]))
    lon = lon360 if convention == "0..360" else np.mod(lon360 + 180.0, 360.0) - 180.0
    if draw(st.booleans()):  # stored from its westernmost point in the chosen convention
        lon = np.sort(lon)
    if draw(st.integers(0, 3)) == 0:  # rare in files, and refused unless two points
        lon = lon[::-1]
    levels = np.asarray(draw(st.lists(st.sampled_from([1000.0, 850.0, 700.0, 500.0, 300.0]),
                                      min_size=1, max_size=3, unique=True)))
    return {"lat": lat, "lon": lon, "lon_step": lon_step, "lon_arc": lon360, "levels": levels,
            "lat_order": lat_order,
            "level_units": draw(st.sampled_from(["hPa", "Pa", "millibars"])),
            "order": draw(st.permutations([conventions.TIME, conventions.LEVEL, conventions.LATITUDE, conventions.LONGITUDE])),
            "names": {dim: draw(st.sampled_from(names)) for dim, names in _DIM_NAMES.items()},
            "n_time": draw(st.integers(1, 3))}


def _source(grid: dict) -> xr.Dataset:
    """Temperature with a distinct value at every point, in the grid's layout and names."""
    names = grid["names"]
    times = pd.date_range("2013-01-01", periods=grid["n_time"], freq="6h").values
    level_values = grid["levels"] * (100.0 if grid["level_units"] == "Pa" else 1.0)
    coords = {conventions.TIME: times, conventions.LEVEL: level_values, conventions.LATITUDE: grid["lat"],
              conventions.LONGITUDE: grid["lon"]}
    shape = [coords[dim].size for dim in grid["order"]]
    values = (200.0 + 0.01 * np.arange(int(np.prod(shape)))).astype("float32").reshape(shape)
    return xr.Dataset(
        {"t": ([names[dim] for dim in grid["order"]], values, {"units": "K"})},
        coords={names[dim]: (names[dim], coords[dim],
                             {"units": grid["level_units"]} if dim == conventions.LEVEL else {})
                for dim in grid["order"]})


def _positions(wanted: np.ndarray, have: np.ndarray) -> np.ndarray:
    """Index in ``have`` of each value of ``wanted`` (exactly one match each)."""
    matches = np.isclose(wanted[:, None], have[None, :], atol=1e-6)
    assert (matches.sum(axis=1) == 1).all(), (wanted, have)
    return matches.argmax(axis=1)


@settings(max_examples=120, deadline=None)
@given(grid=grids())
def test_to_canonical_orders_coordinates_and_keeps_every_value_at_its_point(grid: dict
                                                                            ) -> None:
    source = _source(grid)
    monotonic = grid["lat"].size < 3 or np.all(np.diff(grid["lat"]) > 0) or np.all(
        np.diff(grid["lat"]) < 0)
    try:
        result = to_canonical(source, SourceSpec(path="grid.nc"), "grid.nc")
    except DataError as error:  # only what cannot be put in order unambiguously is refused
        event(f"refused: {'latitude' if not monotonic else 'longitude'} out of order")
        assert not monotonic or "longitude" in str(error), str(error)
        assert "not strictly monotonic" in str(error) and "fix: sort" in str(error)
        return
    assert monotonic, "a shuffled latitude axis was accepted"
    event(f"accepted: latitude {grid['lat_order']}, levels in {grid['level_units']}")
    array = result.variables["temperature"]
    assert array.dims == (conventions.TIME, conventions.MEMBER, conventions.LEVEL, conventions.LATITUDE, conventions.LONGITUDE)
    lat, lon = array[conventions.LATITUDE].values, array[conventions.LONGITUDE].values
    levels = array[conventions.LEVEL].values
    assert (np.diff(lat) > 0).all() and (np.diff(levels) > 0).all()
    assert ((lon >= 0) & (lon < 360)).all() or ((lon >= -180) & (lon < 180)).all(), lon
    # in a convention that keeps the region in one piece where one can (the region's seam-free
    # arc, west to east, increases in it): then it is evenly spaced
    arc = grid["lon_arc"]
    if (np.diff(arc) > 0).all() or (np.diff(np.mod(arc + 180.0, 360.0)) > 0).all():
        assert np.allclose(np.diff(lon), grid["lon_step"]), lon
    assert np.allclose(np.sort(levels), np.sort(grid["levels"]))
    assert np.allclose(np.sort(np.mod(lon, 360)), np.sort(np.mod(grid["lon"], 360)))

    # the oracle: each output value is the input value at the same coordinates
    names = grid["names"]
    raw = source["t"].transpose(*(names[d] for d in (conventions.TIME, conventions.LEVEL, conventions.LATITUDE,
                                                    conventions.LONGITUDE))).values
    factor = 100.0 if grid["level_units"] == "Pa" else 1.0
    expected = raw[:, _positions(levels * factor, source[names[conventions.LEVEL]].values)]
    expected = expected[:, :, _positions(lat, source[names[conventions.LATITUDE]].values)]
    expected = expected[..., _positions(np.mod(lon, 360),
                                        np.mod(source[names[conventions.LONGITUDE]].values, 360))]
    np.testing.assert_array_equal(array.values[:, 0], expected)
    assert np.array_equal(array[conventions.TIME].values, source[names[conventions.TIME]].values)

"""The WeatherBench 2 recipes (configs/prepare_wb2_*.yaml) on local stores with WB2's schema.

Each recipe is loaded with the project's config loader, pointed at a small local zarr written
with the exact layout of the real store (tests/wb2_schema.py: variable names and attributes,
dimension order, latitude direction, poles, coordinate dtypes, zarr v2 consolidated) and run
through ``prepare``; the store must hold the 83 channels in the documented order, the source's
values, no TOA channel, ascending latitude, and open with ``weathermodel inspect``.
"""
from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
import zarr

from weathermodel import cli
from weathermodel.configuration import load_config
from weathermodel.data.config import PrepareConfig, parse_time
from weathermodel.data.prepare import prepare
from weathermodel.data.store import open_store, read_metadata

from conftest import PROJECT_ROOT, free_port
from wb2_schema import (PRESSURE_LEVEL_VARIABLES, SINGLE_LEVEL_VARIABLES, STATIC_VARIABLES,
                        WB2_LEVELS, WB2Grid, grid_64x32, grid_240x121, grid_1440x721,
                        write_wb2_store)

WB2_BUCKET = "https://storage.googleapis.com/weatherbench2/datasets/era5/"
TOA = "toa_incident_solar_radiation"

#: recipe -> the layout of the store it reads
RECIPES: dict[str, Callable[[], WB2Grid]] = {
    "prepare_wb2_64x32.yaml": grid_64x32,
    "prepare_wb2_240x121.yaml": grid_240x121,
    "prepare_wb2_1440x721.yaml": grid_1440x721,
}

#: the documented channel order: pressure-level variables (levels ascending), then single-level
_ORDERED_LEVEL_VARIABLES = ("temperature", "geopotential", "u_component_of_wind",
                            "v_component_of_wind", "vertical_velocity", "specific_humidity")
EXPECTED_CHANNELS = [f"{name}_{level}" for name in _ORDERED_LEVEL_VARIABLES
                     for level in WB2_LEVELS] + list(SINGLE_LEVEL_VARIABLES)


def load_recipe(name: str, output: Path | None = None) -> PrepareConfig:
    """A recipe as ``weathermodel prepare --config`` loads it (output overridden)."""
    overrides = [f"output={output}"] if output is not None else []
    return load_config(PrepareConfig, PROJECT_ROOT / "configs" / name, overrides)


def source_times(config: PrepareConfig) -> pd.DatetimeIndex:
    """One step before the recipe's start (must be left out) and three from it."""
    start = parse_time(config.start, "start")
    return pd.date_range(start - pd.Timedelta("6h"), periods=4, freq="6h")


@dataclass
class Prepared:
    recipe: str
    grid: WB2Grid
    source_path: Path
    source: xr.Dataset
    store: Path


def run_recipe(recipe: str, folder: Path, leave_out: tuple[str, ...] = (),
               auto_detect: bool = False) -> Prepared:
    """Write the recipe's store under its real name in ``folder`` and prepare it."""
    grid = RECIPES[recipe]()
    config = load_recipe(recipe, folder / "store.zarr")
    source_path = folder / grid.store_name
    source = write_wb2_store(source_path, grid, source_times(config), leave_out=leave_out)
    config.sources[0].path = str(source_path)
    if auto_detect:  # every variable the package recognises, as `weathermodel prepare URL` does
        config.sources[0].variables = {}
    return Prepared(recipe, grid, source_path, source, prepare(config, progress=False))


@pytest.fixture(scope="module", params=sorted(RECIPES))
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    return run_recipe(request.param, tmp_path_factory.mktemp("wb2"))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_reads_the_real_store(recipe: str) -> None:
    config = load_recipe(recipe)
    assert len(config.sources) == 1
    assert config.sources[0].path == WB2_BUCKET + RECIPES[recipe]().store_name
    assert config.levels == [float(level) for level in WB2_LEVELS]
    assert config.time_step == "6h"
    mapped = config.sources[0].variables
    assert set(mapped) == set(PRESSURE_LEVEL_VARIABLES + SINGLE_LEVEL_VARIABLES
                              + STATIC_VARIABLES)
    assert all(spec.name == name and spec.units is None for name, spec in mapped.items())
    assert TOA not in mapped
    assert parse_time(config.start) < parse_time(config.end) <= parse_time("2023-01-10T18")
    assert parse_time(config.start) >= parse_time("1959-01-01")
    # the commented statistics period (training years) is a valid option once uncommented
    text = (PROJECT_ROOT / "configs" / recipe).read_text()
    line = next(line for line in text.splitlines() if line.startswith("# statistics:"))
    period = yaml.safe_load(line.removeprefix("# "))["statistics"]
    with_period = load_config(PrepareConfig, PROJECT_ROOT / "configs" / recipe,
                              [f"statistics={json.dumps(period)}"])
    assert with_period.statistics is not None
    assert parse_time(config.start) == parse_time(with_period.statistics.start)
    assert parse_time(with_period.statistics.end) < parse_time(config.end)


def test_channels_in_order_without_toa(prepared: Prepared) -> None:
    ds = open_store(prepared.store)
    channels = [str(c) for c in ds["channel"].values]
    assert channels == EXPECTED_CHANNELS
    assert len(channels) == 6 * 13 + 5
    assert not any(TOA in channel for channel in channels)
    meta = read_metadata(prepared.store)
    assert TOA in meta["forcings"]  # computed from solar geometry instead
    assert meta["statics"][-2:] == ["land_sea_mask", "geopotential_at_surface"]
    assert meta["levels"] == [float(level) for level in WB2_LEVELS]
    assert meta["complete"] is True


def test_values_equal_the_source(prepared: Prepared) -> None:
    ds = open_store(prepared.store)
    times = ds["time"].values
    np.testing.assert_array_equal(times, prepared.source["time"].values[1:])
    state = ds["state"].values
    assert state.shape == (3, 1, 83, prepared.grid.latitude.size, prepared.grid.longitude.size)
    for index, channel in enumerate(ds["channel"].values):
        name, level = _split_channel(str(channel))
        expected = prepared.source[name]
        if level is not None:
            expected = expected.sel(level=level)
        expected = expected.sel(time=times).transpose("time", "latitude", "longitude")
        np.testing.assert_array_equal(state[:, 0, index], expected.sortby("latitude").values,
                                      err_msg=str(channel))
    statics = ds["statics"].sel(static=list(STATIC_VARIABLES)).values
    for values, name in zip(statics, STATIC_VARIABLES):
        expected = prepared.source[name].transpose("latitude", "longitude").sortby("latitude")
        np.testing.assert_array_equal(values, expected.values, err_msg=name)


def test_known_points_read_from_the_raw_zarr(prepared: Prepared) -> None:
    """Points read from the source's zarr arrays with zarr alone (its own dimension order and
    latitude direction), including both poles where the grid has them."""
    ds = open_store(prepared.store)
    raw = zarr.open_group(str(prepared.source_path), mode="r")
    raw_lat, raw_lon = raw["latitude"][:], raw["longitude"][:]
    raw_level = list(raw["level"][:])
    channels = list(ds["channel"].values)
    lat, lon = ds["latitude"].values, ds["longitude"].values
    points = [(0, "temperature", 850, lat.size - 1, 0), (1, "geopotential", 500, 0, lon.size // 3),
              (2, "specific_humidity", 1000, lat.size // 2, lon.size - 1),
              (2, "vertical_velocity", 50, lat.size // 3, 5),
              (1, "mean_sea_level_pressure", None, lat.size - 2, lon.size // 2),
              (0, "total_precipitation_6hr", None, lat.size // 2, lon.size // 4)]
    for t, name, level, i, j in points:
        array = raw[name]
        dims = array.attrs["_ARRAY_DIMENSIONS"]
        where = {"time": t + 1, "level": raw_level.index(level) if level else None,
                 "latitude": int(np.flatnonzero(np.isclose(raw_lat, lat[i], atol=1e-4))[0]),
                 "longitude": int(np.flatnonzero(np.isclose(raw_lon, lon[j], atol=1e-4))[0])}
        expected = array[tuple(where[d] for d in dims)]
        channel = channels.index(f"{name}_{level}" if level else name)
        assert ds["state"].values[t, 0, channel, i, j] == expected, (name, level, i, j)


def test_grid_ascending_with_poles_as_the_store(prepared: Prepared) -> None:
    ds = open_store(prepared.store)
    lat = ds["latitude"].values
    assert np.all(np.diff(lat) > 0)
    has_poles = prepared.grid.latitude.max() == 90.0
    assert (lat[0], lat[-1]) == ((-90.0, 90.0) if has_poles else (-87.1875, 87.1875))
    np.testing.assert_allclose(ds["longitude"].values, np.sort(prepared.grid.longitude))
    grid = read_metadata(prepared.store)["grid"]
    assert grid["kind"] == "regular" and grid["is_global"] is True


def test_inspect_prints_the_store(prepared: Prepared, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["inspect", str(prepared.store)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert summary["complete"] is True
    assert summary["channels"] == EXPECTED_CHANNELS
    assert summary["time_step_seconds"] == 6 * 3600 and summary["n_times"] == 3


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


def test_recipe_reads_the_store_over_http(tmp_path: Path) -> None:
    """The recipe's URL, with the bucket's host replaced by a loopback server: the consolidated
    zarr v2 store is read through fsspec's HTTP file system, as from Google Cloud Storage."""
    recipe = "prepare_wb2_64x32.yaml"
    grid = RECIPES[recipe]()
    config = load_recipe(recipe, tmp_path / "from_url.zarr")
    source = write_wb2_store(tmp_path / "bucket" / grid.store_name, grid, source_times(config))
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", free_port()),
        functools.partial(_QuietHandler, directory=str(tmp_path / "bucket")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config.sources[0].path = config.sources[0].path.replace(
            "https://storage.googleapis.com/weatherbench2/datasets/era5",
            f"http://127.0.0.1:{server.server_address[1]}")
        store = prepare(config, progress=False)
    finally:
        server.shutdown()
    ds = open_store(store)
    assert list(ds["channel"].values) == EXPECTED_CHANNELS
    expected = source["temperature"].sel(level=850).isel(time=slice(1, None))
    np.testing.assert_array_equal(ds["state"].values[:, 0, EXPECTED_CHANNELS.index(
        "temperature_850")], expected.transpose("time", "latitude", "longitude").values)


def test_auto_detected_toa_is_not_a_channel(tmp_path: Path) -> None:
    """`weathermodel prepare <store>` without a variable mapping: TOA radiation is computed by
    the package (registry kind ``computed``), so the store's copy is skipped, with a note."""
    result = run_recipe("prepare_wb2_64x32.yaml", tmp_path, auto_detect=True,
                        leave_out=("total_precipitation_24hr",))
    channels = [str(c) for c in open_store(result.store)["channel"].values]
    assert channels == EXPECTED_CHANNELS
    meta = read_metadata(result.store)
    assert TOA in meta["forcings"]
    assert any(TOA in note and "skipped" in note for note in meta["notes"])


def test_auto_detected_24h_precipitation_is_not_hourly_precipitation(tmp_path: Path) -> None:
    """WB2 stores carry ``short_name: tp`` on total_precipitation_6hr/12hr/24hr alike: a 24-hour
    sum must not be ingested as ``total_precipitation`` (ERA5's hourly accumulation)."""
    result = run_recipe("prepare_wb2_64x32.yaml", tmp_path, auto_detect=True,
                        leave_out=(TOA,))
    channels = [str(c) for c in open_store(result.store)["channel"].values]
    assert "total_precipitation_6hr" in channels
    assert "total_precipitation" not in channels


def _split_channel(channel: str) -> tuple[str, int | None]:
    """``temperature_850`` -> ("temperature", 850); ``2m_temperature`` -> (..., None)."""
    head, _, tail = channel.rpartition("_")
    if head in PRESSURE_LEVEL_VARIABLES and tail.isdigit():
        return head, int(tail)
    return channel, None

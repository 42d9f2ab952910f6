"""A corpus of bad inputs, each made from the real sample files, run through ``prepare``.

Every bad input must be refused with an error that names the file, the variable where one is
concerned, the problem, and a ``fix:`` line; and nothing that already exists may be damaged.
The files are written into ``tmp_path``; the shared sample data is only read.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from weathermodel.configuration import from_dict
from weathermodel.conventions import STANDARD_GRAVITY
from weathermodel.data.config import PrepareConfig, SourceSpec, VariableSpec
from weathermodel.data.prepare import prepare
from weathermodel.data.store import read_metadata
from weathermodel.errors import ConfigError, DataError, StoreError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FEW_DAYS = {"start": "2013-01-01", "end": "2013-01-03T18"}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning",
                                        "ignore::xarray.SerializationWarning")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _plain(ds: xr.Dataset) -> xr.Dataset:
    """Drop the on-disk encoding (int16 packing, chunking) so a modified copy is written as is."""
    for variable in ds.variables.values():
        variable.encoding = {}
    return ds


def _write(ds: xr.Dataset, path: Path, **kwargs) -> Path:
    _plain(ds).to_netcdf(path, **kwargs)
    return path


def _config(tmp_path: Path, *sources: SourceSpec | str, out: str = "store.zarr",
            **options) -> PrepareConfig:
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(str(s)) for s in sources]
    return PrepareConfig(sources=specs, output=str(tmp_path / out), **options)


def _refused(config: PrepareConfig, error_type: type = DataError, **kwargs) -> str:
    with pytest.raises(error_type) as info:
        prepare(config, progress=False, **kwargs)
    return str(info.value)


def assert_explains(message: str, path: str | Path, *problem: str, variable: str | None = None,
                    fix: tuple[str, ...] = ()) -> None:
    """The message names the file, the variable, the problem, and has an actionable fix line."""
    assert f"file '{path}'" in message, message
    if variable is not None:
        assert f"variable '{variable}'" in message, message
    head, sep, fix_text = message.partition("\n  fix: ")
    assert sep, f"no 'fix:' line in {message!r}"
    assert len(fix_text.split()) >= 3, f"fix line too thin: {fix_text!r}"
    for word in problem:
        assert word.lower() in head.lower(), f"{word!r} not in the problem: {message}"
    for word in fix:
        assert word.lower() in fix_text.lower(), f"{word!r} not in the fix: {message}"


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "weathermodel.cli", "prepare", *map(str, args), "--no-progress"],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=180)


def assert_cli_refuses(result: subprocess.CompletedProcess) -> str:
    """Exit code 2, 'error: ...' on stderr, no traceback; returns the error text."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith(
        ("WARNING", "INFO")) and "Warning" not in line and "warnings.warn" not in line]
    text = "\n".join(lines)
    start = text.find("error: ")
    assert start >= 0, result.stderr
    return text[start + len("error: "):]


def tree_hash(path: Path) -> str:
    """sha256 over every file (relative name and content) below ``path``."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            digest.update(str(full.relative_to(path)).encode() + b"\0")
            digest.update(full.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def ncep(ncep_file: Path) -> xr.Dataset:
    """The first three months of the real NCEP record, decoded, in memory."""
    with xr.open_dataset(ncep_file) as ds:
        return _plain(ds.isel(time=slice(0, 360)).load())


@pytest.fixture
def ncep_small(ncep: xr.Dataset, tmp_path: Path) -> Path:
    """The first 3 days of the real NCEP file, written unchanged to tmp_path."""
    return _write(ncep.isel(time=slice(0, 12)), tmp_path / "ncep_small.nc")


def _store_values(store: Path) -> xr.Dataset:
    return xr.open_zarr(str(store), consolidated=False).load()


# --------------------------------------------------------------------------------------------
# 1. missing variables
# --------------------------------------------------------------------------------------------
def test_mapped_variable_not_in_file(ncep_file: Path, tmp_path: Path) -> None:
    spec = SourceSpec(str(ncep_file), variables={"t2m": VariableSpec("2m_temperature")})
    message = _refused(_config(tmp_path, spec, **FEW_DAYS))
    assert_explains(message, ncep_file, "not found", "'air'", variable="t2m",
                    fix=("variables",))
    assert not (tmp_path / "store.zarr").exists()


def test_mapped_variable_not_in_file_cli(ncep_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [{"path": str(ncep_file), "variables": {"t2m": {"name": "2m_temperature"}}}],
        "output": str(tmp_path / "store.zarr"), **FEW_DAYS}))
    message = assert_cli_refuses(run_cli("--config", config, cwd=tmp_path))
    assert_explains(message, ncep_file, "not found", variable="t2m", fix=("variables",))


def test_requested_variable_absent(ncep_file: Path, tmp_path: Path) -> None:
    message = _refused(_config(tmp_path, ncep_file, variables=["geopotential"], **FEW_DAYS))
    assert_explains(message, ncep_file, "none of the sources", "2m_temperature",
                    variable="geopotential", fix=("variables",))


def test_requested_variable_absent_cli(ncep_file: Path, tmp_path: Path) -> None:
    result = run_cli(ncep_file, "--out", tmp_path / "store.zarr", "--variables", "geopotential",
                     "--start", FEW_DAYS["start"], "--end", FEW_DAYS["end"], cwd=tmp_path)
    message = assert_cli_refuses(result)
    assert_explains(message, ncep_file, "none of the sources", variable="geopotential",
                    fix=("variables",))
    assert not (tmp_path / "store.zarr").exists()


# --------------------------------------------------------------------------------------------
# 2. units
# --------------------------------------------------------------------------------------------
def _celsius(ncep: xr.Dataset, units: str | None) -> xr.Dataset:
    ds = ncep.isel(time=slice(0, 12)).copy(deep=True)
    ds["air"] = (ds["air"] - 273.15).astype("float32")
    ds["air"].attrs = {k: v for k, v in ncep["air"].attrs.items()
                       if k not in ("units", "actual_range")}
    if units is not None:
        ds["air"].attrs["units"] = units
    return ds


def test_celsius_labelled_kelvin_is_refused(ncep: xr.Dataset, tmp_path: Path) -> None:
    path = _write(_celsius(ncep, "degK"), tmp_path / "air_celsius_as_degK.nc")
    message = _refused(_config(tmp_path, path))
    assert_explains(message, path, "plausible range", "Celsius", variable="air",
                    fix=("units",))
    assert not (tmp_path / "store.zarr").exists()


def test_celsius_labelled_kelvin_is_refused_cli(ncep: xr.Dataset, tmp_path: Path) -> None:
    path = _write(_celsius(ncep, "degK"), tmp_path / "air_celsius_as_degK.nc")
    message = assert_cli_refuses(run_cli(path, "--out", tmp_path / "store.zarr", cwd=tmp_path))
    assert_explains(message, path, "plausible range", "Celsius", variable="air",
                    fix=("units",))


def test_celsius_labelled_celsius_is_converted(ncep: xr.Dataset, tmp_path: Path) -> None:
    path = _write(_celsius(ncep, "degC"), tmp_path / "air_degC.nc")
    store = prepare(_config(tmp_path, path), progress=False)
    stored = _store_values(store)["state"].sel(channel="2m_temperature").isel(number=0)
    original = ncep["air"].isel(time=slice(0, 12)).rename(lat="latitude", lon="longitude")
    original = original.sortby("latitude")
    np.testing.assert_allclose(stored.values, original.values, atol=1e-3)
    notes = read_metadata(store)["notes"]
    assert any("Celsius" in note for note in notes), notes


def test_no_units_attribute_is_refused(ncep: xr.Dataset, tmp_path: Path) -> None:
    ds = ncep.isel(time=slice(0, 12)).copy(deep=True)
    del ds["air"].attrs["units"]
    path = _write(ds, tmp_path / "air_no_units.nc")
    message = _refused(_config(tmp_path, path))
    assert_explains(message, path, "units", variable="air", fix=("units: K",))


def test_unknown_units_are_refused(ncep: xr.Dataset, tmp_path: Path) -> None:
    ds = ncep.isel(time=slice(0, 12)).copy(deep=True)
    ds["air"].attrs["units"] = "furlongs"
    path = _write(ds, tmp_path / "air_furlongs.nc")
    message = _refused(_config(tmp_path, path))
    assert_explains(message, path, "furlongs", "cannot be converted", variable="air",
                    fix=("units",))


# --------------------------------------------------------------------------------------------
# 3. geopotential height given as geopotential
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eraint_z(data_dir: Path) -> xr.DataArray:
    with xr.open_dataset(data_dir / "xarray-data" / "eraint_uvz.nc") as ds:
        return ds["z"].load()


def _height_file(eraint_z: xr.DataArray, units: str, path: Path) -> Path:
    height = (eraint_z / STANDARD_GRAVITY).astype("float32")
    height.attrs = {**eraint_z.attrs, "units": units}
    return _write(height.to_dataset(name="z"), path)


def _eraint_spec(path: Path) -> SourceSpec:
    return SourceSpec(str(path), select={"month": 1}, assume_time="2000-01-01")


def test_geopotential_height_labelled_geopotential_is_refused(eraint_z: xr.DataArray,
                                                              tmp_path: Path) -> None:
    path = _height_file(eraint_z, "m**2 s**-2", tmp_path / "z_height_as_geopotential.nc")
    message = _refused(_config(tmp_path, _eraint_spec(path), time_step="6h"))
    assert_explains(message, path, "geopotential height", variable="z", fix=("units: m",))


def test_geopotential_height_in_metres_is_converted(eraint_z: xr.DataArray,
                                                    tmp_path: Path) -> None:
    path = _height_file(eraint_z, "m", tmp_path / "z_height_m.nc")
    store = prepare(_config(tmp_path, _eraint_spec(path), time_step="6h"), progress=False)
    state = _store_values(store)["state"].isel(time=0, number=0)
    original = eraint_z.sel(month=1)
    original = original.assign_coords(longitude=np.mod(original["longitude"], 360.0))
    original = original.sortby(["latitude", "longitude"])
    for level in (200, 500, 850):
        stored = state.sel(channel=f"geopotential_{level}")
        np.testing.assert_allclose(stored.values, original.sel(level=level).values, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 4. grid
# --------------------------------------------------------------------------------------------
def _swapped_latitude(ncep: xr.Dataset, tmp_path: Path) -> Path:
    order = list(range(ncep.sizes["lat"]))
    order[3], order[4] = order[4], order[3]
    return _write(ncep.isel(time=slice(0, 12), lat=order), tmp_path / "air_lat_swapped.nc")


def test_non_monotonic_latitude_is_refused(ncep: xr.Dataset, tmp_path: Path) -> None:
    path = _swapped_latitude(ncep, tmp_path)
    message = _refused(_config(tmp_path, path))
    assert_explains(message, path, "latitude", "monotonic", fix=("sort",))


def test_non_monotonic_latitude_is_refused_cli(ncep: xr.Dataset, tmp_path: Path) -> None:
    path = _swapped_latitude(ncep, tmp_path)
    message = assert_cli_refuses(run_cli(path, "--out", tmp_path / "store.zarr", cwd=tmp_path))
    assert_explains(message, path, "latitude", "monotonic", fix=("sort",))
    assert not (tmp_path / "store.zarr").exists()


def _coarse_dewpoint(ncep: xr.Dataset, tmp_path: Path) -> Path:
    coarse = ncep.isel(time=slice(0, 12), lat=slice(None, None, 2), lon=slice(None, None, 2))
    coarse = coarse.rename(air="d2m")
    coarse["d2m"].attrs["units"] = "K"
    return _write(coarse, tmp_path / "d2m_5deg.nc")


def test_mixed_grids_are_refused(ncep: xr.Dataset, ncep_small: Path, tmp_path: Path) -> None:
    coarse = _coarse_dewpoint(ncep, tmp_path)
    message = _refused(_config(tmp_path, ncep_small, coarse))
    assert_explains(message, coarse, "mixed grids", str(ncep_small), fix=("regrid",))


def test_mixed_grids_are_refused_cli(ncep: xr.Dataset, ncep_small: Path,
                                     tmp_path: Path) -> None:
    coarse = _coarse_dewpoint(ncep, tmp_path)
    result = run_cli(ncep_small, coarse, "--out", tmp_path / "store.zarr", cwd=tmp_path)
    assert_explains(assert_cli_refuses(result), coarse, "mixed grids", fix=("regrid",))


# --------------------------------------------------------------------------------------------
# 5. missing values
# --------------------------------------------------------------------------------------------
@pytest.fixture
def ncep_with_nans(ncep: xr.Dataset, tmp_path: Path) -> Path:
    ds = ncep.copy(deep=True)
    holes = np.random.default_rng(0).random(ds["air"].shape) < 0.30
    ds["air"] = ds["air"].where(~holes).astype("float32")
    return _write(ds, tmp_path / "air_30pct_nan.nc")


def test_too_many_nans_are_refused(ncep_with_nans: Path, tmp_path: Path) -> None:
    message = _refused(_config(tmp_path, ncep_with_nans, start="2013-02-01",
                               end="2013-02-03"))
    assert_explains(message, ncep_with_nans, "missing", "max_missing_fraction",
                    variable="2m_temperature", fix=("max_missing_fraction",))
    fraction = float(message.split("% of the values")[0].split()[-1])
    assert 28.0 < fraction < 32.0, message


def test_nans_below_the_limit_are_accepted(ncep_with_nans: Path, tmp_path: Path) -> None:
    store = prepare(_config(tmp_path, ncep_with_nans, start="2013-02-01", end="2013-02-03",
                            max_missing_fraction=0.5), progress=False)
    metadata = read_metadata(store)
    assert metadata["complete"]
    state = _store_values(store)["state"].values
    assert 0.28 < np.isnan(state).mean() < 0.32
    assert np.isfinite(metadata["statistics"]["2m_temperature"]["mean"])


# --------------------------------------------------------------------------------------------
# 6. truncated files
# --------------------------------------------------------------------------------------------
def _truncate(source: Path, target: Path, fraction: float = 0.6, extra: int = 0) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[:int(len(data) * fraction) + extra])
    return target


def test_truncated_ncep_file_is_refused(ncep_file: Path, tmp_path: Path) -> None:
    path = _truncate(ncep_file, tmp_path / "air_truncated.nc")
    message = _refused(_config(tmp_path, path, **FEW_DAYS))
    assert_explains(message, path, "truncated", "corrupt", fix=("re-download",))


def test_truncated_netcdf4_copy_is_refused_cli(ncep: xr.Dataset, tmp_path: Path) -> None:
    copy = _write(ncep.isel(time=slice(0, 40)), tmp_path / "copy4.nc", format="NETCDF4")
    path = _truncate(copy, tmp_path / "copy4_truncated.nc")
    message = _refused(_config(tmp_path, path))
    assert_explains(message, path, "truncated", fix=("re-download",))
    result = run_cli(path, "--out", tmp_path / "store.zarr", cwd=tmp_path)
    assert_explains(assert_cli_refuses(result), path, "truncated", fix=("re-download",))


def test_truncated_netcdf3_copy_is_refused(ncep: xr.Dataset, tmp_path: Path) -> None:
    copy = _write(ncep.isel(time=slice(0, 40)), tmp_path / "copy3.nc", format="NETCDF3_CLASSIC")
    path = _truncate(copy, tmp_path / "copy3_truncated.nc")
    message = _refused(_config(tmp_path, path))
    assert_explains(message, path, "truncated", fix=("re-download",))


def test_truncated_grib_is_refused(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "earthkit-data" / "pl_regular_ll.grib"
    # 60 % falls exactly on a message boundary of this file (1560-byte messages): cut inside one
    path = _truncate(source, tmp_path / "pl_truncated.grib", extra=777)
    message = _refused(_config(tmp_path, SourceSpec(str(path), forecast_step="0h")))
    assert_explains(message, path, "truncated", fix=("re-download",))
    assert not list(tmp_path.glob("*.idx"))
    result = run_cli("--config", _yaml(tmp_path, {
        "sources": [{"path": str(path), "forecast_step": "0h"}],
        "output": str(tmp_path / "store.zarr")}), cwd=tmp_path)
    assert_explains(assert_cli_refuses(result), path, "truncated", fix=("re-download",))


def test_grib_cut_between_messages_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """A cut on a message boundary leaves a valid but shorter GRIB file: the fields it lost
    come back as missing values, which the default max_missing_fraction (0) refuses."""
    source = data_dir / "earthkit-data" / "pl_regular_ll.grib"
    path = _truncate(source, tmp_path / "pl_cut.grib")
    message = _refused(_config(tmp_path, SourceSpec(str(path), forecast_step="0h")))
    assert_explains(message, path, "missing", fix=("missing values",))


# --------------------------------------------------------------------------------------------
# 8. time axis
# --------------------------------------------------------------------------------------------
def _duplicated(ncep: xr.Dataset, tmp_path: Path) -> Path:
    first = ncep.isel(time=slice(0, 10))
    return _write(xr.concat([first, first], dim="time"), tmp_path / "air_duplicated.nc")


@pytest.mark.parametrize("bounds", [{}, {"start": "2013-01-01", "end": "2013-01-02"}],
                         ids=["all", "start-end"])
def test_duplicated_times_are_refused(ncep: xr.Dataset, tmp_path: Path, bounds: dict) -> None:
    path = _duplicated(ncep, tmp_path)
    message = _refused(_config(tmp_path, path, **bounds))
    assert_explains(message, path, "duplicated times", "2013-01-01 00:00:00",
                    fix=("duplicated",))


def test_duplicated_times_are_refused_cli(ncep: xr.Dataset, tmp_path: Path) -> None:
    path = _duplicated(ncep, tmp_path)
    result = run_cli(path, "--out", tmp_path / "store.zarr", "--on-gap", "skip", cwd=tmp_path)
    assert_explains(assert_cli_refuses(result), path, "duplicated times", fix=("duplicated",))
    assert not (tmp_path / "store.zarr").exists()


def test_overlapping_files_are_refused(ncep: xr.Dataset, tmp_path: Path) -> None:
    first = _write(ncep.isel(time=slice(0, 10)), tmp_path / "air_a.nc")
    second = _write(ncep.isel(time=slice(8, 16)), tmp_path / "air_b.nc")
    message = _refused(_config(tmp_path, first, second))
    assert_explains(message, f"{first} (and 1 other files)", "duplicated times",
                    "2013-01-03 00:00:00", "2013-01-03 06:00:00", fix=("overlapping files",))
    # the same record split without overlap is one record (a glob of monthly files)
    split = tmp_path / "split"
    split.mkdir()
    _write(ncep.isel(time=slice(0, 8)), split / "air_1.nc")
    _write(ncep.isel(time=slice(8, 16)), split / "air_2.nc")
    store = prepare(_config(tmp_path, str(split / "air_*.nc")), progress=False)
    stored = _store_values(store)["state"].isel(number=0).sel(channel="2m_temperature")
    np.testing.assert_allclose(stored.values, ncep["air"].values[:16, ::-1], atol=1e-3)


def test_irregular_time_is_refused(ncep: xr.Dataset, tmp_path: Path) -> None:
    ds = ncep.isel(time=slice(0, 12))
    times = ds["time"].values.copy()
    times[5] = times[5] + np.timedelta64(3, "h")
    path = _write(ds.assign_coords(time=times), tmp_path / "air_irregular.nc")
    message = _refused(_config(tmp_path, path))
    assert_explains(message, path, "irregular or missing", "2013-01-02 09:00:00",
                    fix=("on-gap skip",))


def _with_missing_steps(ncep: xr.Dataset, tmp_path: Path) -> tuple[Path, list[list[str]]]:
    keep = [i for i in range(20) if i not in (5, 6, 13)]
    ds = ncep.isel(time=keep)
    index = pd.DatetimeIndex(ds["time"].values)
    gaps = [[str(index[i]), str(index[i + 1]), str(index[i + 1] - index[i])]
            for i in range(len(index) - 1) if index[i + 1] - index[i] != pd.Timedelta("6h")]
    return _write(ds, tmp_path / "air_missing_steps.nc"), gaps


def test_missing_times_are_refused_then_skipped(ncep: xr.Dataset, tmp_path: Path) -> None:
    path, gaps = _with_missing_steps(ncep, tmp_path)
    assert len(gaps) == 2
    message = _refused(_config(tmp_path, path))
    assert_explains(message, path, "2 irregular or missing step(s)", gaps[0][0], gaps[1][1],
                    fix=("on-gap skip",))
    assert not (tmp_path / "store.zarr").exists()

    store = prepare(_config(tmp_path, path, on_gap="skip"), progress=False)
    metadata = read_metadata(store)
    assert metadata["complete"]
    assert metadata["gaps"] == gaps
    consecutive = _store_values(store)["consecutive"].values
    assert int((~consecutive[1:]).sum()) == 2


# --------------------------------------------------------------------------------------------
# 9. nothing existing is damaged
# --------------------------------------------------------------------------------------------
@pytest.fixture
def good_store(ncep_small: Path, tmp_path: Path) -> Path:
    store = prepare(_config(tmp_path, ncep_small, out="good.zarr"), progress=False)
    assert read_metadata(store)["complete"]
    return store


def test_bad_input_leaves_an_existing_store_untouched(good_store: Path, ncep: xr.Dataset,
                                                      tmp_path: Path) -> None:
    before = tree_hash(good_store)
    bad_units = _write(_celsius(ncep, "degK"), tmp_path / "air_celsius_as_degK.nc")
    for extra in ([], ["--overwrite"]):
        result = run_cli(bad_units, "--out", good_store, *extra, cwd=tmp_path)
        assert_explains(assert_cli_refuses(result), bad_units, "plausible range")
        assert tree_hash(good_store) == before
    duplicated = _duplicated(ncep, tmp_path)
    result = run_cli(duplicated, "--out", good_store, "--overwrite", cwd=tmp_path)
    assert_explains(assert_cli_refuses(result), duplicated, "duplicated")
    assert tree_hash(good_store) == before


def test_input_refused_while_writing_leaves_an_existing_store_untouched(
        good_store: Path, ncep_with_nans: Path, tmp_path: Path) -> None:
    before = tree_hash(good_store)
    result = run_cli(ncep_with_nans, "--out", good_store, "--start", "2013-01-01",
                     "--end", "2013-01-03T18", cwd=tmp_path)
    message = assert_cli_refuses(result)
    assert_explains(message, good_store, "other inputs or options", "left untouched",
                    fix=("--overwrite",))
    assert tree_hash(good_store) == before


def test_overwrite_with_input_refused_while_writing_keeps_the_old_store(
        good_store: Path, ncep_with_nans: Path, tmp_path: Path) -> None:
    before = tree_hash(good_store)
    config = _config(tmp_path, ncep_with_nans, out="good.zarr", **FEW_DAYS)
    _refused(config, overwrite=True)
    assert tree_hash(good_store) == before


def test_different_config_without_overwrite_is_refused(good_store: Path, ncep_small: Path,
                                                       tmp_path: Path) -> None:
    before = tree_hash(good_store)
    config = _config(tmp_path, ncep_small, out="good.zarr", compressor="zstd")
    message = _refused(config, StoreError)
    assert_explains(message, good_store, "other inputs or options", "left untouched",
                    fix=("--overwrite",))
    assert tree_hash(good_store) == before
    # the same config again is a no-op, and --overwrite does replace it
    assert prepare(_config(tmp_path, ncep_small, out="good.zarr"), progress=False) == good_store
    assert tree_hash(good_store) == before
    prepare(config, overwrite=True, progress=False)
    assert read_metadata(good_store)["config"]["compressor"] == "zstd"


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_foreign_folder_at_output_is_refused(ncep_small: Path, tmp_path: Path,
                                             overwrite: bool) -> None:
    folder = tmp_path / "my_results"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("do not delete")
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = tree_hash(folder)
    message = _refused(_config(tmp_path, ncep_small, out="my_results"), StoreError,
                       overwrite=overwrite)
    assert_explains(message, folder, "not a weathermodel store", "left untouched",
                    fix=("another output path",))
    assert tree_hash(folder) == before
    extra = ["--overwrite"] if overwrite else []
    result = run_cli(ncep_small, "--out", folder, *extra, cwd=tmp_path)
    assert_explains(assert_cli_refuses(result), folder, "not a weathermodel store")
    assert tree_hash(folder) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_file_at_output_is_refused(ncep_small: Path, tmp_path: Path, overwrite: bool) -> None:
    target = tmp_path / "result.zarr"
    target.write_text("a file, not a store")
    message = _refused(_config(tmp_path, ncep_small, out="result.zarr"), StoreError,
                       overwrite=overwrite)
    assert_explains(message, target, "not a weathermodel store")
    assert target.read_text() == "a file, not a store"


# --------------------------------------------------------------------------------------------
# 10. configuration errors
# --------------------------------------------------------------------------------------------
def _yaml(tmp_path: Path, data: dict, name: str = "prepare.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("change, key, fix", [
    ({"max_missing_fractoin": 0.1}, "max_missing_fractoin", "max_missing_fraction"),
    ({"sources": [{"path": "X", "varaibles": {}}]}, "sources[0].varaibles", "variables"),
    ({"sources": [{"path": "X", "variables": {"air": {"name": "2m_temperature",
                                                      "unit": "K"}}}]},
     "sources[0].variables.air.unit", "units"),
    ({"time_block": "many"}, "time_block", "integer"),
    ({"max_missing_fraction": [0.5]}, "max_missing_fraction", "number"),
    ({"on_gap": "ignore"}, "on_gap", "skip"),
    ({"sources": [{"path": "X", "variables": {"air": {"name": "2m_temperature",
                                                      "level": "surface"}}}]},
     "sources[0].variables.air.level", "number"),
    ({"sources": "X"}, "sources", "list"),
], ids=["unknown-key", "unknown-source-key", "unknown-variable-key", "int-as-text",
        "float-as-list", "bad-choice", "nested-float-as-text", "list-as-text"])
def test_config_errors_name_the_key(ncep_file: Path, tmp_path: Path, change: dict, key: str,
                                    fix: str) -> None:
    data = {"sources": [{"path": str(ncep_file)}], "output": str(tmp_path / "store.zarr"),
            **FEW_DAYS}
    for name, value in change.items():
        if name == "sources" and isinstance(value, list):
            value = [{**item, "path": str(ncep_file)} for item in value]
        data[name] = value
    with pytest.raises(ConfigError) as info:
        from_dict(PrepareConfig, data)
    api_message = str(info.value)
    assert key in api_message and "\n  fix: " in api_message, api_message
    assert fix in api_message.split("\n  fix: ", 1)[1] or fix in api_message, api_message

    result = run_cli("--config", _yaml(tmp_path, data), cwd=tmp_path)
    message = assert_cli_refuses(result)
    assert key in message and "\n  fix: " in message, message
    assert not (tmp_path / "store.zarr").exists()


def test_unknown_canonical_variable_in_config(ncep_file: Path, tmp_path: Path) -> None:
    data = {"sources": [{"path": str(ncep_file), "variables": {"air": {"name": "t2m"}}}],
            "output": str(tmp_path / "store.zarr")}
    result = run_cli("--config", _yaml(tmp_path, data), cwd=tmp_path)
    message = assert_cli_refuses(result)
    assert "'t2m'" in message and "2m_temperature" in message.split("fix:")[1], message


def test_config_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "prepare.yaml"
    path.write_text("- just\n- a list\n")
    message = assert_cli_refuses(run_cli("--config", path, cwd=tmp_path))
    assert_explains(message, path, "mapping", fix=("key: value",))

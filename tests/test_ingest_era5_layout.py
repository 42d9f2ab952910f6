"""Ingest of ERA5-style downloads: CDS folder layout, statics, land-masked forcings, regional
grids across the prime meridian, CF bounds variables, sources without known variables.

All inputs are real files from ``../shared/data`` or files written here (``tmp_path``) from
them; expected values are read back with ``netCDF4``, ``eccodes`` or ``zarr`` directly.
"""
from __future__ import annotations

import logging
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
import zarr

from weathermodel import conventions
from weathermodel.cli import main as cli_main
from weathermodel.data.config import PrepareConfig, SourceSpec
from weathermodel.data.grid import describe_grid
from weathermodel.data.normalize import to_canonical
from weathermodel.data.prepare import prepare
from weathermodel.data.sources import open_path
from weathermodel.data.store import open_store, read_metadata
from weathermodel.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning",
                                        "ignore::xarray.SerializationWarning")

SPEEDY_LEVELS = (300, 500, 700, 850)
SPEEDY_CHANNELS = sorted(
    [conventions.channel_name(v, lv) for v in ("geopotential", "temperature", "u_component_of_wind",
                                      "v_component_of_wind", "specific_humidity")
     for lv in SPEEDY_LEVELS]
    + ["surface_pressure", "2m_temperature", "10m_u_component_of_wind",
       "10m_v_component_of_wind", "sea_surface_temperature", "mean_total_precipitation_rate"])


@pytest.fixture(scope="module")
def speedy(data_dir: Path) -> Path:
    path = data_dir / "speedy-t21"
    if not (path / "static.nc").exists():
        pytest.skip(f"{path} not found (the speedy-t21 corpus of ../shared/data)")
    return path


def raw_netcdf(path: Path, name: str) -> np.ndarray:
    """A variable read with netCDF4 alone, unpacked by hand; NaN where it is _FillValue."""
    with netCDF4.Dataset(path) as nc:
        var = nc.variables[name]
        var.set_auto_maskandscale(False)
        packed = np.asarray(var[:])
        values = packed.astype("float64") * getattr(var, "scale_factor", 1.0) + getattr(
            var, "add_offset", 0.0)
        fill = getattr(var, "_FillValue", None)
        if fill is not None:
            values[packed == fill] = np.nan
    return values


def _plain(ds: xr.Dataset) -> xr.Dataset:
    for variable in ds.variables.values():
        variable.encoding = {}
    return ds


def run_prepare_cli(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str]:
    code = cli_main(["prepare", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 1. the speedy corpus (ERA5 CDS layout) with no config
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speedy_store(speedy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two months (the end of January and the start of February 2000) of pressure-level and
    single-level files plus static.nc, through the CLI, with no config file."""
    out = tmp_path_factory.mktemp("speedy") / "speedy.zarr"
    code = cli_main(["prepare", str(speedy / "pressure_levels_2000-0[12].nc"),
                     str(speedy / "single_levels_2000-0[12].nc"), str(speedy / "static.nc"),
                     "--start", "2000-01-30", "--end", "2000-02-02T18", "--out", str(out),
                     "--no-progress"])
    assert code == 0
    return out


def test_speedy_channels_and_statics(speedy_store: Path) -> None:
    ds = open_store(speedy_store)
    assert sorted(map(str, ds["channel"].values)) == SPEEDY_CHANNELS
    statics = [str(s) for s in ds["static"].values]
    assert statics[-2:] == ["land_sea_mask", "geopotential_at_surface"]
    assert ds.sizes["time"] == 16  # 2000-01-30T00 .. 2000-02-02T18, 6-hourly, across two files
    metadata = read_metadata(speedy_store)
    assert metadata["time_step_seconds"] == 6 * 3600
    assert metadata["grid"]["kind"] == "gaussian" and metadata["grid"]["is_global"]
    units = {v["name"]: v["units"] for v in metadata["variables"]}
    assert units["mean_total_precipitation_rate"] == "kg m-2 s-1"


def test_speedy_statics_equal_static_nc(speedy_store: Path, speedy: Path) -> None:
    ds = open_store(speedy_store)
    lsm = raw_netcdf(speedy / "static.nc", "lsm")[::-1]  # latitude made ascending
    orography = raw_netcdf(speedy / "static.nc", "z")[::-1]
    np.testing.assert_array_equal(ds["statics"].sel(static="land_sea_mask").values,
                                  lsm.astype("float32"))
    np.testing.assert_array_equal(ds["statics"].sel(static="geopotential_at_surface").values,
                                  orography.astype("float32"))
    assert orography.max() > 3.0e4  # surface geopotential (m2 s-2) of real mountains


def test_speedy_sst_is_nan_exactly_over_land(speedy_store: Path, speedy: Path) -> None:
    ds = open_store(speedy_store)
    sst = ds["state"].sel(channel="sea_surface_temperature").values[:, 0]
    land = ds["statics"].sel(static="land_sea_mask").values > 0.5
    assert 0.2 < land.mean() < 0.5
    np.testing.assert_array_equal(np.isnan(sst), np.broadcast_to(land, sst.shape))
    assert np.all((sst[:, ~land] > 270.0) & (sst[:, ~land] < 310.0))
    # the other channels have no missing value at all
    others = ds["state"].drop_sel(channel="sea_surface_temperature").values
    assert not np.isnan(others).any()


def test_speedy_values_equal_the_netcdf(speedy_store: Path, speedy: Path) -> None:
    ds = open_store(speedy_store)
    times = ds["time"].values
    assert times[0] == np.datetime64("2000-01-30T00", "ns")
    # 2000-02-01T12 is step 7 of the February file (its first step is 2000-02-01T00)
    t_store, t_file = int(np.flatnonzero(times == np.datetime64("2000-02-01T12", "ns"))[0]), 2
    with netCDF4.Dataset(speedy / "single_levels_2000-02.nc") as nc:
        valid = netCDF4.num2date(nc["valid_time"][:], nc["valid_time"].units)
        assert str(valid[t_file]) == "2000-02-01 12:00:00"
    j, i = 5, 17  # raw row 5 (latitude descending) is canonical row 26
    lat_raw = raw_netcdf(speedy / "static.nc", "latitude")
    assert ds["latitude"].values[31 - j] == pytest.approx(lat_raw[j])
    for channel, file, name, level in [
            ("temperature_850", "pressure_levels_2000-02.nc", "t", 3),
            ("geopotential_300", "pressure_levels_2000-02.nc", "z", 0),
            ("mean_total_precipitation_rate", "single_levels_2000-02.nc", "tprate", None),
            ("surface_pressure", "single_levels_2000-02.nc", "sp", None)]:
        raw = raw_netcdf(speedy / file, name)[t_file]
        expected = raw[level, j, i] if level is not None else raw[j, i]
        got = ds["state"].sel(channel=channel).values[t_store, 0, 31 - j, i]
        assert got == np.float32(expected), channel


def test_toa_radiation_in_a_source_is_not_a_channel(speedy: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """tisr is computed by the package as a forcing: a source's copy is skipped with a note."""
    with xr.open_dataset(speedy / "single_levels_2000-01.nc") as ds:
        part = _plain(ds[["t2m"]].isel(valid_time=slice(0, 4)).load())
    part["tisr"] = xr.full_like(part["t2m"], 1.0e6).assign_attrs(units="J m**-2")
    part.to_netcdf(tmp_path / "with_tisr.nc")
    with caplog.at_level(logging.INFO, logger="weathermodel"):
        result = to_canonical(open_path(str(tmp_path / "with_tisr.nc")),
                              SourceSpec(str(tmp_path / "with_tisr.nc")),
                              str(tmp_path / "with_tisr.nc"))
    assert list(result.variables) == ["2m_temperature"]
    assert any("tisr" in note and "computed" in note for note in result.notes)
    assert any("tisr" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------------------------
# missing values of forcings: a fixed mask does not count, random NaNs do
# --------------------------------------------------------------------------------------------
def _speedy_single_levels(speedy: Path, n_times: int) -> xr.Dataset:
    with xr.open_dataset(speedy / "single_levels_2000-01.nc") as ds:
        return _plain(ds[["t2m", "sst"]].isel(valid_time=slice(0, n_times)).load())


def test_random_nans_of_a_forcing_still_count(speedy: Path, tmp_path: Path) -> None:
    ds = _speedy_single_levels(speedy, 8)
    sst = ds["sst"].values.copy()
    rng = np.random.default_rng(1)
    sst[3][rng.random(sst.shape[1:]) < 0.05] = np.nan  # 5 % more NaN over the sea, once
    ds["sst"].values = sst
    ds.to_netcdf(tmp_path / "sst_holes.nc")
    config = PrepareConfig(sources=[SourceSpec(str(tmp_path / "sst_holes.nc"))],
                           output=str(tmp_path / "s.zarr"))
    with pytest.raises(DataError, match="max_missing_fraction") as error:
        prepare(config, progress=False)
    assert "sea_surface_temperature" in str(error.value)


def test_fixed_nans_of_a_state_variable_still_count(speedy: Path, tmp_path: Path) -> None:
    """The mask rule is for forcings only: t2m NaN over land is missing data."""
    ds = _speedy_single_levels(speedy, 8)
    ds["t2m"] = ds["t2m"].where(~np.isnan(ds["sst"].isel(valid_time=0)))
    ds.to_netcdf(tmp_path / "t2m_masked.nc")
    config = PrepareConfig(sources=[SourceSpec(str(tmp_path / "t2m_masked.nc"))],
                           output=str(tmp_path / "s.zarr"))
    with pytest.raises(DataError, match="2m_temperature"):
        prepare(config, progress=False)


# --------------------------------------------------------------------------------------------
# 2. a regional grid across the prime meridian stored in 0..360
# --------------------------------------------------------------------------------------------
GLOBAL_GRIB = "cfgrib/era5-levels-members.grib"  # global 3 degrees, 0..357 E, 90..-90 N
REGION_LON = (348.0, 351.0, 354.0, 357.0, 0.0, 3.0)  # 12 W .. 3 E in file order
REGION_LAT = (60.0, 57.0, 54.0, 51.0, 48.0, 45.0, 42.0, 39.0, 36.0, 33.0, 30.0)


def _global_fields(path: Path) -> dict[tuple, np.ndarray]:
    """(shortName, level, number, date, time) -> field (lat 90..-90, lon 0..357) via eccodes."""
    eccodes = pytest.importorskip("eccodes")
    fields = {}
    with open(path, "rb") as handle:
        while (message := eccodes.codes_grib_new_from_file(handle)) is not None:
            key = tuple(eccodes.codes_get(message, k) for k in
                        ("shortName", "level", "number", "dataDate", "dataTime"))
            fields[key] = eccodes.codes_get_values(message).reshape(61, 120)
            eccodes.codes_release(message)
    return fields


@pytest.fixture(scope="module")
def subarea_grib(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GRIB2 subarea 60..30 N, 348..3 E (stored from 348, unsigned longitudes) of the first
    two members of the real ERA5 ensemble file, written with eccodes."""
    eccodes = pytest.importorskip("eccodes")
    out = tmp_path_factory.mktemp("grib") / "subarea.grib2"
    lon, lat = np.arange(120) * 3.0, 90.0 - np.arange(61) * 3.0
    cols = [int(np.flatnonzero(lon == x)[0]) for x in REGION_LON]
    rows = [int(np.flatnonzero(lat == y)[0]) for y in REGION_LAT]
    with open(data_dir / GLOBAL_GRIB, "rb") as handle, open(out, "wb") as sink:
        while (message := eccodes.codes_grib_new_from_file(handle)) is not None:
            if eccodes.codes_get(message, "number") <= 1:
                values = eccodes.codes_get_values(message).reshape(61, 120)[np.ix_(rows, cols)]
                clone = eccodes.codes_clone(message)
                eccodes.codes_set(clone, "edition", 2)
                for key, value in [("Ni", len(cols)), ("Nj", len(rows)),
                                   ("latitudeOfFirstGridPointInDegrees", REGION_LAT[0]),
                                   ("latitudeOfLastGridPointInDegrees", REGION_LAT[-1]),
                                   ("longitudeOfFirstGridPointInDegrees", REGION_LON[0]),
                                   ("longitudeOfLastGridPointInDegrees", REGION_LON[-1])]:
                    eccodes.codes_set(clone, key, value)
                eccodes.codes_set_values(clone, values.ravel())
                eccodes.codes_write(clone, sink)
                eccodes.codes_release(clone)
            eccodes.codes_release(message)
    return out


def test_grib_subarea_across_the_prime_meridian(subarea_grib: Path, data_dir: Path) -> None:
    result = to_canonical(open_path(str(subarea_grib)), SourceSpec(str(subarea_grib)),
                          str(subarea_grib))
    z = result.variables["geopotential"]
    np.testing.assert_array_equal(z[conventions.LONGITUDE].values, [-12.0, -9.0, -6.0, -3.0, 0.0, 3.0])
    np.testing.assert_array_equal(z[conventions.LATITUDE].values, REGION_LAT[::-1])
    grid = describe_grid(z[conventions.LATITUDE].values, z[conventions.LONGITUDE].values)
    assert not grid.is_global and grid.longitude_range == (-12.0, 3.0)
    fields = _global_fields(data_dir / GLOBAL_GRIB)
    lon, lat = np.arange(120) * 3.0, 90.0 - np.arange(61) * 3.0
    rows = [int(np.flatnonzero(lat == y)[0]) for y in REGION_LAT[::-1]]
    cols = [int(np.flatnonzero(lon == np.mod(x, 360.0))[0]) for x in z[conventions.LONGITUDE].values]
    for name, short in (("geopotential", "z"), ("temperature", "t")):
        for member in (0, 1):
            expected = fields[(short, 500, member, 20170101, 1200)][np.ix_(rows, cols)]
            got = result.variables[name].sel(time=np.datetime64("2017-01-01T12", "ns"),
                                             number=member, level=500.0).values
            # GRIB packing of the subarea: within one packing step of the global field
            np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.ptp(expected))
    # a point west of the meridian (351 E = 9 W) and one east of it (3 E), 51 N
    expected = fields[("t", 850, 1, 20170102, 0)]
    for lon_east, lon_canonical in ((351.0, -9.0), (3.0, 3.0)):
        got = result.variables["temperature"].sel(
            time=np.datetime64("2017-01-02T00", "ns"), number=1, level=850.0, latitude=51.0,
            longitude=lon_canonical).values.item()
        want = expected[int(np.flatnonzero(lat == 51.0)[0]), int(lon_east // 3)]
        assert got == pytest.approx(want, abs=0.05)


def test_netcdf_region_across_the_prime_meridian(speedy: Path, tmp_path: Path) -> None:
    """A netCDF cut 350..360, 0..20 E (stored 0..360, crossing 0) is converted to -180..180."""
    source = speedy / "single_levels_2000-01.nc"
    with xr.open_dataset(source) as ds:
        lon = ds["longitude"].values
        cols = np.r_[np.flatnonzero(lon >= 348.0), np.flatnonzero(lon <= 20.0)]
        part = _plain(ds[["t2m"]].isel(valid_time=slice(0, 4), longitude=cols).load())
    assert part["longitude"].values[0] > 340.0 and part["longitude"].values[-1] < 30.0
    part.to_netcdf(tmp_path / "region.nc")
    result = to_canonical(open_path(str(tmp_path / "region.nc")),
                          SourceSpec(str(tmp_path / "region.nc")), str(tmp_path / "region.nc"))
    t2m = result.variables["2m_temperature"]
    new_lon = t2m[conventions.LONGITUDE].values
    np.testing.assert_allclose(new_lon, np.sort(np.mod(lon[cols] + 180.0, 360.0) - 180.0))
    assert new_lon[0] < 0.0 < new_lon[-1] and np.all(np.diff(new_lon) > 0)
    raw = raw_netcdf(source, "t2m")[2]
    j = 7
    for column in cols:
        canonical = np.mod(lon[column] + 180.0, 360.0) - 180.0
        got = t2m.isel(time=2, number=0).sel(latitude=raw_netcdf(source, "latitude")[j],
                                             longitude=canonical).values.item()
        assert got == np.float32(raw[j, column])


def test_longitudes_going_round_twice_are_refused(speedy: Path, tmp_path: Path) -> None:
    with xr.open_dataset(speedy / "single_levels_2000-01.nc") as ds:
        part = _plain(ds[["t2m"]].isel(valid_time=slice(0, 2)).load())
    twice = xr.concat([part, part], dim="longitude")  # 0..354.375, 0..354.375
    twice.to_netcdf(tmp_path / "twice.nc")
    with pytest.raises(DataError, match="more than once"):
        to_canonical(open_path(str(tmp_path / "twice.nc")), SourceSpec(str(tmp_path / "twice.nc")),
                     str(tmp_path / "twice.nc"))


# --------------------------------------------------------------------------------------------
# 3. a source with no known variable
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unknown_first", [False, True])
def test_source_without_known_variable_is_refused_cli(speedy: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      unknown_first: bool) -> None:
    with xr.open_dataset(speedy / "single_levels_2000-01.nc") as ds:
        part = _plain(ds[["t2m", "sp"]].isel(valid_time=slice(0, 4)).load())
    good = tmp_path / "good.nc"
    part[["t2m"]].to_netcdf(good)
    unknown = tmp_path / "mystery.nc"
    part[["sp"]].rename(sp="mystery_field").to_netcdf(unknown)
    sources = [unknown, good] if unknown_first else [good, unknown]
    code, err = run_prepare_cli(capsys, *sources, "--out", tmp_path / "s.zarr")
    assert code == 2, err
    assert "Traceback" not in err and "StopIteration" not in err
    assert f"file '{unknown}'" in err and "no known variable" in err
    assert "mystery_field" in err and "fix:" in err
    assert not (tmp_path / "s.zarr").exists()


# --------------------------------------------------------------------------------------------
# 4. CF bounds variables
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("time_bounds_dim", ["nv", "two"])
def test_cf_bounds_variables_are_ignored(speedy: Path, tmp_path: Path,
                                         time_bounds_dim: str) -> None:
    """time_bnds (time, nv) as CDO writes it, named by the time's ``bounds`` attribute (also
    with a bounds dimension of no usual name), and lat_bnds/lon_bnds (.., bnds) named by
    nothing: all ignored, the data ingested."""
    source = speedy / "single_levels_2000-01.nc"
    with xr.open_dataset(source) as ds:
        part = _plain(ds[["t2m"]].isel(valid_time=slice(0, 4)).load())
    time = part["valid_time"].values
    part["time_bnds"] = (("valid_time", time_bounds_dim),
                         np.stack([time - np.timedelta64(6, "h"), time], axis=1))
    part["valid_time"].attrs["bounds"] = "time_bnds"
    lat, lon = part["latitude"].values, part["longitude"].values
    part["lat_bnds"] = (("latitude", "bnds"), np.stack([lat - 1.0, lat + 1.0], axis=1))
    part["lon_bnds"] = (("longitude", "bnds"), np.stack([lon - 2.8, lon + 2.8], axis=1))
    path = tmp_path / "with_bounds.nc"
    part.to_netcdf(path)
    with netCDF4.Dataset(path) as nc:  # the file really has them
        assert nc["time_bnds"].dimensions == ("valid_time", time_bounds_dim)
        assert nc["valid_time"].bounds == "time_bnds"
        assert "lat_bnds" in nc.variables and "lon_bnds" in nc.variables
    result = to_canonical(open_path(str(path)), SourceSpec(str(path)), str(path))
    assert list(result.variables) == ["2m_temperature"]
    t2m = result.variables["2m_temperature"]
    assert t2m.sizes[conventions.TIME] == 4
    raw = raw_netcdf(source, "t2m")[3]
    assert t2m.isel(time=3, number=0).values[31 - 4, 9] == np.float32(raw[4, 9])


# --------------------------------------------------------------------------------------------
# 5. real ERA5 zarr v2 (valid_time, pressure_level, expver): msl and 850 hPa vorticity
# --------------------------------------------------------------------------------------------
def test_era5_djf_zarr_stores_ingest(data_dir: Path, tmp_path: Path) -> None:
    folder = data_dir / "era5-global-djf2025"
    vo_path = folder / "era5_vo850_2025-2026_djf_2.5x2.5.zarr"
    msl_path = folder / "era5_msl_2025-2026_djf_2.5x2.5.zarr"
    if not vo_path.exists():
        pytest.skip(f"{vo_path} not found")
    config = PrepareConfig(sources=[SourceSpec(str(msl_path)), SourceSpec(str(vo_path))],
                           output=str(tmp_path / "era5.zarr"), start="2025-12-31T12",
                           end="2026-01-01T12", time_step="6h")
    store = prepare(config, progress=False)
    ds = open_store(store)
    # channels in registry order (levels first)
    assert list(map(str, ds["channel"].values)) == ["vorticity_850", "mean_sea_level_pressure"]
    assert ds.sizes["time"] == 5 and ds.sizes["latitude"] == 73
    metadata = read_metadata(store)
    assert {"name": "vorticity", "units": "s-1",
            "standard_name": "atmosphere_relative_vorticity",
            "levels": [850.0]} in metadata["variables"]
    assert metadata["grid"]["is_global"] and metadata["grid"]["latitude_range"] == [-90.0, 90.0]
    # the steps from 2026-01-01 are preliminary ERA5T (expver 0005): recorded in the notes
    assert any("expver" in note and "0005" in note for note in metadata["notes"])
    # raw values with zarr alone: valid_time index, lat 90..-90 (row 16 is 50 N), lon 0..357.5
    raw_vo = zarr.open_group(str(vo_path), mode="r")
    raw_msl = zarr.open_group(str(msl_path), mode="r")
    times = xr.open_zarr(str(vo_path))["valid_time"].values
    t = int(np.flatnonzero(times == np.datetime64("2026-01-01T06", "ns"))[0])
    got = ds["state"].sel(time=np.datetime64("2026-01-01T06", "ns"), latitude=50.0,
                          longitude=10.0).values[0]
    assert got[0] == np.asarray(raw_vo["vo"][t, 0, 16, 4])
    assert got[1] == np.asarray(raw_msl["msl"][t, 16, 4])
    assert abs(got[0]) < 1e-3 and 9.0e4 < got[1] < 1.1e5

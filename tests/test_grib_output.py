"""GRIB2 output (``weathermodel forecast --format grib``): real forecasts of the shipped
checkpoints read back with cfgrib to the values of the zarr forecast of the same command (within
the 16-bit packing error), with the right shortNames, levels, start dates, steps and valid
times; accumulations and means carry their statistical processing; missing values travel in
the bitmap; a forecast that cannot be written as GRIB is refused before it runs.

Oracle for the values: simple packing with B bits stores ``R + X * 2**E`` with integer
``X < 2**B`` and the smallest ``E`` that spans the field, so a decoded value is off by at most
the field's range / (2**B - 1) (plus float32 rounding of the reference value and the output).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from weathermodel.cli import main
from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.prepare import prepare
from weathermodel.inference.grib import BITS_PER_VALUE, GRIB_PARAMETERS, write_grib
from weathermodel.models.io import read_payload, save_atomic

eccodes = pytest.importorskip("eccodes", reason="the GRIB extra (eccodes, cfgrib) is not "
                              "installed: pip install 'weathermodel[grib]'")
pytest.importorskip("cfgrib", reason="cfgrib is not installed: pip install 'weathermodel[grib]'")

PROJECT = Path(__file__).resolve().parents[1]
SPEEDY_CHECKPOINT = PROJECT / "checkpoints" / "speedy_transformer_2000" / "model.pt"
NCEP_CHECKPOINT = PROJECT / "checkpoints" / "ncep_graph_2013" / "model.pt"
SPEEDY_INIT, LEAD = "2000-01-01T12/2000-01-02T00/12h", "12h"  # two starts, two 6-hour leads
PRECIP = "mean_total_precipitation_rate"
# the zarr stores read here carry zarr v3 consolidated metadata
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


@pytest.fixture(scope="module", autouse=True)
def graph_cache(tmp_path_factory: pytest.TempPathFactory):
    """A mesh cache for the graph checkpoint, outside the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WEATHERMODEL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def _forecast_args(checkpoint: Path, data: Path, init: str, out: Path, *extra: str
                   ) -> list[str]:
    return ["forecast", "--checkpoint", str(checkpoint), "--data", str(data), "--init", init,
            "--lead", LEAD, "--out", str(out), "--no-progress", *extra]


def _prepare(sources: list[Path], out: Path, start: str, end: str) -> Path:
    return prepare(from_dict(PrepareConfig, {"sources": [{"path": str(p)} for p in sources],
                                             "output": str(out), "start": start,
                                             "end": end}), progress=False)


def _open_grib(path: Path, **keys) -> xr.Dataset:
    return xr.open_dataset(path, engine="cfgrib",
                           backend_kwargs={"filter_by_keys": keys, "indexpath": ""})


def _messages(path: Path, *keys: str) -> list[dict]:
    """The given keys of every message, in file order (ecCodes, no cfgrib)."""
    found = []
    with open(path, "rb") as handle:
        while (message := eccodes.codes_grib_new_from_file(handle)) is not None:
            found.append({key: eccodes.codes_get(message, key) for key in keys})
            eccodes.codes_release(message)
    return found


def assert_within_packing(decoded: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Equal within the simple-packing error, field by field (last two axes a field); NaN
    exactly where expected is NaN."""
    decoded, expected = np.asarray(decoded, "float64"), np.asarray(expected, "float64")
    assert decoded.shape == expected.shape, what
    assert np.array_equal(np.isnan(decoded), np.isnan(expected)), f"{what}: missing values"
    fields_decoded = decoded.reshape(-1, *decoded.shape[-2:])
    fields_expected = expected.reshape(-1, *expected.shape[-2:])
    for index, (got, want) in enumerate(zip(fields_decoded, fields_expected)):
        spread = np.nanmax(want) - np.nanmin(want)
        tolerance = spread / (2**BITS_PER_VALUE - 1) + 4 * np.finfo("float32").eps * np.nanmax(
            np.abs(want))
        error = np.nanmax(np.abs(got - want))
        assert error <= tolerance, f"{what} field {index}: error {error} > {tolerance}"
        # and not a coarser packing: the error uses the 16 bits (a sanity check on the oracle)
        assert error <= spread / 2**10, what


@pytest.fixture(scope="module")
def speedy(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two days of the SPEEDY T21 corpus, the shipped global checkpoint's forecast from two
    start dates to 12 h as zarr (the reference) and as GRIB through the CLI."""
    folder = data_dir / "speedy-t21"
    root = tmp_path_factory.mktemp("grib-speedy")
    store = _prepare([folder / "pressure_levels_2000-01.nc", folder / "single_levels_2000-01.nc",
                      folder / "static.nc"], root / "speedy.zarr", "2000-01-01", "2000-01-02T18")
    reference = root / "reference.zarr"
    assert main(_forecast_args(SPEEDY_CHECKPOINT, store, SPEEDY_INIT, reference)) == 0
    grib = root / "grib" / "forecast.grib2"
    assert main(_forecast_args(SPEEDY_CHECKPOINT, store, SPEEDY_INIT, grib, "--format",
                               "grib")) == 0
    return {"store": store, "reference": reference, "grib": grib,
            "single_levels": folder / "single_levels_2000-01.nc"}


def test_forecast_grib_reads_back_with_cfgrib(speedy: dict) -> None:
    grib = speedy["grib"]
    assert grib.read_bytes()[:4] == b"GRIB"
    assert sorted(p.name for p in grib.parent.iterdir()) == ["forecast.grib2"]  # no store left
    reference = xr.open_zarr(speedy["reference"])
    inits = reference["time"].values
    steps = reference["prediction_timedelta"].values
    # one message per start, lead, variable and level (4 levels x 5 variables + 5 single)
    keys = _messages(grib, "edition", "gridType", "N", "Ni", "Nj", "jScansPositively",
                     "bitsPerValue", "centre")
    assert len(keys) == inits.size * steps.size * (5 * 4 + 5)
    assert {tuple(k.items()) for k in keys} == {(
        ("edition", 2), ("gridType", "regular_gg"), ("N", 16), ("Ni", 64), ("Nj", 32),
        ("jScansPositively", 0), ("bitsPerValue", 16), ("centre", "255"))}
    rates = _messages(grib, "shortName", "stepRange", "stepType")
    assert [(k["stepRange"], k["stepType"]) for k in rates if k["shortName"] == "avg_tprate"] \
        == [("0-6", "avg"), ("6-12", "avg")] * 2  # the mean over each 6-hour step
    groups = {  # cfgrib filter -> {cfgrib variable: (canonical name, GRIB shortName)}
        (("typeOfLevel", "isobaricInhPa"),): {
            "z": ("geopotential", "z"), "t": ("temperature", "t"),
            "u": ("u_component_of_wind", "u"), "v": ("v_component_of_wind", "v"),
            "q": ("specific_humidity", "q")},
        (("typeOfLevel", "surface"), ("stepType", "instant")): {
            "sp": ("surface_pressure", "sp")},
        (("typeOfLevel", "heightAboveGround"), ("level", 2)): {
            "t2m": ("2m_temperature", "2t")},
        (("typeOfLevel", "heightAboveGround"), ("level", 10)): {
            "u10": ("10m_u_component_of_wind", "10u"),
            "v10": ("10m_v_component_of_wind", "10v")},
        (("typeOfLevel", "surface"), ("stepType", "avg")): {
            "avg_tprate": (PRECIP, "avg_tprate")},
    }
    for keys_filter, variables in groups.items():
        with _open_grib(grib, **dict(keys_filter)) as decoded:
            assert set(decoded.data_vars) == set(variables), keys_filter
            np.testing.assert_array_equal(decoded["time"].values, inits)  # dataDate/dataTime
            np.testing.assert_array_equal(decoded["step"].values, steps)  # end of the step
            np.testing.assert_array_equal(decoded["valid_time"].values,
                                          reference["valid_time"].values)
            # written north to south: the reverse of the store's ascending latitudes
            np.testing.assert_allclose(decoded["latitude"].values,
                                       reference["latitude"].values[::-1], atol=1e-6)
            np.testing.assert_allclose(decoded["longitude"].values,
                                       reference["longitude"].values, atol=1e-6)
            if "isobaricInhPa" in decoded.coords:
                assert sorted(decoded["isobaricInhPa"].values) == [300, 500, 700, 850]
            for name, (canonical, short_name) in variables.items():
                assert decoded[name].attrs["GRIB_shortName"] == short_name
                expected = reference[canonical]
                got = decoded[name].isel(latitude=slice(None, None, -1))
                if "isobaricInhPa" in got.dims:
                    got = got.sel(isobaricInhPa=reference["level"].values)
                assert_within_packing(got.values, expected.values, canonical)
    # the same command again refuses to overwrite the finished file
    code = main(_forecast_args(SPEEDY_CHECKPOINT, speedy["store"], SPEEDY_INIT, grib,
                               "--format", "grib"))
    assert code == 2


def test_rate_and_accumulation_windows_and_missing_values(speedy: dict, tmp_path: Path) -> None:
    """The model's precipitation rate is a mean over each 6-hour step; a 6-hour accumulation
    (from the same rate) and the real sea surface temperature (NaN over land, at the valid
    times) written through the Python API keep their windows and their missing values."""
    reference = xr.open_zarr(speedy["reference"]).load()
    rate = reference[PRECIP]
    with xr.open_dataset(speedy["single_levels"]) as source:
        valid = reference["valid_time"].values
        sst = source["sst"].sel(valid_time=valid.ravel()).sortby("latitude").values
    dataset = xr.Dataset(
        {"sea_surface_temperature": (rate.dims, sst.reshape(rate.shape).astype("float32")),
         "total_precipitation_6hr": (rate.dims, (rate.values * 6 * 3600 / 1000).astype(
             "float32")),  # kg m-2 s-1 over 6 h -> metres of water
         PRECIP: rate},
        coords={name: reference[name] for name in ("time", "prediction_timedelta", "latitude",
                                                   "longitude", "valid_time")})
    land = np.isnan(dataset["sea_surface_temperature"].values)
    assert 0.2 < land.mean() < 0.5  # real land points are missing
    path = write_grib(dataset, tmp_path / "extra.grib2")
    keys = _messages(path, "shortName", "stepRange", "stepType", "productDefinitionTemplateNumber", "bitmapPresent",
                     "numberOfMissing", "units")
    by_name: dict[str, list[dict]] = {}
    for entry in keys:
        by_name.setdefault(entry["shortName"], []).append(entry)
    assert set(by_name) == {"sst", "tp", "avg_tprate"}
    windows = ["0-6", "6-12"] * 2  # two starts, two leads: the 6 hours ending at each lead
    assert [e["stepRange"] for e in by_name["tp"]] == windows
    assert [e["stepRange"] for e in by_name["avg_tprate"]] == windows
    assert {(e["stepType"], e["productDefinitionTemplateNumber"]) for e in by_name["tp"]} == {
        ("accum", 8)}
    assert {(e["stepType"], e["productDefinitionTemplateNumber"])
            for e in by_name["avg_tprate"]} == {("avg", 8)}
    assert {e["units"] for e in by_name["tp"]} == {"kg m**-2"}
    assert [e["numberOfMissing"] for e in by_name["sst"]] == [
        int(field.sum()) for field in land.reshape(-1, *land.shape[-2:])]
    assert {e["bitmapPresent"] for e in by_name["sst"]} == {1}
    # members: the same windows, in the ensemble templates (4.11 statistical, 4.1 instant)
    members = write_grib(dataset.expand_dims(number=2, axis=1), tmp_path / "members.grib2")
    keys = _messages(members, "shortName", "number", "stepRange",
                     "productDefinitionTemplateNumber")
    assert [(k["number"], k["stepRange"]) for k in keys if k["shortName"] == "avg_tprate"] == [
        (0, "0-6"), (0, "6-12"), (1, "0-6"), (1, "6-12")] * 2
    assert {(k["shortName"], k["productDefinitionTemplateNumber"]) for k in keys} == {
        ("sst", 1), ("tp", 11), ("avg_tprate", 11)}
    with _open_grib(path, shortName="sst") as decoded:
        assert_within_packing(decoded["sst"].values[..., ::-1, :],
                              dataset["sea_surface_temperature"].values, "sst")
    with _open_grib(path, shortName="tp") as decoded:  # m of water -> kg m-2
        np.testing.assert_array_equal(decoded["valid_time"].values, valid)
        assert_within_packing(decoded["tp"].values[..., ::-1, :] / 1000,
                              dataset["total_precipitation_6hr"].values, "tp6")


def test_ensemble_on_a_regional_regular_grid(ncep_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """The shipped NCEP checkpoint (North America, 2.5 degrees): members as control and
    perturbed forecasts on a regular_ll grid."""
    store = _prepare([ncep_file], tmp_path / "ncep.zarr", "2013-10-01", "2013-10-02T18")
    init = "2013-10-01T12"
    reference, grib = tmp_path / "reference.zarr", tmp_path / "forecast.grib2"
    for out, extra in ((reference, ()), (grib, ("--format", "grib"))):
        code, err = _cli(capsys, *_forecast_args(NCEP_CHECKPOINT, store, init, out,
                                                 "--members", "3", *extra))
        assert code == 0, err
    expected = xr.open_zarr(reference)["2m_temperature"]  # (time, number, lead, lat, lon)
    keys = _messages(grib, "gridType", "number", "dataType", "numberOfForecastsInEnsemble",
                     "typeOfLevel", "level", "shortName")
    assert [(k["number"], k["dataType"]) for k in keys] == [(0, "cf")] * 2 + [(1, "pf")] * 2 \
        + [(2, "pf")] * 2
    assert {(k["gridType"], k["numberOfForecastsInEnsemble"], k["typeOfLevel"], k["level"],
             k["shortName"]) for k in keys} == {("regular_ll", 3, "heightAboveGround", 2, "2t")}
    with _open_grib(grib, dataType="cf") as control, _open_grib(grib, dataType="pf") as rest:
        assert int(control["number"]) == 0 and list(rest["number"].values) == [1, 2]
        np.testing.assert_array_equal(control["longitude"].values, expected["longitude"].values)
        np.testing.assert_array_equal(control["latitude"].values,
                                      expected["latitude"].values[::-1])
        assert_within_packing(control["t2m"].values[:, ::-1], expected.values[0, 0], "control")
        assert_within_packing(rest["t2m"].values[:, :, ::-1], expected.values[0, 1:], "members")
        assert not np.allclose(rest["t2m"].values[0], control["t2m"].values)  # perturbed


def test_every_registry_variable_has_a_grib_encoding() -> None:
    """One table covers the registry, and each paramId decodes to its shortName and level."""
    from weathermodel import conventions

    assert set(GRIB_PARAMETERS) == set(conventions.VARIABLES)
    for name, parameter in GRIB_PARAMETERS.items():
        handle = eccodes.codes_grib_new_from_samples("regular_ll_sfc_grib2")
        try:
            eccodes.codes_set(handle, "centre", 255)
            if parameter.statistic:
                eccodes.codes_set(handle, "productDefinitionTemplateNumber", 8)
                eccodes.codes_set(handle, "typeOfStatisticalProcessing",
                                  {"average": 0, "accumulation": 1}[parameter.statistic])
            eccodes.codes_set(handle, "typeOfLevel", parameter.type_of_level)
            eccodes.codes_set(handle, "paramId", parameter.param_id)
            assert eccodes.codes_get(handle, "shortName") == parameter.short_name, name
            assert eccodes.codes_get(handle, "typeOfLevel") == parameter.type_of_level, name
        finally:
            eccodes.codes_release(handle)


def test_cli_refuses_grib_without_eccodes(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """``import eccodes`` failing (the extra not installed) stops the command before the
    forecast runs, with how to install it."""
    monkeypatch.setitem(sys.modules, "eccodes", None)  # what an uninstalled package does
    out = tmp_path / "forecast.grib2"
    code, err = _cli(capsys, *_forecast_args(SPEEDY_CHECKPOINT, tmp_path / "unused.zarr",
                                             "2000-01-01T12", out, "--format", "grib"))
    assert code == 2, err
    assert "error:" in err and "ecCodes" in err and "weathermodel[grib]" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing computed, nothing written


def test_cli_refuses_a_variable_without_grib_encoding(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A checkpoint predicting a variable the table does not know is refused by name."""
    payload = read_payload(SPEEDY_CHECKPOINT)
    metadata = payload["metadata"]
    metadata["channel_variables"] = ["total_cloud_cover" if v == PRECIP else v
                                     for v in metadata["channel_variables"]]
    checkpoint = save_atomic(payload, tmp_path / "model.pt")
    out = tmp_path / "out" / "forecast.grib2"
    code, err = _cli(capsys, *_forecast_args(checkpoint, tmp_path / "unused.zarr",
                                             "2000-01-01T12", out, "--format", "grib"))
    assert code == 2, err
    assert "total_cloud_cover" in err and "GRIB" in err and "--format zarr" in err, err
    assert not out.parent.exists()

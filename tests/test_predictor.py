"""The Python API: ``weathermodel.load_forecaster(path).predict(xr.Dataset)`` equals the CLI's
forecast of the same start dates, streams one lead at a time, and refuses inputs the CLI
refuses, with the same errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import weathermodel
from weathermodel.cli import main
from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.prepare import prepare
from weathermodel.errors import DataError

PROJECT = Path(__file__).resolve().parents[1]
CHECKPOINT = PROJECT / "checkpoints" / "ncep_graph_2013"  # the shipped demo model
VARIABLE = "2m_temperature"
INIT = np.datetime64("2013-10-03T00", "ns")
STEP = np.timedelta64(6, "h")


@pytest.fixture(scope="module")
def store(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training store of the NCEP sample, Sep-Oct 2013."""
    root = tmp_path_factory.mktemp("predictor")
    return Path(prepare(from_dict(PrepareConfig, {
        "sources": [{"path": str(ncep_file)}], "output": str(root / "ncep.zarr"),
        "start": "2013-09-01", "end": "2013-10-31T18"}), progress=False))


@pytest.fixture(scope="module")
def forecaster():
    return weathermodel.load_forecaster(CHECKPOINT, device="cpu")


def _netcdf(store: Path, path: Path, times: np.ndarray, name: str = VARIABLE,
            dims: tuple[str, str, str] = ("time", "latitude", "longitude")) -> Path:
    """States of the store at ``times`` written as a canonical netCDF file (WB2 names)."""
    state = xr.open_zarr(str(store), consolidated=False)["state"]
    state = state.sel(time=times).isel(number=0).sel(channel=VARIABLE)
    ds = xr.Dataset({name: (dims, state.values.astype("float32"), {"units": "K"})},
                    coords={dims[0]: times, dims[1]: state["latitude"].values,
                            dims[2]: state["longitude"].values})
    ds.to_netcdf(path, engine="netcdf4")
    return path


def _cli_forecast(store: Path, out: Path, init: str, lead: str, *extra: str) -> xr.Dataset:
    code = main(["forecast", "--checkpoint", str(CHECKPOINT / "model.pt"), "--data",
                 str(store), "--init", init, "--lead", lead, "--out", str(out),
                 "--no-progress", *extra])
    assert code == 0
    return xr.open_zarr(str(out)).load()


def test_five_day_forecast_from_netcdf_equals_the_cli(store: Path, forecaster,
                                                      tmp_path: Path) -> None:
    path = _netcdf(store, tmp_path / "initial.nc", np.array([INIT - STEP, INIT]))
    with xr.open_dataset(path) as initial:
        predicted = forecaster.predict(initial, lead="5d")
    cli = _cli_forecast(store, tmp_path / "cli.zarr", str(INIT)[:13], "5d")
    assert predicted[VARIABLE].dims == ("time", "prediction_timedelta", "latitude",
                                        "longitude")
    assert predicted.sizes["prediction_timedelta"] == 20  # 5 days of 6-hour steps
    assert np.array_equal(predicted["time"].values, [INIT])
    assert np.array_equal(predicted["valid_time"].values[0],
                          INIT + np.arange(1, 21) * STEP)
    assert predicted[VARIABLE].attrs["units"] == "K"
    assert set(predicted.variables) == set(cli.variables)
    for name in cli.variables:
        assert predicted[name].dims == cli[name].dims, name
    xr.testing.assert_allclose(predicted.drop_attrs(), cli.drop_attrs(), rtol=1e-6, atol=1e-4)
    # the forecast moved away from the initial state and stays finite
    assert np.isfinite(predicted[VARIABLE].values).all()
    assert json.loads(predicted.attrs["weathermodel_health"]) == []


def test_several_start_dates_and_one_lead_at_a_time(store: Path, forecaster,
                                                    tmp_path: Path) -> None:
    times = INIT + np.arange(-1, 3) * STEP  # 4 states: 3 start dates with a history of 2
    path = _netcdf(store, tmp_path / "initial.nc", times)
    with xr.open_dataset(path) as initial:
        predicted = forecaster.predict(initial, lead="1d")
        steps = list(forecaster.iter_predict(initial, lead="1d"))
    assert np.array_equal(predicted["time"].values, times[1:])
    assert [s.sizes["prediction_timedelta"] for s in steps] == [1] * 4
    for lead, step in enumerate(steps):
        xr.testing.assert_identical(step[VARIABLE],
                                    predicted[VARIABLE].isel(prediction_timedelta=[lead]))
    cli = _cli_forecast(store, tmp_path / "cli.zarr",
                        f"{str(times[1])[:13]}/{str(times[-1])[:13]}/6h", "1d")
    xr.testing.assert_allclose(predicted.drop_attrs(), cli.drop_attrs(), rtol=1e-6, atol=1e-4)
    # chosen start dates only
    chosen = forecaster.predict(xr.open_dataset(path), lead="6h", start_times=times[[1, 3]])
    assert np.array_equal(chosen["time"].values, times[[1, 3]])
    np.testing.assert_allclose(chosen[VARIABLE].values[:, 0],
                               predicted[VARIABLE].values[[0, 2], 0], rtol=1e-6, atol=1e-4)
    # an ensemble: member 0 is the control, the others differ
    ensemble = forecaster.predict(xr.open_dataset(path), lead="12h", members=3, seed=1)
    assert ensemble[VARIABLE].dims == ("time", "number", "prediction_timedelta", "latitude",
                                       "longitude")
    values = ensemble[VARIABLE].values
    np.testing.assert_allclose(values[:, 0], predicted[VARIABLE].values[:, :2], rtol=1e-6,
                               atol=1e-4)
    assert np.abs(values[:, 1] - values[:, 0]).max() > 1e-3


def test_input_and_output_coords_describe_the_model(forecaster) -> None:
    needs, gives = forecaster.input_coords, forecaster.output_coords
    assert needs["variables"] == {VARIABLE: []} and needs["units"] == {VARIABLE: "K"}
    assert np.array_equal(needs["time"], [-STEP, np.timedelta64(0, "h")])
    assert needs["latitude"].size == 25 and needs["longitude"].size == 53
    assert np.all(np.diff(needs["latitude"]) > 0)  # ascending, as required
    assert gives["variables"] == {VARIABLE: []}
    assert np.array_equal(gives["prediction_timedelta"], [STEP])


def test_inputs_in_other_names_get_the_contract_errors(store: Path, forecaster,
                                                       tmp_path: Path) -> None:
    times = np.array([INIT - STEP, INIT])
    renamed = xr.open_dataset(_netcdf(store, tmp_path / "t2m.nc", times, name="t2m"))
    with pytest.raises(DataError, match="'2m_temperature' of the checkpoint is missing"):
        forecaster.predict(renamed, lead="6h")
    short_dims = xr.open_dataset(_netcdf(store, tmp_path / "latlon.nc", times,
                                         dims=("time", "lat", "lon")))
    with pytest.raises(DataError, match="rename the dims"):
        forecaster.predict(short_dims, lead="6h")
    flipped = xr.open_dataset(_netcdf(store, tmp_path / "ok.nc", times)).isel(
        latitude=slice(None, None, -1))
    with pytest.raises(DataError, match="opposite order"):
        forecaster.predict(flipped, lead="6h")
    celsius = xr.open_dataset(tmp_path / "ok.nc")
    celsius[VARIABLE] = celsius[VARIABLE] - 273.15
    celsius[VARIABLE].attrs["units"] = "K"  # wrong values under the right units
    with pytest.raises(DataError, match="degrees Celsius"):
        forecaster.predict(celsius, lead="6h")
    with pytest.raises(DataError, match="earlier state"):
        forecaster.predict(xr.open_dataset(tmp_path / "ok.nc").isel(time=[1]), lead="6h")

"""A weathermodel checkpoint inside Earth2Studio's deterministic workflow, with its xarray data
source and IO backend, gives ``predict``'s forecast."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import weathermodel
from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.prepare import prepare

earth2studio = pytest.importorskip(
    "earth2studio.run", reason="the optional extra earth2studio is not installed "
    "(pip install 'weathermodel[earth2studio]', see the README)")

from earth2studio.data import DataArrayFile  # noqa: E402
from earth2studio.io import XarrayBackend  # noqa: E402
from earth2studio.models.px import PrognosticModel  # noqa: E402

from weathermodel.inference.earth2studio import WeatherModelPrognostic  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
CHECKPOINT = PROJECT / "checkpoints" / "ncep_graph_2013"
VARIABLE = "2m_temperature"
STEP = np.timedelta64(6, "h")
INITS = np.array(["2013-10-03T00", "2013-10-03T12"], dtype="datetime64[ns]")


@pytest.fixture(scope="module")
def initial(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    """Canonical initial conditions (2m temperature, K) around the two start dates."""
    root = tmp_path_factory.mktemp("e2s")
    store = prepare(from_dict(PrepareConfig, {
        "sources": [{"path": str(ncep_file)}], "output": str(root / "ncep.zarr"),
        "start": "2013-10-01", "end": "2013-10-05T18"}), progress=False)
    state = xr.open_zarr(str(store), consolidated=False)["state"]
    times = np.unique(np.concatenate([INITS - STEP, INITS]))
    values = state.sel(time=times).isel(number=0).sel(channel=VARIABLE)
    return xr.Dataset({VARIABLE: (("time", "latitude", "longitude"),
                                  values.values.astype("float32"), {"units": "K"})},
                      coords={"time": times, "latitude": values["latitude"].values,
                              "longitude": values["longitude"].values})


def test_deterministic_workflow_equals_predict(initial: xr.Dataset, tmp_path: Path) -> None:
    from earth2studio.run import deterministic

    model = WeatherModelPrognostic.load(CHECKPOINT)
    assert isinstance(model, PrognosticModel)
    assert list(model.input_names) == ["t2m"]
    # the data source: an Earth2Studio-layout DataArray (time, variable, lat, lon) in netCDF
    source_file = tmp_path / "source.nc"
    array = initial[VARIABLE].expand_dims(variable=["t2m"], axis=1).rename(
        latitude="lat", longitude="lon")
    array.rename("fields").to_netcdf(source_file)
    n_steps = 8  # two days
    io = deterministic(list(INITS), n_steps, model, DataArrayFile(str(source_file)),
                       XarrayBackend(), device="cpu", verbose=False)
    ours = io.root["t2m"]
    assert ours.dims == ("time", "lead_time", "lat", "lon")
    assert ours.sizes["lead_time"] == n_steps + 1
    expected = weathermodel.load_forecaster(CHECKPOINT, device="cpu").predict(
        initial, lead="2d")[VARIABLE].sel(time=INITS)  # (it also starts at 06 UTC)
    np.testing.assert_allclose(ours.isel(lead_time=slice(1, None)).values, expected.values,
                               rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(ours.isel(lead_time=0).values,
                                  initial[VARIABLE].sel(time=INITS).values)
    assert np.array_equal(ours["lead_time"].values, np.arange(n_steps + 1) * STEP)


def test_one_step_call_and_coordinate_checks(initial: xr.Dataset) -> None:
    model = WeatherModelPrognostic.load(CHECKPOINT)
    coords = model.input_coords()
    coords.pop("batch")
    coords["time"] = INITS[:1]
    import torch

    x = torch.from_numpy(initial[VARIABLE].sel(time=[INITS[0] - STEP, INITS[0]]).values)
    x = x[None, :, None]  # (time, lead_time, variable, lat, lon)
    y, out = model(x, coords)
    assert y.shape == (1, 1, 1, 25, 53)
    assert np.array_equal(out["lead_time"], [STEP])
    expected = weathermodel.load_forecaster(CHECKPOINT, device="cpu").predict(
        initial.sel(time=[INITS[0] - STEP, INITS[0]]), lead="6h")[VARIABLE]
    np.testing.assert_allclose(y[:, 0, 0].numpy(), expected.values[:, 0], rtol=1e-6, atol=1e-4)
    bad = coords.copy()
    bad["lead_time"] = np.array([0, 12], dtype="timedelta64[h]")
    with pytest.raises(ValueError, match="lead_time"):
        model(x, bad)

"""Forecast: streamed output equals an in-memory rollout, ranks and restarts change nothing,
mismatched inputs are refused, the output follows the CF / WeatherBench 2 layout."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils._python_dispatch import TorchDispatchMode
import zarr

from weathermodel.cli import main
from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.dataset import read_summary
from weathermodel.data.forcings import compute_forcings
from weathermodel.data.prepare import prepare
from weathermodel.errors import DataError
from weathermodel.inference import forecast as forecast_module
from weathermodel.inference import output
from weathermodel.inference.forecast import ForecastOptions, forecast, parse_init_times
from weathermodel.models.config import GraphConfig, ModelConfig
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.io import load_model, read_payload, save_atomic, save_model

from conftest import free_port

PROJECT = Path(__file__).resolve().parents[1]
VARIABLE = "2m_temperature"
INIT = "2013-10-01/2013-10-02/12h"  # three start dates
LEAD = "1d"  # four 6-hour steps
# the canonical inputs written here carry zarr v3 consolidated metadata, as WeatherBench 2 does
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


def _model_config() -> ModelConfig:
    return ModelConfig(kind="graph", history=2,
                       graph=GraphConfig(mesh_refinement=1, latent_size=16, processor_layers=1))


def _make_model(store: Path, path: Path, seed: int = 0,
                metadata: ModelMetadata | None = None) -> Path:
    summary = read_summary(store)
    torch.manual_seed(seed)
    model = Forecaster(_model_config(), metadata or ModelMetadata.from_summary(summary),
                       summary.statics)
    return save_model(model, path)


def _prepare(source: Path, out: Path) -> Path:
    return prepare(from_dict(PrepareConfig, {"sources": [{"path": str(source)}],
                                             "output": str(out), "start": "2013-09-01",
                                             "end": "2013-10-31T18"}), progress=False)


@pytest.fixture(scope="module", autouse=True)
def graph_cache(tmp_path_factory: pytest.TempPathFactory):
    """One mesh cache for the module (subprocesses inherit it through the environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WEATHERMODEL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def setup(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory, graph_cache) -> dict:
    """An NCEP store (Sep-Oct 2013), an untrained tiny graph model, a reference forecast."""
    root = tmp_path_factory.mktemp("forecast")
    store = _prepare(ncep_file, root / "ncep.zarr")
    checkpoint = _make_model(store, root / "model.pt")
    reference = root / "reference.zarr"
    forecast(ForecastOptions(checkpoint=str(checkpoint), data=str(store), init=INIT, lead=LEAD,
                             out=str(reference), progress=False))
    return {"root": root, "store": store, "checkpoint": checkpoint, "reference": reference}


def _args(setup: dict, out: Path, *extra: str, init: str = INIT, lead: str = LEAD,
          data: Path | None = None, checkpoint: Path | None = None) -> list[str]:
    return ["forecast", "--checkpoint", str(checkpoint or setup["checkpoint"]),
            "--data", str(data or setup["store"]), "--init", init, "--lead", lead,
            "--out", str(out), "--no-progress", *extra]


def _cli(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def _refused(capsys: pytest.CaptureFixture, args: list[str], *words: str) -> str:
    code, err = _cli(capsys, args)
    assert code == 2, err
    assert "error:" in err and "fix:" in err, err
    for word in words:
        assert word.lower() in err.lower(), (word, err)
    return err


def _open(path: Path, consolidated: bool = True) -> xr.Dataset:
    return xr.open_zarr(str(path), consolidated=consolidated)


def assert_same_store(a: Path | xr.Dataset, b: Path | xr.Dataset) -> None:
    """Every variable and coordinate equal bit for bit."""
    a = a if isinstance(a, xr.Dataset) else _open(a)
    b = b if isinstance(b, xr.Dataset) else _open(b)
    assert set(a.variables) == set(b.variables)
    assert dict(a.sizes) == dict(b.sizes)
    for name in a.variables:
        assert a[name].dims == b[name].dims, name
        assert np.array_equal(a[name].values, b[name].values), name


def _attrs(path: Path) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs["weathermodel_forecast"])


# --------------------------------------------------------------------------------------------
# 1. streamed output == in-memory rollout
# --------------------------------------------------------------------------------------------
def test_streamed_forecast_equals_in_memory_rollout(setup: dict) -> None:
    model = load_model(setup["checkpoint"]).eval()
    metadata = model.metadata
    step = np.timedelta64(metadata.time_step_seconds, "s")
    state = xr.open_zarr(str(setup["store"]), consolidated=False)["state"]
    lat, lon = np.asarray(metadata.latitude), np.asarray(metadata.longitude)
    result = _open(setup["reference"])[VARIABLE]
    inits = parse_init_times(INIT)
    steps = result.sizes["prediction_timedelta"]
    assert steps == 4 and result.sizes["time"] == inits.size == 3
    assert not np.isnan(result.values).any()  # every (start, lead) chunk was written
    all_states, all_forcings = [], []
    for init in inits:
        history = (init - np.arange(model.history - 1, -1, -1) * step).astype("datetime64[ns]")
        all_states.append(state.sel(time=history).values[:, 0])  # (h, C, y, x)
        valid = (init + np.arange(-model.history + 1, steps + 1) * step).astype("datetime64[ns]")
        batched = compute_forcings(valid, lat, lon)
        # the forecast computes forcings once per valid time: the same values as for a window
        for lead in range(steps):
            window = compute_forcings(valid[lead:lead + model.history + 1], lat, lon)
            assert np.array_equal(window, batched[lead:lead + model.history + 1]), lead
            for offset, valid_time in enumerate(valid[lead:lead + model.history + 1]):
                assert np.array_equal(compute_forcings(valid_time[None], lat, lon)[0],
                                      window[offset])
        all_forcings.append(batched)
    # the three start dates are one batch of the forecast (the automatic batch size)
    assert ForecastOptions.batch_starts is None
    assert forecast_module.automatic_batch_starts(model, 1) >= inits.size
    states = torch.from_numpy(np.stack(all_states))
    with torch.no_grad():
        expected = model.rollout(states, torch.from_numpy(np.stack(all_forcings)), steps)
    for index, init in enumerate(inits):
        got = result.isel(time=index).values  # (lead, lat, lon), one channel
        assert np.array_equal(got, expected[index, :, 0].numpy()), str(init)
        # the forecast really moved: not a copy of the initial state
        assert not np.array_equal(got[0], states[index, -1, 0].numpy())
    # batches of one start date give the same forecast to float rounding
    with torch.no_grad():
        for index in range(inits.size):
            alone = model.rollout(states[index:index + 1],
                                  torch.from_numpy(all_forcings[index])[None], steps)[0]
            np.testing.assert_allclose(alone.numpy(), expected[index].numpy(), rtol=1e-5,
                                       atol=1e-3)


def test_batches_and_background_writes_change_nothing_but_rounding(setup: dict,
                                                                   tmp_path: Path) -> None:
    """One start date per batch written in the rolling thread (the old path), or batches of
    two written in the background: the reference forecast (one batch of three) to float
    rounding, with the same fingerprint (a run may resume with another batch size)."""
    reference = _open(setup["reference"])
    for batch_starts, overlap in ((1, False), (2, True)):
        out = tmp_path / f"batch{batch_starts}.zarr"
        forecast(ForecastOptions(checkpoint=str(setup["checkpoint"]), data=str(setup["store"]),
                                 init=INIT, lead=LEAD, out=str(out), progress=False,
                                 batch_starts=batch_starts, overlap_writes=overlap))
        ours = _open(out)
        assert _attrs(out)["fingerprint"] == _attrs(setup["reference"])["fingerprint"]
        assert not np.isnan(ours[VARIABLE].values).any()
        np.testing.assert_allclose(ours[VARIABLE].values, reference[VARIABLE].values,
                                   rtol=1e-5, atol=1e-3)
    assert forecast_module.start_batches(7, 3, rank=1, world=2, done={4}) == [[3, 5]]
    assert forecast_module.start_batches(5, 2) == [[0, 1], [2, 3], [4]]


# --------------------------------------------------------------------------------------------
# 2. two ranks == one process
# --------------------------------------------------------------------------------------------
def test_two_ranks_write_the_same_store_as_one_process(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "two.zarr"
    command = ["timeout", "300", sys.executable, "-m", "torch.distributed.run",
               "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "weathermodel", *_args(setup, out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, timeout=320,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("forecast complete") == 1  # rank 0 only
    attrs = _attrs(out)
    assert attrs["complete"] is True and attrs["health"] == []
    assert attrs["fingerprint"] == _attrs(setup["reference"])["fingerprint"]
    assert_same_store(_open(out, consolidated=True), setup["reference"])
    assert not Path(f"{out}.progress").exists()


# --------------------------------------------------------------------------------------------
# 3. mismatched inputs are refused; correct canonical data works
# --------------------------------------------------------------------------------------------
def _canonical(setup: dict, path: Path, *, name: str = VARIABLE, offset: float = 0.0,
               units: str = "K", flip: bool = False) -> Path:
    """A WeatherBench-style zarr (time, latitude, longitude) from the store's values."""
    state = xr.open_zarr(str(setup["store"]), consolidated=False)["state"]
    state = state.sel(time=slice("2013-09-29", "2013-10-03")).isel(number=0, channel=0)
    values = state.values.astype("float32") - np.float32(offset)
    lat = state["latitude"].values
    if flip:
        values, lat = values[:, ::-1], lat[::-1]
    ds = xr.Dataset(
        {name: (("time", "latitude", "longitude"), values,
                {"units": units, "long_name": "2 metre temperature"})},
        coords={"time": state["time"].values,
                "latitude": ("latitude", lat, {"units": "degrees_north"}),
                "longitude": ("longitude", state["longitude"].values,
                              {"units": "degrees_east"})})
    ds.to_zarr(str(path), mode="w", consolidated=True)
    return path


def test_canonical_zarr_gives_the_same_forecast_as_the_store(setup: dict, tmp_path: Path,
                                                             capsys) -> None:
    data = _canonical(setup, tmp_path / "wb2.zarr")
    out = tmp_path / "from_wb2.zarr"
    code, err = _cli(capsys, _args(setup, out, data=data))
    assert code == 0, err
    ours, reference = _open(out), _open(setup["reference"])
    for name in ours.variables:
        assert np.array_equal(ours[name].values, reference[name].values), name


def test_missing_variable_is_refused(setup: dict, tmp_path: Path, capsys) -> None:
    data = _canonical(setup, tmp_path / "renamed.zarr", name="t2m_renamed")
    _refused(capsys, _args(setup, tmp_path / "o.zarr", data=data), VARIABLE, "missing")
    assert not (tmp_path / "o.zarr").exists()  # refused before any output is made


def test_celsius_is_refused_by_units_and_by_values(setup: dict, tmp_path: Path,
                                                   capsys) -> None:
    celsius = _canonical(setup, tmp_path / "degc.zarr", offset=273.15, units="degC")
    _refused(capsys, _args(setup, tmp_path / "a.zarr", data=celsius), "units", "degC", "K")
    mislabelled = _canonical(setup, tmp_path / "k.zarr", offset=273.15, units="K")
    _refused(capsys, _args(setup, tmp_path / "b.zarr", data=mislabelled),
             "outside the training range", "Celsius")
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    with pytest.raises(DataError, match="outside the training range"):
        forecast(ForecastOptions(checkpoint=str(setup["checkpoint"]), data=str(mislabelled),
                                 init=INIT, lead=LEAD, out=str(tmp_path / "c.zarr"),
                                 progress=False))


def test_flipped_latitude_is_refused(setup: dict, tmp_path: Path, capsys) -> None:
    data = _canonical(setup, tmp_path / "flipped.zarr", flip=True)
    _refused(capsys, _args(setup, tmp_path / "o.zarr", data=data), "latitude", "flipped")


def test_checkpoint_of_another_grid_or_channels_is_refused(setup: dict, ncep_file: Path,
                                                           tmp_path: Path, capsys) -> None:
    # a model made for a 5-degree store, given the 2.5-degree store
    coarse = xr.open_dataset(ncep_file).isel(lat=slice(None, None, 2), lon=slice(None, None, 2))
    coarse.sel(time=slice("2013-09-01", "2013-10-31T18")).to_netcdf(tmp_path / "coarse.nc")
    coarse_store = _prepare(tmp_path / "coarse.nc", tmp_path / "coarse.zarr")
    coarse_model = _make_model(coarse_store, tmp_path / "coarse.pt")
    _refused(capsys, _args(setup, tmp_path / "a.zarr", checkpoint=coarse_model),
             "latitude", "differs from the checkpoint's grid", "13 points")
    # ... and the other way round, the 2.5-degree model on the coarse store
    _refused(capsys, _args(setup, tmp_path / "b.zarr", data=coarse_store), "grid")
    # a model made for a store with one more channel
    summary = read_summary(setup["store"])
    meta = ModelMetadata.from_summary(summary)
    extra = dataclasses.replace(
        meta, channels=meta.channels + ["mean_sea_level_pressure"],
        channel_variables=meta.channel_variables + ["mean_sea_level_pressure"],
        channel_levels=meta.channel_levels + [float("nan")], mean=meta.mean + [101000.0],
        std=meta.std + [1000.0], tendency_std=meta.tendency_std + [100.0],
        channel_roles=meta.channel_roles + ["prognostic"],
        channel_has_missing=meta.channel_has_missing + [False],
        variables=meta.variables + [{"name": "mean_sea_level_pressure", "units": "Pa",
                                     "standard_name": "air_pressure_at_mean_sea_level",
                                     "levels": []}])
    two_channels = _make_model(setup["store"], tmp_path / "two.pt", metadata=extra)
    _refused(capsys, _args(setup, tmp_path / "c.zarr", checkpoint=two_channels),
             "mean_sea_level_pressure", "not in the store")
    data = _canonical(setup, tmp_path / "wb2.zarr")
    _refused(capsys, _args(setup, tmp_path / "d.zarr", checkpoint=two_channels, data=data),
             "mean_sea_level_pressure", "missing")
    for name in "abcd":
        assert not (tmp_path / f"{name}.zarr").exists()


# --------------------------------------------------------------------------------------------
# 4. CF / WeatherBench 2 layout
# --------------------------------------------------------------------------------------------
def test_output_layout_is_weatherbench2_and_cf(setup: dict) -> None:
    ds = _open(setup["reference"])
    array = ds[VARIABLE]
    assert array.dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert array.dtype == np.float32
    assert array.attrs["units"] == "K"
    assert array.attrs.get("standard_name") == "air_temperature"
    assert ds["time"].attrs["standard_name"] == "forecast_reference_time"
    assert ds["prediction_timedelta"].attrs["standard_name"] == "forecast_period"
    assert ds["latitude"].attrs["units"] == "degrees_north"
    assert ds["longitude"].attrs["units"] == "degrees_east"
    assert ds.attrs["Conventions"].startswith("CF-")
    assert np.array_equal(ds["time"].values, parse_init_times(INIT))
    leads = ds["prediction_timedelta"].values
    assert np.array_equal(leads, (np.arange(1, 5) * np.timedelta64(6, "h")).astype(leads.dtype))
    valid = ds["valid_time"]
    assert valid.dims == ("time", "prediction_timedelta")
    assert np.array_equal(valid.values, ds["time"].values[:, None] + leads[None, :])
    summary = read_summary(setup["store"])
    assert np.array_equal(ds["latitude"].values, summary.latitude)
    assert np.array_equal(ds["longitude"].values, summary.longitude)
    shape = (summary.latitude.size, summary.longitude.size)
    assert zarr.open_group(str(setup["reference"]), mode="r")[VARIABLE].chunks == (1, 1, *shape)
    assert array.encoding["chunks"] == (1, 1, *shape)


# --------------------------------------------------------------------------------------------
# 5. restart after kill -9
# --------------------------------------------------------------------------------------------
def test_killed_run_resumes_to_the_uninterrupted_result(setup: dict, tmp_path: Path,
                                                        capsys, monkeypatch) -> None:
    init, lead = "2013-10-01/2013-10-08T06/6h", "12h"  # 30 start dates x 2 steps
    out = tmp_path / "killed.zarr"
    args = _args(setup, out, init=init, lead=lead)
    progress = Path(f"{out}.progress")
    process = subprocess.Popen(["timeout", "300", sys.executable, "-m", "weathermodel", *args],
                               cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while len(list(progress.glob("*.done"))) < 3:
            assert process.poll() is None, (f"finished before it could be killed: "
                                            f"{process.stderr.read()}")
            assert time.monotonic() < deadline, "no progress markers appeared"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the timeout wrapper and python
        process.wait()
    done_before = forecast_module.output.done_indices(out)
    assert 3 <= len(done_before) < 30
    attrs = _attrs(out)
    assert attrs["complete"] is False
    assert _open(out, consolidated=False).attrs["weathermodel_forecast"]["complete"] is False

    computed: list[int] = []
    original = forecast_module.rollout_starts

    def recording(model, options, state, inits, indices, *rest):
        computed.extend(indices)
        return original(model, options, state, inits, indices, *rest)

    monkeypatch.setattr(forecast_module, "rollout_starts", recording)
    # a chunk write cut by the kill leaves zarr's temporary file; plant one to be sure
    chunk_dir = next(p for p in out.rglob("c") if p.is_dir())
    (chunk_dir / "0.deadbeef.partial").write_bytes(b"cut short")
    code, err = _cli(capsys, args)
    assert code == 0, err
    assert not list(out.rglob("*.partial"))  # the resumed run removed the leftovers
    assert not set(computed) & done_before  # finished start dates are skipped
    assert set(computed) | done_before == set(range(30))
    monkeypatch.setattr(forecast_module, "rollout_starts", original)
    straight = tmp_path / "straight.zarr"
    forecast(ForecastOptions(checkpoint=str(setup["checkpoint"]), data=str(setup["store"]),
                             init=init, lead=lead, out=str(straight), progress=False))
    assert _attrs(out)["complete"] is True
    assert not progress.exists()
    assert not np.isnan(_open(out)[VARIABLE].values).any()
    assert_same_store(out, straight)


# --------------------------------------------------------------------------------------------
# 6. ensembles
# --------------------------------------------------------------------------------------------
def test_ensemble_members_are_seeded_and_member_zero_is_the_control(setup: dict,
                                                                    tmp_path: Path,
                                                                    capsys) -> None:
    runs = []
    for name in ("e1.zarr", "e2.zarr"):
        code, err = _cli(capsys, _args(setup, tmp_path / name, "--members", "3"))
        assert code == 0, err
        runs.append(_open(tmp_path / name))
    first = runs[0][VARIABLE]
    assert first.dims == ("time", "number", "prediction_timedelta", "latitude", "longitude")
    assert first.sizes["number"] == 3
    assert list(runs[0]["number"].values) == [0, 1, 2]
    assert first.encoding["chunks"] == (1, 1, 1, 25, 53)
    values = first.values
    assert not np.isnan(values).any()
    deterministic = _open(setup["reference"])[VARIABLE].values
    assert np.array_equal(values[:, 0], deterministic)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(values[:, a], values[:, b]), (a, b)
        assert np.abs(values[:, a] - values[:, b]).max() > 1e-3
    assert_same_store(runs[0], runs[1])
    assert _attrs(tmp_path / "e1.zarr")["members"] == 3


# --------------------------------------------------------------------------------------------
# 7. netCDF output
# --------------------------------------------------------------------------------------------
def test_netcdf_output_holds_the_same_values(setup: dict, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "nc"
    out = folder / "forecast.nc"
    code, err = _cli(capsys, _args(setup, out, "--format", "netcdf"))
    assert code == 0, err
    assert out.read_bytes()[:4] == b"\x89HDF"  # netCDF4 is HDF5
    assert sorted(p.name for p in folder.iterdir()) == ["forecast.nc"]  # no .zarr, .progress
    with xr.open_dataset(out, engine="netcdf4") as ds:
        reference = _open(setup["reference"])
        assert ds[VARIABLE].dims == reference[VARIABLE].dims
        for name in reference.variables:
            assert np.array_equal(ds[name].values, reference[name].values), name
        assert ds[VARIABLE].attrs["units"] == "K"
        assert ds["time"].attrs["standard_name"] == "forecast_reference_time"
        record = json.loads(ds.attrs["weathermodel_forecast"])  # dicts are JSON in netCDF
        assert record["complete"] is True and record["health"] == []
    # the same command again refuses to overwrite the finished file
    _refused(capsys, _args(setup, out, "--format", "netcdf"), "exists")


# --------------------------------------------------------------------------------------------
# 8. health checks
# --------------------------------------------------------------------------------------------
def test_nan_weights_stop_or_are_flagged(setup: dict, tmp_path: Path, capsys) -> None:
    payload = read_payload(setup["checkpoint"])
    bias = "network.output.2.bias"
    assert bias in payload["state_dict"]
    payload["state_dict"][bias] = torch.full_like(payload["state_dict"][bias], float("nan"))
    broken = save_atomic(payload, tmp_path / "nan.pt")
    args = dict(checkpoint=broken, init="2013-10-01", lead="12h")
    err = _refused(capsys, _args(setup, tmp_path / "stop.zarr", "--on-unhealthy", "stop",
                                 **args), "NaN", "unhealthy")
    assert "6 h" in err  # the first lead is already bad
    assert _attrs(tmp_path / "stop.zarr")["complete"] is False
    code, err = _cli(capsys, _args(setup, tmp_path / "flag.zarr", "--on-unhealthy", "flag",
                                   **args))
    assert code == 0, err
    attrs = _attrs(tmp_path / "flag.zarr")
    assert attrs["complete"] is True
    health = attrs["health"]
    assert [entry["lead_hours"] for entry in health] == [6, 12]
    for entry in health:
        assert entry["init"].startswith("2013-10-01T00")
        assert entry["problems"] == [f"{VARIABLE}: NaN or inf"]
    assert _attrs(setup["reference"])["health"] == []


# --------------------------------------------------------------------------------------------
# 9. outputs that must not be touched
# --------------------------------------------------------------------------------------------
def test_refuses_an_output_made_by_another_command(setup: dict, tmp_path: Path,
                                                   capsys) -> None:
    out = tmp_path / "mine.zarr"
    code, err = _cli(capsys, _args(setup, out, init="2013-10-01", lead="6h"))
    assert code == 0, err
    before = _open(out)[VARIABLE].values
    _refused(capsys, _args(setup, out, init="2013-10-01", lead="12h"), "another forecast")
    assert np.array_equal(_open(out)[VARIABLE].values, before)
    assert _open(out).sizes["prediction_timedelta"] == 1
    # not a forecast at all: a folder of other files is left untouched
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    _refused(capsys, _args(setup, other, init="2013-10-01", lead="6h"), "another forecast")
    assert [p.name for p in other.iterdir()] == ["precious.txt"]
    # the training store given as the output
    _refused(capsys, _args(setup, setup["store"], init="2013-10-01", lead="6h"), "other data")
    assert read_summary(setup["store"]).channels == [VARIABLE]


def test_refuses_an_output_folder_that_cannot_be_written(setup: dict, tmp_path: Path,
                                                         capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _refused(capsys, _args(setup, blocker / "out.zarr", init="2013-10-01", lead="6h"),
             "cannot write to the output folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        try:
            (locked / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("permission bits do not stop this user (root): a read-only folder "
                        "cannot be simulated with chmod here")
        _refused(capsys, _args(setup, locked / "out.zarr", init="2013-10-01", lead="6h"),
                 "cannot write to the output folder")
        assert not (locked / "out.zarr").exists()
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("members", [1, 3])
def test_leads_written_as_chunk_files_equal_zarr_writes(tmp_path: Path, members: int) -> None:
    """Leads written straight into chunk files (the plain layout of a new forecast store) read
    back exactly as zarr's own writes of the same values, for pressure-level and surface
    variables, one member or several, start dates not consecutive; the other start dates stay
    missing and no temporary file is left."""
    metadata = load_model(PROJECT / "checkpoints" / "speedy_crps_2000").metadata
    inits = parse_init_times("2001-01-01/2001-01-03/1d")
    shape = (2, members, len(metadata.channels), len(metadata.latitude),
             len(metadata.longitude))
    stores = {}
    for mode in ("files", "zarr"):
        path = tmp_path / f"{mode}.zarr"
        output.create_forecast_store(path, metadata, inits, 2, members, {})
        writer = output.LeadWriter(path, metadata, members)
        assert writer.chunk_dirs is not None  # the store is plain: files are written
        if mode == "zarr":
            writer.chunk_dirs = None
        values = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
        for lead in range(2):
            writer.write_starts([0, 2], lead, values[lead])
        assert not list(path.rglob("*.partial"))
        stores[mode] = xr.open_zarr(path, consolidated=False).load()
    files, written = stores["files"], stores["zarr"]
    assert set(files.data_vars) == set(written.data_vars)
    assert any("level" in files[name].dims for name in files.data_vars)
    for name in files.data_vars:
        np.testing.assert_array_equal(files[name].values, written[name].values)
        assert np.isnan(files[name].isel(time=1).values).all()
        assert np.isfinite(files[name].isel(time=0).sel(level=500.0).values
                           if "level" in files[name].dims else
                           files[name].isel(time=0).values).all()


@pytest.mark.parametrize("members", [1, 3])
def test_empty_store_is_written_as_xarray_writes_it(tmp_path: Path, members: int) -> None:
    """The empty forecast store, written straight through zarr, holds the coordinates and
    group attributes exactly as xarray's ``to_zarr`` of the same coordinates writes them (the
    oracle): every zarr.json equal, every coordinate chunk equal byte for byte."""
    metadata = load_model(PROJECT / "checkpoints" / "speedy_crps_2000").metadata
    inits = parse_init_times("2001-01-01/2001-01-03T12/12h")
    attrs = {"fingerprint": "abc", "complete": False, "nested": [1, 2]}
    path, oracle = tmp_path / "store.zarr", tmp_path / "oracle.zarr"
    output.create_forecast_store(path, metadata, inits, 3, members, attrs)
    leads = (np.arange(1, 4) * np.timedelta64(metadata.time_step_seconds, "s")
             ).astype("timedelta64[ns]")
    xr.Dataset(coords=output.forecast_coords(metadata, inits, leads, members),
               attrs={"Conventions": "CF-1.8", "weathermodel_forecast": attrs}).to_zarr(
        oracle, mode="w", zarr_format=3, consolidated=False,
        encoding={"valid_time": {"units": "hours since 1970-01-01", "dtype": "int64"}})
    oracle_files = sorted(p.relative_to(oracle) for p in oracle.rglob("*") if p.is_file())
    assert len(oracle_files) >= 12 + (2 if members > 1 else 0)  # level and number included
    for name in oracle_files:
        mine, theirs = (path / name).read_bytes(), (oracle / name).read_bytes()
        if name.name == "zarr.json":
            assert json.loads(mine) == json.loads(theirs), name
        else:
            assert mine == theirs, name
    assert set(xr.open_zarr(path, consolidated=False).data_vars) == set(
        output.variable_layout(metadata))


def test_forecast_process_imports_neither_dask_array_nor_scipy_spatial(setup: dict,
                                                                       tmp_path: Path) -> None:
    """A forecast from a training store, its graph cached, reads without dask and builds no
    k-d tree: ``weathermodel forecast`` in a fresh process never imports ``dask.array`` or
    ``scipy.spatial`` (0.3 s each), and writes the same values as the reference run."""
    out = tmp_path / "out.zarr"
    child = ("import sys; from weathermodel.cli import main; code = main(sys.argv[1:]); "
             "print(sorted(m for m in ('dask.array', 'scipy.spatial') if m in sys.modules)); "
             "sys.exit(code)")
    result = subprocess.run([sys.executable, "-P", "-c", child, *_args(setup, out)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    assert_same_store(out, setup["reference"])


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        result = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(result):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return result


@pytest.mark.parametrize("checkpoint", ["ncep_graph_2013", "speedy_transformer_2000"])
def test_largest_activation_is_the_largest_tensor_of_a_forward(checkpoint: str) -> None:
    """``largest_activation`` (what the automatic batch size divides by) equals the largest
    tensor any op of a one-sample forward pass returns, with and without gradients (brute
    force: every op's outputs recorded by a dispatch mode)."""
    model = load_model(PROJECT / "checkpoints" / checkpoint)
    network, metadata = model.network, model.metadata
    grid = (len(metadata.latitude), len(metadata.longitude))
    states = torch.from_numpy(np.asarray(metadata.mean, dtype=np.float32))[None, None, :,
                                                                            None, None]
    states = states.expand(1, model.history, -1, *grid) + torch.randn(1, model.history,
                                                                       len(metadata.channels),
                                                                       *grid)
    forcings = torch.randn(1, model.history + 1, len(metadata.forcings), *grid)
    x = model.network_inputs(states, forcings)
    lead = torch.full((1,), 6.0)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), _LargestOutput() as recorder:
            network(x, lead)
        assert recorder.largest == network.largest_activation(), (checkpoint, grad)


def test_automatic_batch_size_follows_the_graph_size() -> None:
    """The demo's small graph: 8 samples per batch, shared out among members; a GraphCast
    1-degree graph (latent 512, 3 decoder edges per grid point): one start date."""
    model = load_model(PROJECT / "checkpoints" / "ncep_graph_2013")
    assert forecast_module.automatic_batch_starts(model, 1) == 8
    assert forecast_module.automatic_batch_starts(model, 3) == 2
    assert forecast_module.automatic_batch_starts(model, 50) == 1
    network = types.SimpleNamespace(largest_activation=lambda: 3 * 181 * 360 * 512)
    assert forecast_module.automatic_batch_starts(types.SimpleNamespace(network=network), 1) == 1

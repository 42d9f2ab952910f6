"""The training store written by `prepare`: values, statistics, forcings, layout, resume, scale-out."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
import zarr

from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.forcings import compute_forcings
from weathermodel.data.prepare import prepare
from weathermodel.data.store import load_progress, open_store, read_metadata
from weathermodel.errors import StoreError

from conftest import free_port

START, END = "2013-01-01", "2013-02-28T18"


def raw_ncep(path: Path, n_times: int) -> np.ndarray:
    """NCEP air temperature read with netCDF4 alone (manual unpacking), latitude flipped."""
    with netCDF4.Dataset(path) as nc:
        var = nc.variables["air"]
        var.set_auto_maskandscale(False)
        packed = var[:n_times].astype("float64")
        values = packed * var.scale_factor + getattr(var, "add_offset", 0.0)
    return values[:, ::-1, :]


def make_config(source: str | Path, output: Path, **options) -> PrepareConfig:
    return from_dict(PrepareConfig, {"sources": [{"path": str(source)}], "output": str(output),
                                     **options})


@pytest.fixture(scope="module")
def ncep_store(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "ncep.zarr"
    return prepare(make_config(ncep_file, out, start=START, end=END, time_block=16),
                   progress=False)


def test_store_values_equal_the_raw_file(ncep_store: Path, ncep_file: Path) -> None:
    ds = open_store(ncep_store)
    raw = raw_ncep(ncep_file, 59 * 4)
    assert ds.sizes["time"] == 59 * 4
    np.testing.assert_allclose(ds["state"].values[:, 0, 0], raw, rtol=0, atol=1e-3)
    assert np.all(np.diff(ds["latitude"].values) > 0)
    assert ds["state"].dtype == np.float32


def test_statistics_equal_brute_force(ncep_store: Path, ncep_file: Path) -> None:
    raw = raw_ncep(ncep_file, 59 * 4)
    ds = open_store(ncep_store)
    np.testing.assert_allclose(ds["mean"].values[0], raw.mean(), rtol=1e-6)
    np.testing.assert_allclose(ds["std"].values[0], raw.std(), rtol=1e-5)
    np.testing.assert_allclose(ds["min"].values[0], raw.min(), atol=1e-3)
    np.testing.assert_allclose(ds["max"].values[0], raw.max(), atol=1e-3)
    np.testing.assert_allclose(ds["tendency_std"].values[0], np.diff(raw, axis=0).std(),
                               rtol=1e-5)
    meta = read_metadata(ncep_store)
    assert meta["statistics"]["2m_temperature"]["mean"] == pytest.approx(raw.mean(), rel=1e-6)


def test_layout_one_chunk_per_state(ncep_store: Path) -> None:
    group = zarr.open_group(str(ncep_store), mode="r")
    assert group["state"].chunks == (1, 1, 1, 25, 53)
    assert group["forcings"].chunks == (1, 5, 25, 53)
    assert group.metadata.zarr_format == 3
    meta = read_metadata(ncep_store)
    assert meta["complete"] is True
    assert meta["time_step_seconds"] == 6 * 3600
    assert meta["grid"]["kind"] == "regular" and meta["grid"]["is_global"] is False
    assert meta["variables"] == [{"name": "2m_temperature", "units": "K",
                                  "standard_name": "air_temperature", "levels": []}]
    assert meta["sources"][0]["checksum"] == "sha256:" + hashlib.sha256(
        Path(meta["sources"][0]["path"]).read_bytes()).hexdigest()
    assert meta["package_version"] and meta["config"]["start"] == START
    assert not (ncep_store.parent / "ncep.zarr.idx").exists()


def test_forcings_stored_beside_the_state(ncep_store: Path) -> None:
    ds = open_store(ncep_store)
    expected = compute_forcings(ds["time"].values[:8], ds["latitude"].values,
                                ds["longitude"].values)
    np.testing.assert_array_equal(ds["forcings"].values[:8], expected)
    statics = ds["statics"].sel(static="sin_latitude").values
    np.testing.assert_allclose(statics[:, 0], np.sin(np.radians(ds["latitude"].values)),
                               rtol=1e-6)
    assert list(ds["forcing"].values)[0] == "toa_incident_solar_radiation"


def _tree_digest(path: Path, names: tuple[str, ...] = ("state", "forcings", "statics")) -> str:
    digest = hashlib.sha256()
    for name in names:
        for file in sorted((path / name).rglob("*")):
            if file.is_file():
                digest.update(file.relative_to(path).as_posix().encode() + file.read_bytes())
    return digest.hexdigest()


def test_rerun_of_a_complete_store_changes_nothing(ncep_store: Path, ncep_file: Path) -> None:
    before = _tree_digest(ncep_store)
    prepare(make_config(ncep_file, ncep_store, start=START, end=END, time_block=16),
            progress=False)
    assert _tree_digest(ncep_store) == before


def _run_prepare_cli(source: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "weathermodel.cli", "prepare", str(source), "--out",
               str(out), "--no-progress", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_kill_9_then_rerun_resumes_to_an_identical_store(ncep_file: Path,
                                                        tmp_path: Path) -> None:
    options = ("--start", "2013-01-01", "--end", "2013-03-31", "--time-block", "1")
    reference = tmp_path / "reference.zarr"
    assert _run_prepare_cli(ncep_file, reference, *options).wait(timeout=300) == 0

    killed = tmp_path / "killed.zarr"
    process = _run_prepare_cli(ncep_file, killed, *options)
    deadline = time.time() + 120
    blocks_done = 0
    while time.time() < deadline and process.poll() is None:
        if (killed / "zarr.json").exists():
            try:  # zarr.json is replaced atomically: it always parses
                blocks_done = len(load_progress(killed).get("blocks_done", []))
            except json.JSONDecodeError:  # pragma: no cover
                pytest.fail("zarr.json was seen half-written")
            if blocks_done >= 40:
                break
        time.sleep(0.02)
    assert process.poll() is None, "prepare finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    meta = read_metadata(killed)
    assert meta is not None and meta["complete"] is False
    with pytest.raises(StoreError, match="incomplete"):
        open_store(killed)

    resumed = _run_prepare_cli(ncep_file, killed, *options)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert _tree_digest(killed) == _tree_digest(reference)
    a, b = open_store(killed), open_store(reference)
    for name in ("mean", "std", "min", "max", "tendency_std", "forcing_mean", "forcing_std"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_dask_distributed_cluster_gives_the_same_store(ncep_file: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    local = prepare(make_config(ncep_file, tmp_path / "local.zarr", start=START,
                                end="2013-01-10"), progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, host="127.0.0.1") as cluster:
        remote = prepare(make_config(ncep_file, tmp_path / "cluster.zarr", start=START,
                                     end="2013-01-10", dask_scheduler=cluster.scheduler_address),
                         progress=False)
    assert _tree_digest(local) == _tree_digest(remote)
    np.testing.assert_array_equal(open_store(local)["std"].values,
                                  open_store(remote)["std"].values)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


def test_weatherbench_style_zarr_over_http(ncep_file: Path, tmp_path: Path) -> None:
    """An ARCO-ERA5 / WeatherBench 2 style store (long names, descending latitude, consolidated
    zarr v2) read from a URL through fsspec, served on loopback."""
    raw = xr.open_dataset(ncep_file).isel(time=slice(0, 40)).load()
    wb2 = raw.rename({"air": "2m_temperature", "lat": "latitude", "lon": "longitude"})
    wb2["2m_temperature"].attrs = {"units": "K"}
    wb2.to_zarr(tmp_path / "wb2.zarr", zarr_format=2, consolidated=True)
    port = free_port()
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}/wb2.zarr"
        store = prepare(make_config(url, tmp_path / "from_url.zarr"), progress=False)
    finally:
        server.shutdown()
    ds = open_store(store)
    np.testing.assert_allclose(ds["state"].values[:, 0, 0],
                               raw["air"].values[:, ::-1, :], atol=1e-4)
    meta = read_metadata(store)
    assert meta["sources"][0] == {"path": url, "checksum": "remote", "size_bytes": 0}


def test_multi_file_storm_config(data_dir: Path, tmp_path: Path) -> None:
    """The six NCL storm files (no units, non-CF time, 500 hPa wind, missing corners) through
    the shipped config."""
    project = Path(__file__).resolve().parents[1]
    text = (project / "configs" / "prepare_storm.yaml").read_text().replace(
        "../shared/data", str(data_dir))
    config_path = tmp_path / "storm.yaml"
    config_path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "weathermodel.cli", "prepare", "--config",
                             str(config_path), "--out", str(tmp_path / "storm.zarr"),
                             "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "max_missing_fraction: 0.25" in result.stdout  # effective config printed in full
    ds = open_store(tmp_path / "storm.zarr")
    assert list(ds["channel"].values) == [
        "u_component_of_wind_500", "v_component_of_wind_500", "2m_temperature",
        "10m_u_component_of_wind", "10m_v_component_of_wind", "mean_sea_level_pressure"]
    assert ds.sizes["time"] == 64 and str(ds["time"].values[0])[:13] == "1996-01-05T00"
    assert np.isnan(ds["state"].values).any()  # missing corners kept as NaN
    assert np.isfinite(ds["mean"].values).all()  # statistics ignore them


def test_raising_the_missing_limit_resumes_the_refused_store(ncep_file: Path,
                                                             tmp_path: Path) -> None:
    ds = xr.open_dataset(ncep_file).isel(time=slice(0, 16)).load()
    ds["air"][10:, :10, :] = np.nan  # 40 % missing in the second block only
    ds.to_netcdf(tmp_path / "late_nans.nc")
    out = tmp_path / "s.zarr"
    options = {"time_block": 8}
    with pytest.raises(Exception, match="max_missing_fraction"):
        prepare(make_config(tmp_path / "late_nans.nc", out, **options), progress=False)
    assert sorted(map(str, load_progress(out)["blocks_done"])) == ["0", "static"]  # block 0 kept
    prepare(make_config(tmp_path / "late_nans.nc", out, max_missing_fraction=0.5, **options),
            progress=False)
    assert open_store(out)["missing_fraction"].values[0] == pytest.approx(6 * 10 / (16 * 25))


def test_overwrite_builds_beside_and_swaps_in(ncep_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    prepare(make_config(ncep_file, out, end="2013-01-02"), progress=False)
    prepare(make_config(ncep_file, out, end="2013-01-04"), overwrite=True, progress=False)
    assert open_store(out).sizes["time"] == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no .partial left


def test_static_fields_of_the_source_are_stored(ncep_file: Path, tmp_path: Path) -> None:
    """A land-sea mask and surface geopotential ('z' without levels, as in ERA5 single-level
    files), time-invariant, stored in `statics` in canonical order."""
    ds = xr.open_dataset(ncep_file).isel(time=slice(0, 8)).load()
    rng = np.random.default_rng(0)
    mask = (rng.random((25, 53)) > 0.5).astype("float32")
    height = (rng.random((25, 53)) * 3000).astype("float32") * 9.80665
    ds["lsm"] = (("lat", "lon"), mask, {"units": "(0 - 1)"})
    ds["z"] = (("lat", "lon"), height, {"units": "m**2 s**-2"})
    ds.to_netcdf(tmp_path / "with_statics.nc")
    store = prepare(make_config(tmp_path / "with_statics.nc", tmp_path / "s.zarr"),
                    progress=False)
    out = open_store(store)
    assert list(out["channel"].values) == ["2m_temperature"]
    assert list(out["static"].values)[-2:] == ["land_sea_mask", "geopotential_at_surface"]
    np.testing.assert_array_equal(out["statics"].sel(static="land_sea_mask").values,
                                  mask[::-1])
    np.testing.assert_allclose(out["statics"].sel(static="geopotential_at_surface").values,
                               height[::-1], rtol=1e-6)
    assert read_metadata(store)["statics"][-1] == "geopotential_at_surface"

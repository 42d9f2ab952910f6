"""The `weathermodel` command as a user runs it: installed entry point, subprocesses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from weathermodel.data.store import open_store, read_metadata


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    executable = shutil.which("weathermodel", path=str(Path(sys.executable).parent))
    command = [executable] if executable else [sys.executable, "-m", "weathermodel"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_version_and_help() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("weathermodel ")
    result = run_cli("--help")
    for stage in ("prepare", "train", "forecast", "evaluate", "demo"):
        assert stage in result.stdout


def test_prepare_prints_config_then_writes_a_store(ncep_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.zarr"
    result = run_cli("prepare", str(ncep_file), "--out", str(out), "--start", "2013-05-01",
                     "--end", "2013-05-03T18", "--time-step", "6h", "time_block=4")
    assert result.returncode == 0, result.stderr
    assert "time_block: 4" in result.stdout and "time_step: 6h" in result.stdout
    assert "prepare: writing" in result.stderr  # progress bar shown
    assert open_store(out).sizes["time"] == 12
    assert read_metadata(out)["config"]["time_block"] == 4
    inspect = run_cli("inspect", str(out))
    assert inspect.returncode == 0 and '"complete": true' in inspect.stdout


def test_error_exit_code_and_message(tmp_path: Path) -> None:
    result = run_cli("prepare", str(tmp_path / "nothing.nc"), "--out", str(tmp_path / "o.zarr"))
    assert result.returncode == 2
    assert "nothing.nc" in result.stderr and "fix:" in result.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_unknown_override_is_refused(ncep_file: Path, tmp_path: Path) -> None:
    result = run_cli("prepare", str(ncep_file), "--out", str(tmp_path / "o.zarr"),
                     "colour=blue")
    assert result.returncode == 2 and "colour" in result.stderr


def test_climatology_command_writes_day_of_year_by_hour(ncep_file: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert run_cli("prepare", str(ncep_file), "--out", str(store), "--end", "2013-01-10",
                   "--no-progress").returncode == 0
    result = run_cli("climatology", str(store), "--out", str(tmp_path / "clim.nc"))
    assert result.returncode == 0, result.stderr
    import xarray as xr

    clim = xr.open_dataset(tmp_path / "clim.nc")
    assert clim.sizes["hour"] == 4 and clim.sizes["dayofyear"] == 366
    day = clim["2m_temperature"].sel(dayofyear=5, hour=12).values
    truth = open_store(store)["state"].sel(time="2013-01-05T12").values[0, 0]
    import numpy as np

    np.testing.assert_allclose(day, truth, rtol=1e-6)  # one year: the mean is that day

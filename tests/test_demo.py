"""`weathermodel demo`, the whole path, run as a user runs it (a subprocess of the CLI).

The reduced demo trains for a few steps on fewer start dates; the shipped-checkpoint demo
checks the claims of checkpoints/ncep_graph_2013/MODEL_CARD.md on a subset of start dates.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from test_cli import run_cli
from weathermodel.demo import SHIPPED_CHECKPOINT, resource_path

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rmse(scores: xr.Dataset, system: str) -> np.ndarray:
    """RMSE per lead of the sample's one variable (2m_temperature)."""
    return scores["2m_temperature"].sel(metric="rmse", system=system).values


def _table_rows(text: str) -> dict[int, list[float]]:
    """The numbers of the printed skill table, by lead in hours."""
    rows = {}
    for match in re.finditer(r"^\| (\d+) h \| ([^\n]*)$", text, flags=re.M):
        cells = [c.strip() for c in match.group(2).split("|")]
        rows[int(match.group(1))] = [float(c) for c in cells if re.fullmatch(r"[\d.]+", c)]
    return rows


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = run_cli("demo", "--out", str(out), "--train-steps", "150",
                     "--init", "2013-10-01/2013-10-10T12/12h", "--lead", "2d", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout + result.stderr


def test_reduced_demo_writes_every_output(reduced_demo: tuple[Path, str]) -> None:
    out, output = reduced_demo
    for stage in range(1, 6):
        assert f"[{stage}/5]" in output
    assert "train:" in output and "forecast" in output  # progress bars were shown
    for name in ("ncep_2013.zarr", "train/model.pt", "forecast.zarr", "climatology.nc",
                 "scores.nc", "spectra.nc", "skill.md"):
        assert (out / name).exists(), name
    with xr.open_zarr(out / "forecast.zarr") as forecast:
        assert forecast.sizes["time"] == 20 and forecast.sizes["prediction_timedelta"] == 8
    plots = {p.name: p.stat().st_size for p in (out / "plots").glob("*.png")}
    assert any("scorecard" in name for name in plots), plots
    assert any("lead" in name for name in plots), plots
    assert any("map" in name for name in plots), plots
    assert min(plots.values()) > 10_000, plots


def test_reduced_demo_beats_persistence_and_prints_the_scores(
        reduced_demo: tuple[Path, str]) -> None:
    out, output = reduced_demo
    scores = xr.open_dataset(out / "scores.nc")
    graph, persistence = _rmse(scores, "graph"), _rmse(scores, "persistence")
    assert graph[0] < 0.9 * persistence[0]  # 6 h
    assert np.all(np.isfinite(_rmse(scores, "climatology")))
    # the printed table is the one written, and both are the stored scores
    assert (out / "skill.md").read_text() in output
    leads = scores["prediction_timedelta"].values.astype("timedelta64[h]").astype(int)
    rows = _table_rows(output)
    assert set(rows) == {6, 24}  # the table's leads that a 2-day forecast has
    systems = [str(s) for s in scores["system"].values]
    for hours, values in rows.items():
        index = int(np.flatnonzero(leads == hours)[0])
        expected = [_rmse(scores, s)[index] for s in systems]
        np.testing.assert_allclose(values, expected, atol=0.006)


def test_rerun_reuses_every_stage(reduced_demo: tuple[Path, str]) -> None:
    out, _ = reduced_demo
    before = xr.open_dataset(out / "scores.nc").load()
    model_time = (out / "train/model.pt").stat().st_mtime_ns
    result = run_cli("demo", "--out", str(out), "--train-steps", "150", "--no-progress",
                     "--init", "2013-10-01/2013-10-10T12/12h", "--lead", "2d", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reusing the trained model" in result.stdout
    assert (out / "train/model.pt").stat().st_mtime_ns == model_time
    xr.testing.assert_identical(xr.open_dataset(out / "scores.nc").load(), before)


def test_a_forecast_of_another_model_is_replaced(reduced_demo: tuple[Path, str]) -> None:
    """The demo owns its folder: switching to the shipped checkpoint replaces the forecast
    of the trained model instead of refusing it or mixing the two (runs after the rerun)."""
    out, _ = reduced_demo
    trained = _rmse(xr.open_dataset(out / "scores.nc").load(), "graph")
    result = run_cli("demo", "--out", str(out), "--use-checkpoint", "--no-progress",
                     "--init", "2013-10-01/2013-10-10T12/12h", "--lead", "2d", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = _rmse(xr.open_dataset(out / "scores.nc").load(), "graph")
    assert shipped.shape == trained.shape and not np.allclose(shipped, trained)
    assert not Path(f"{out / 'forecast.zarr'}.progress").exists()


def test_shipped_checkpoint_beats_persistence_at_every_lead(tmp_path: Path) -> None:
    """The model card's claim on a subset of its start dates (every 5th day of Oct-Dec)."""
    assert resource_path("checkpoints", SHIPPED_CHECKPOINT).is_file()
    out = tmp_path / "shipped"
    result = run_cli("demo", "--out", str(out), "--use-checkpoint", "--no-progress",
                     "--init", "2013-10-01/2013-12-26/5d", "--lead", "5d", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "train").exists()  # nothing was trained
    scores = xr.open_dataset(out / "scores.nc")
    graph, persistence = _rmse(scores, "graph"), _rmse(scores, "persistence")
    assert graph.shape == (20,)
    assert np.all(graph < persistence), (graph, persistence)


def test_installed_wheel_runs_the_demo_outside_the_source_tree(tmp_path: Path) -> None:
    """`weathermodel demo` from an installed package: the wheel carries the sample, the
    recipe, the coastlines and the checkpoint (links in the source tree become files)."""
    root = Path(__file__).resolve().parents[1]
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(root)], check=True, timeout=300, cwd=tmp_path)
    [wheel] = wheels.glob("weathermodel-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c",
                            "import weathermodel; print(weathermodel.__file__)"],
                           capture_output=True, text=True, env=env, cwd=work, check=True)
    assert where.stdout.startswith(str(target))
    result = subprocess.run([sys.executable, "-m", "weathermodel", "demo", "--use-checkpoint",
                             "--no-progress", "--init", "2013-10-01/2013-10-03/1d",
                             "--lead", "1d", "--out", "demo"],
                            capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = xr.open_dataset(work / "demo" / "scores.nc")
    assert np.all(_rmse(scores, "graph") < _rmse(scores, "persistence"))
    assert (work / "demo" / "plots" / "map_2m_temperature.png").stat().st_size > 10_000

"""The evaluation notebook runs top to bottom with small parameters and writes what it
promises: scores with the model and both baselines, and the plots. The committed notebook has
no outputs and a first code cell tagged ``parameters``."""
from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import xarray as xr
from nbclient import NotebookClient

from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.dataset import read_summary
from weathermodel.data.prepare import prepare
from weathermodel.models.config import GraphConfig, ModelConfig
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.io import save_model

PROJECT = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT / "notebooks" / "evaluation.ipynb"
SAMPLE = PROJECT / "weathermodel" / "sample_data" / "air_temperature_2013.nc"
SHIPPED_CHECKPOINT = PROJECT / "checkpoints" / "ncep_graph_2013" / "model.pt"
PLOTS = ("lead_time_rmse.png", "lead_time_acc.png", "scorecard_rmse.png",
         "spectra_2m_temperature.png", "map_2m_temperature.png")
SMALL = {"INIT": "2013-10-01/2013-10-02/12h", "LEAD": "18h", "TRUTH_START": "2013-09-01",
         "TRUTH_END": "2013-10-31T18", "CLIMATOLOGY_WINDOW_DAYS": 5}


def persistence_checkpoint(root: Path) -> Path:
    """A tiny graph model whose output layer is zero: it predicts no change (persistence)."""
    store = prepare(from_dict(PrepareConfig, {"sources": [{"path": str(SAMPLE)}],
                                              "output": str(root / "store.zarr"),
                                              "start": "2013-09-20", "end": "2013-10-10"}),
                    progress=False)
    summary = read_summary(store)
    config = ModelConfig(kind="graph", history=2, graph=GraphConfig(
        mesh_refinement=1, latent_size=8, processor_layers=1))
    torch.manual_seed(0)
    model = Forecaster(config, ModelMetadata.from_summary(summary), summary.statics)
    with torch.no_grad():
        for parameter in model.network.output[-1].parameters():
            parameter.zero_()
    return save_model(model, root / "persistence.pt")


def with_parameters(notebook: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Insert a cell setting ``values`` after the ``parameters`` cell, as papermill does."""
    index = next(i for i, cell in enumerate(notebook.cells)
                 if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, injected)
    return notebook


def test_committed_notebook_is_clean_and_parametrised() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for name in ("CHECKPOINT", "WORK_DIR", "INIT", "LEAD"):
        assert f"\n{name} = " in "\n" + code[0].source, name
    assert "WEATHERMODEL_CHECKPOINT" in code[0].source
    assert "checkpoints/ncep_graph_2013/model.pt" in code[0].source
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.mark.timeout(300)
def test_notebook_runs_and_writes_scores_and_plots(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path / "cache"))  # the kernel inherits it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shipped = SHIPPED_CHECKPOINT.is_file()
    checkpoint = SHIPPED_CHECKPOINT if shipped else persistence_checkpoint(tmp_path)
    work = tmp_path / "work"
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4),
                               {**SMALL, "CHECKPOINT": str(checkpoint), "WORK_DIR": str(work)})
    NotebookClient(notebook, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    scores = xr.open_dataset(work / "scores.nc")
    assert list(scores["system"].values) == ["graph", "persistence", "climatology"]
    rmse = scores["2m_temperature"].sel(metric="rmse")
    assert rmse.sizes["prediction_timedelta"] == 3  # 18 h in 6-hour steps
    assert (scores["n_pairs"].sel(system="graph") == 3).all()  # three start dates
    assert np.isfinite(rmse.values).all() and (rmse.values > 0).all()
    if shipped:  # the trained model beats persistence at 6 h
        assert float(rmse.sel(system="graph")[0]) < float(rmse.sel(system="persistence")[0])
    else:  # a model predicting no change scores exactly as persistence, at every lead
        np.testing.assert_allclose(rmse.sel(system="graph"), rmse.sel(system="persistence"),
                                   rtol=1e-6)
        assert not np.allclose(rmse.sel(system="graph"), rmse.sel(system="climatology"))
    for name in PLOTS:
        path = work / "plots" / name
        assert path.is_file() and path.stat().st_size > 10_000, path

    outputs = "".join(output.get("text", "") for cell in notebook.cells
                      for output in cell.get("outputs", []))
    assert "rmse:graph" in outputs and "rmse:persistence" in outputs  # the score table
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) >= len(PLOTS)

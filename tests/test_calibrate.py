"""``weathermodel calibrate`` on a tiny real store: too small an amplitude gives SSR << 1, the
calibrated one SSR ~ 1 at the calibrated lead, equal to what ``evaluate``'s spread-skill ratio
finds on the ensemble ``forecast --perturbation-file`` writes; bred vectors; bad input refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from weathermodel import load_forecaster

from weathermodel.cli import main
from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.dataset import read_summary
from weathermodel.data.prepare import prepare
from weathermodel.data.sources import file_checksum
from weathermodel.data.weights import cell_area_weights
from weathermodel.evaluation import align, open_forecast, spread_skill_ratio, truth_dataset
from weathermodel.inference import forecast as forecast_module
from weathermodel.inference.calibrate import (checkpoint_perturbation, read_perturbation_file,
                                              write_perturbation_file)
from weathermodel.inference.contract import open_initial_conditions
from weathermodel.inference.forecast import ForecastOptions
from weathermodel.models.config import GraphConfig, ModelConfig
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.io import load_model, read_payload, save_model

PROJECT = Path(__file__).resolve().parents[1]
VARIABLE = "2m_temperature"
INIT = "2013-10-02/2013-10-09/1d"  # eight validation starts
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


@pytest.fixture(scope="module")
def setup(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An NCEP store (Sep-Oct 2013, North America, 2.5 degrees) and an untrained tiny graph
    model (its errors are large: the calibrated perturbation must be large too)."""
    root = tmp_path_factory.mktemp("calibrate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WEATHERMODEL_CACHE", str(root / "cache"))
        store = prepare(from_dict(PrepareConfig, {
            "sources": [{"path": str(ncep_file)}], "output": str(root / "ncep.zarr"),
            "start": "2013-09-01", "end": "2013-10-31T18"}), progress=False)
        summary = read_summary(store)
        torch.manual_seed(0)
        config = ModelConfig(kind="graph", history=2, graph=GraphConfig(
            mesh_refinement=1, latent_size=16, processor_layers=1))
        model = Forecaster(config, ModelMetadata.from_summary(summary), summary.statics)
        checkpoint = save_model(model, root / "model.pt")
        yield {"root": root, "store": store, "checkpoint": checkpoint}


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _ssr_at_12h(setup: dict, store: Path) -> float:
    """``evaluate``'s spread-skill ratio (finite-ensemble correction) of a forecast store."""
    forecast = open_forecast(store)[[VARIABLE]].sel(prediction_timedelta=[np.timedelta64(
        12, "h")])
    aligned = align(forecast, truth_dataset(setup["store"])[[VARIABLE]])
    ratio = spread_skill_ratio(aligned.forecast, aligned.truth, finite_ensemble_correction=True)
    return float(ratio[VARIABLE].squeeze())


def _calibrate(setup: dict, capsys, out: Path, *extra: str) -> tuple[int, str, str]:
    return _cli(capsys, "calibrate", "--checkpoint", str(setup["checkpoint"]), "--data",
                str(setup["store"]), "--init", INIT, "--lead", "12h", "--members", "6",
                "--out", str(out), "--no-progress", *extra)


def test_calibration_brings_the_spread_skill_ratio_to_one(setup: dict, tmp_path: Path,
                                                          capsys) -> None:
    out = tmp_path / "perturbation.yaml"
    code, printed, err = _calibrate(setup, capsys, out, "--amplitude", "0.01",
                                    "--perturbation-length-scale", "800")
    assert code == 0, err
    contents = yaml.safe_load(out.read_text())
    record = contents["calibration"]
    trials = record["trials"]
    assert trials[0]["amplitude"] == 0.01
    assert trials[0]["spread_skill_ratio"] < 0.3  # far too little spread at first
    assert record["converged"] and abs(record["spread_skill_ratio"] - 1) < 0.06
    assert contents["amplitude"] > 0.05 and contents["length_scale_km"] == 800
    assert "chosen amplitude" in printed and str(out) in printed
    settings = read_perturbation_file(out)
    assert settings.amplitude == contents["amplitude"] and settings.length_scale_km == 800

    # the ensemble the forecast makes from the file scores the same SSR in evaluation
    store = tmp_path / "ensemble.zarr"
    code, _, err = _cli(capsys, "forecast", "--checkpoint", str(setup["checkpoint"]), "--data",
                        str(setup["store"]), "--init", INIT, "--lead", "12h", "--members",
                        "6", "--perturbation-file", str(out), "--out", str(store),
                        "--no-progress")
    assert code == 0, err
    assert open_forecast(store).sizes["number"] == 6
    assert _ssr_at_12h(setup, store) == pytest.approx(record["spread_skill_ratio"], rel=2e-3)

    # an explicit flag overrides the file: a tenth of the amplitude, a tenth of the spread
    store_small = tmp_path / "small.zarr"
    code, _, err = _cli(capsys, "forecast", "--checkpoint", str(setup["checkpoint"]), "--data",
                        str(setup["store"]), "--init", INIT, "--lead", "12h", "--members",
                        "6", "--perturbation-file", str(out), "--perturbation",
                        str(contents["amplitude"] / 10), "--out", str(store_small),
                        "--no-progress")
    assert code == 0, err
    assert _ssr_at_12h(setup, store_small) < 0.3


def test_bred_vectors_have_the_target_amplitude_and_keep_the_control(setup: dict) -> None:
    model = load_model(setup["checkpoint"]).eval()
    metadata = model.metadata
    state = open_initial_conditions(str(setup["store"]), metadata)
    step = np.timedelta64(metadata.time_step_seconds, "s")
    init = np.datetime64("2013-10-05T00", "ns")

    def analysis_at(time: np.datetime64) -> np.ndarray:
        return forecast_module._initial_state(state, time, model.history, step, "store")

    initial = analysis_at(init)
    options = ForecastOptions(checkpoint="", data="", init="", lead="", out="", members=4,
                              perturbation=0.5, perturbation_bred_cycles=3)
    states = forecast_module._initial_members(initial, model, options, 0, torch.device("cpu"),
                                              init, analysis_at).numpy()
    np.testing.assert_array_equal(states[0], initial)
    perturbation = (states[1:] - initial[None]).astype(np.float64)
    np.testing.assert_allclose(perturbation[:, 0], perturbation[:, 1], atol=1e-4)
    weights = cell_area_weights(np.asarray(metadata.latitude), "edges")[:, None]
    rms = np.sqrt(np.mean(weights * perturbation[:, 0] ** 2, axis=(-2, -1)))  # (member, C)
    target = 0.5 * np.asarray(metadata.tendency_std)[None]
    np.testing.assert_allclose(rms, np.broadcast_to(target, rms.shape), rtol=1e-3)
    # the model shaped them: they differ from the random fields they started from
    plain = forecast_module._initial_members(initial, model, ForecastOptions(
        checkpoint="", data="", init="", lead="", out="", members=4, perturbation=0.5),
        0, torch.device("cpu")).numpy()
    assert np.abs(plain[1:] - states[1:]).max() > 0.1 * target.max()


def test_bad_calibration_input_is_refused(setup: dict, tmp_path: Path, capsys) -> None:
    code, _, err = _cli(capsys, "calibrate", "--checkpoint", str(setup["checkpoint"]),
                        "--data", str(setup["store"]), "--init", "2013-10-30", "--lead", "5d",
                        "--out", str(tmp_path / "p.yaml"), "--no-progress")
    assert code == 2 and "not in the data" in err and "fix:" in err, err
    code, _, err = _calibrate(setup, capsys, tmp_path / "p.txt")
    assert code == 2 and ".yaml" in err, err
    code, _, err = _calibrate(setup, capsys, tmp_path / "p.yaml", "--channels", "vorticity")
    assert code == 2 and "vorticity" in err, err
    broken = tmp_path / "broken.yaml"
    broken.write_text("amplitude: -1\n")
    code, _, err = _cli(capsys, "forecast", "--checkpoint", str(setup["checkpoint"]), "--data",
                        str(setup["store"]), "--init", "2013-10-02", "--lead", "6h",
                        "--members", "2", "--perturbation-file", str(broken), "--out",
                        str(tmp_path / "f.zarr"), "--no-progress")
    assert code == 2 and "amplitude" in err, err
    assert not (tmp_path / "f.zarr").exists()


def test_a_checkpoint_folder_brings_its_calibrated_perturbations(setup: dict, tmp_path: Path,
                                                                 capsys) -> None:
    """``perturbation.yaml`` beside ``model.pt`` is the checkpoint's calibrated ensemble: an
    ensemble forecast (CLI or Python API) without amplitude flags uses it, equal to giving the
    file; flags still override it; one calibrated for another model file is refused."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    shutil.copy(setup["checkpoint"], folder / "model.pt")
    write_perturbation_file(folder / "perturbation.yaml", {
        "amplitude": 0.8, "length_scale_km": 900.0,
        "calibration": {"checkpoint_digest": file_checksum(str(folder / "model.pt"))[0]}})
    common = ("--data", str(setup["store"]), "--init", "2013-10-02/2013-10-03/1d", "--lead",
              "12h", "--members", "4", "--no-progress")
    stores = {}
    for name, extra in (("shipped", ("--checkpoint", str(folder))),
                        ("file", ("--checkpoint", str(setup["checkpoint"]),
                                  "--perturbation-file", str(folder / "perturbation.yaml"))),
                        ("flag", ("--checkpoint", str(folder), "--perturbation", "0.01"))):
        stores[name] = tmp_path / f"{name}.zarr"
        code, printed, err = _cli(capsys, "forecast", *extra, *common, "--out",
                                  str(stores[name]))
        assert code == 0, err
        assert ("calibrated for this checkpoint" in printed) == (name == "shipped")
    values = {name: open_forecast(store)[VARIABLE].load() for name, store in stores.items()}
    xr.testing.assert_equal(values["shipped"], values["file"])
    spread = {name: float(v.isel(number=slice(1, None)).std("number").mean())
              for name, v in values.items()}
    assert spread["flag"] < 0.1 * spread["shipped"]

    # the Python API takes the same perturbations from the folder
    predictor = load_forecaster(folder)
    initial = truth_dataset(setup["store"])[[VARIABLE]].sel(
        time=slice("2013-10-01T18", "2013-10-02T00")).load()
    predicted = predictor.predict(initial, lead="12h", members=4)
    np.testing.assert_allclose(predicted[VARIABLE].values,
                               values["shipped"].isel(time=[0]).transpose(
                                   *predicted[VARIABLE].dims).values, rtol=1e-6, atol=1e-4)

    # a calibration of another model file is stale: refused before anything is written
    other = dict(yaml.safe_load((folder / "perturbation.yaml").read_text()))
    other["calibration"] = {"checkpoint_digest": "sha256:" + "0" * 64}
    write_perturbation_file(folder / "perturbation.yaml", other)
    code, _, err = _cli(capsys, "forecast", "--checkpoint", str(folder), *common, "--out",
                        str(tmp_path / "stale.zarr"))
    assert code == 2 and "another model file" in err and "calibrate" in err, err
    assert not (tmp_path / "stale.zarr").exists()


@pytest.mark.parametrize("name, stochastic", [("speedy_transformer_2000", False),
                                              ("speedy_crps_2000", True)])
def test_shipped_checkpoints_carry_perturbations_calibrated_for_them(name: str,
                                                                     stochastic: bool) -> None:
    """The shipped global checkpoints' perturbation files were calibrated for exactly those
    model files (a retrained model.pt without a new calibration fails here) and converged."""
    folder = PROJECT / "checkpoints" / name
    if not (folder / "model.pt").is_file():
        pytest.skip(f"{folder} is not in this checkout")
    shipped = checkpoint_perturbation(folder)
    assert shipped is not None
    path, settings = shipped
    record = yaml.safe_load(path.read_text())["calibration"]
    assert record["converged"] and abs(record["spread_skill_ratio"] - 1) < 0.05
    assert any(trial["amplitude"] == settings.amplitude for trial in record["trials"])
    # files written before the flag existed are deterministic
    assert read_payload(folder).get("stochastic", False) is stochastic

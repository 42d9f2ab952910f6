"""Variable roles (Anemoi's forcing / diagnostic), the input imputer and the loss mask, on a
real global multi-level store (ten days of the simulated ERA5-layout corpus: sst is NaN over
land, precipitation is a diagnostic)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from weathermodel import conventions
from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.dataset import WindowDataset, read_summary
from weathermodel.data.prepare import prepare
from weathermodel.errors import ConfigError
from weathermodel.inference.forecast import ForecastOptions, forecast
from weathermodel.models.config import ModelConfig
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.io import save_model
from weathermodel.models.loss import WeightedMSELoss

TINY = {"graph": {"mesh_refinement": 2, "latent_size": 16, "processor_layers": 1},
        "transformer": {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2,
                        "window": 2}}
SST, PRECIP = "sea_surface_temperature", "mean_total_precipitation_rate"


@pytest.fixture(scope="module")
def store(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = data_dir / "speedy-t21"
    out = tmp_path_factory.mktemp("roles") / "speedy.zarr"
    config = {"sources": [{"path": str(folder / "pressure_levels_2000-01.nc")},
                          {"path": str(folder / "single_levels_2000-01.nc")}],
              "output": str(out), "end": "2000-01-06T18", "max_missing_fraction": 0.9}
    return prepare(from_dict(PrepareConfig, config), progress=False)


@pytest.fixture(autouse=True)
def graph_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path / "cache"))


def make_model(store: Path, kind: str = "graph", **options) -> Forecaster:
    torch.manual_seed(0)
    summary = read_summary(store)
    config = from_dict(ModelConfig, {"kind": kind, "history": 2, **TINY, **options})
    return Forecaster(config, ModelMetadata.from_summary(summary, config), summary.statics)


def batch(store: Path, n: int = 2, rollout: int = 2) -> dict[str, torch.Tensor]:
    dataset = WindowDataset(store, history=2, rollout=rollout)
    samples = [dataset[i] for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def channel(model: Forecaster, name: str) -> int:
    return model.metadata.channels.index(name)


def test_default_roles_follow_the_registry(store: Path) -> None:
    metadata = ModelMetadata.from_summary(read_summary(store))
    roles = dict(zip(metadata.channels, metadata.channel_roles))
    assert roles[SST] == conventions.FORCING and roles[PRECIP] == conventions.DIAGNOSTIC
    assert {roles[c] for c in metadata.channels if c not in (SST, PRECIP)} == {conventions.PROGNOSTIC}
    missing = dict(zip(metadata.channels, metadata.channel_has_missing))
    assert missing[SST] and not any(v for c, v in missing.items() if c != SST)


def test_config_overrides_roles(store: Path) -> None:
    summary = read_summary(store)
    config = from_dict(ModelConfig, {"forcing": ["2m_temperature"], "diagnostic": []})
    roles = dict(zip(summary.channels,
                     ModelMetadata.from_summary(summary, config).channel_roles))
    # an explicit list replaces the registry's defaults for that role
    assert roles["2m_temperature"] == conventions.FORCING and roles[SST] == conventions.PROGNOSTIC
    assert roles[PRECIP] == conventions.PROGNOSTIC
    with pytest.raises(ConfigError, match="does not hold"):
        ModelMetadata.from_summary(summary, from_dict(ModelConfig, {"forcing": ["vorticity"]}))
    with pytest.raises(ConfigError, match="both as forcing and as diagnostic"):
        from_dict(ModelConfig, {"forcing": [SST], "diagnostic": [SST]}).validate()


@pytest.mark.parametrize("kind", ["graph", "transformer"])
def test_roles_decide_inputs_and_outputs(store: Path, kind: str) -> None:
    model = make_model(store, kind).eval()
    metadata = model.metadata
    n_channels, n_forcings = len(metadata.channels), len(metadata.forcings)
    expected_inputs = 2 * (n_channels - 1) + 3 * n_forcings + len(metadata.statics)
    assert model.network_inputs(torch.zeros(1, 2, n_channels, 32, 64),
                                torch.zeros(1, 3, n_forcings, 32, 64)).shape[1] == \
        expected_inputs
    assert model.output_channel_index.tolist() == [
        i for i, c in enumerate(metadata.channels) if c != SST]
    data = batch(store)
    states, forcings = data["inputs"], data["forcings"][:, :3]
    with torch.no_grad():
        reference = model(states, forcings)
        # a diagnostic is never an input: changing it changes nothing
        noisy = states.clone()
        noisy[:, :, channel(model, PRECIP)] += torch.randn_like(noisy[:, :, 0]) * 1e-3
        torch.testing.assert_close(model(noisy, forcings), reference, rtol=0, atol=0,
                                   equal_nan=True)
        # the forcing is an input: changing it changes the prediction
        warmer = states.clone()
        warmer[:, :, channel(model, SST)] += 5.0
        assert not torch.equal(model(warmer, forcings), reference)
    # the forcing is carried over, NaN over land included, never predicted
    sst = channel(model, SST)
    torch.testing.assert_close(reference[:, sst], states[:, -1, sst], equal_nan=True)


def test_residual_prognostics_and_direct_diagnostics(store: Path) -> None:
    """With a network that outputs zeros, prognostic channels persist the last state and
    diagnostic channels are the training mean (they are not tendencies)."""
    model = make_model(store)
    for module in model.network.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    data = batch(store)
    with torch.no_grad():
        out = model(data["inputs"], data["forcings"][:, :3])
    prognostic = model.metadata.role_index(conventions.PROGNOSTIC)
    torch.testing.assert_close(out[:, prognostic], data["inputs"][:, -1, prognostic])
    precip = channel(model, PRECIP)
    assert torch.allclose(out[:, precip], model.mean[0, precip].expand_as(out[:, precip]))


def test_imputer_fills_the_training_mean_and_masks(store: Path) -> None:
    model = make_model(store).eval()
    data = batch(store)
    states, forcings = data["inputs"], data["forcings"][:, :3]
    sst = channel(model, SST)
    land = torch.isnan(states[:, :, sst])
    assert land.any() and not land.all()
    filled = states.clone()
    filled[:, :, sst] = torch.where(land, model.mean[0, sst], states[:, :, sst])
    with torch.no_grad():
        imputed = model(states, forcings)
        explicit = model(filled, forcings)
    outputs = model.output_channel_index
    assert torch.isfinite(imputed[:, outputs]).all()
    torch.testing.assert_close(imputed[:, outputs], explicit[:, outputs], rtol=0, atol=0)
    masked = make_model(store, imputer_mask_channel=True).eval()
    inputs = masked.network_inputs(states, forcings)
    assert inputs.shape[1] == model.network_inputs(states, forcings).shape[1] + 2
    mask = inputs[:, 2 * (len(model.metadata.channels) - 1):][:, :2]
    assert torch.equal(mask.bool(), land)


def test_loss_is_masked_where_the_target_is_missing(store: Path) -> None:
    model = make_model(store)
    loss = WeightedMSELoss.for_model(model)
    data = batch(store, rollout=1)
    target = data["targets"][:, 0]
    torch.manual_seed(1)
    prediction = (target + torch.randn_like(target) * model.tendency_std).requires_grad_()
    target = target.clone()
    t2m = channel(model, "2m_temperature")
    target[:, t2m, :5] = float("nan")  # missing target values in a prognostic channel
    value = loss(prediction, target)
    value.backward()
    assert torch.isfinite(prediction.grad).all()
    assert float(prediction.grad[:, t2m, :5].abs().max()) == 0.0
    # brute force in numpy over the valid points of the output channels only
    outputs = model.output_channel_index.numpy()
    pred, true = prediction.detach().numpy()[:, outputs], target.numpy()[:, outputs]
    scale = model.output_scale.flatten().numpy()[:, None, None]
    area = loss.area.numpy()[None, None]
    weight = loss.channel.numpy()[None] * area * np.isfinite(true)
    error = np.nan_to_num((pred - true) / scale) ** 2
    assert float(value.detach()) == pytest.approx(float((error * weight).sum() / weight.sum()), rel=1e-5)
    # the forcing channel is not scored, whatever its error
    moved = prediction.detach().clone()
    moved[:, channel(model, SST)] += 100.0
    assert float(loss(moved, target).detach()) == pytest.approx(float(value.detach()), rel=1e-6)


def test_rollout_takes_forcings_from_the_data(store: Path) -> None:
    model = make_model(store).eval()
    data = batch(store, rollout=2)
    sst = channel(model, SST)
    with torch.no_grad():
        persisted = model.rollout(data["inputs"], data["forcings"], 2)
        observed = model.rollout(data["inputs"], data["forcings"], 2, data["targets"])
    torch.testing.assert_close(persisted[:, 1, sst], data["inputs"][:, -1, sst], equal_nan=True)
    torch.testing.assert_close(observed[:, 1, sst], data["targets"][:, 1, sst], equal_nan=True)


def test_forecast_from_a_store_with_missing_forcing_values(store: Path, tmp_path: Path) -> None:
    """The contract accepts NaN where the model imputes (sst over land); the forecast store
    holds the predicted variables only (no forcing), precipitation included, all finite."""
    model = make_model(store)
    save_model(model, tmp_path / "model.pt")
    out = tmp_path / "forecast.zarr"
    forecast(ForecastOptions(checkpoint=str(tmp_path / "model.pt"), data=str(store),
                             init="2000-01-02T00", lead="12h", out=str(out), progress=False))
    result = xr.open_zarr(out)
    assert SST not in result and PRECIP in result and "temperature" in result
    assert bool(np.isfinite(result[PRECIP].values).all())
    assert bool(np.isfinite(result["temperature"].values).all())

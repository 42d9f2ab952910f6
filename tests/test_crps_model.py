"""A stochastic (CRPS-trained) forecaster: noise inputs, members that differ, and a tiny model
that learns a known spread from the almost-fair CRPS."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from weathermodel.configuration import from_dict
from weathermodel.errors import ConfigError
from weathermodel.models.config import LossConfig, ModelConfig
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.loss import WeightedCRPSLoss

N_LAT, N_LON = 8, 16
TINY = {"graph": {"mesh_refinement": 1, "latent_size": 16, "processor_layers": 1},
        "transformer": {"patch_size": 2, "embed_dim": 32, "depth": 1, "num_heads": 2,
                        "window": 4}}


def metadata() -> ModelMetadata:
    """One channel on a small global grid, no forcings or statics: a pure noise process."""
    latitude = np.linspace(78.75, -78.75, N_LAT).tolist()
    return ModelMetadata(
        channels=["2m_temperature"], channel_variables=["2m_temperature"],
        channel_levels=[float("nan")], forcings=[], statics=[], latitude=latitude,
        longitude=(np.arange(N_LON) * 360.0 / N_LON).tolist(),
        time_step_seconds=21600, mean=[0.0], std=[1.0], tendency_std=[1.0], forcing_mean=[],
        forcing_std=[], static_mean=[], static_std=[], variables=[{}],
        grid={"is_global": True})


def make_model(kind: str = "transformer", noise_channels: int = 4, **ensemble) -> Forecaster:
    torch.manual_seed(0)
    config = from_dict(ModelConfig, {"kind": kind, "history": 1, **TINY, "ensemble": {
        "noise_channels": noise_channels, **ensemble}})
    return Forecaster(config, metadata(), np.zeros((0, N_LAT, N_LON), "float32"))


def no_forcings(batch: int, times: int = 2) -> torch.Tensor:
    return torch.zeros(batch, times, 0, N_LAT, N_LON)


@pytest.mark.parametrize("kind", ["transformer", "graph"])
def test_stochastic_model_gives_different_members_and_a_deterministic_one_does_not(
        kind: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path))
    states = torch.randn(1, 1, 1, N_LAT, N_LON).expand(3, -1, -1, -1, -1)
    stochastic = make_model(kind)
    assert stochastic.is_stochastic
    members = stochastic(states, no_forcings(3))
    assert float((members[0] - members[1]).detach().abs().max()) > 1e-4
    deterministic = make_model(kind, noise_channels=0)
    assert not deterministic.is_stochastic
    outputs = deterministic(states, no_forcings(3))
    torch.testing.assert_close(outputs[0], outputs[1])
    # the noise inputs widen the network's input layer
    assert sum(p.numel() for p in stochastic.parameters()) > \
        sum(p.numel() for p in deterministic.parameters())


def test_noise_is_smooth_standard_normal_and_continuous_across_the_date_line() -> None:
    model = make_model(noise_length_points=4)
    torch.manual_seed(1)
    noise = model.noise(2000, torch.zeros(1))
    assert noise.shape == (2000, 4, N_LAT, N_LON)
    # at the coarse nodes (every 4th point) the values are standard normal
    nodes = noise[:, :, ::4, ::4]
    assert abs(float(nodes.mean())) < 0.02 and float(nodes.std()) == pytest.approx(1.0, abs=0.03)
    # neighbours are strongly correlated, including across the date line (lon 15 -> lon 0)
    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    assert correlation(noise[..., 1], noise[..., 2]) > 0.6
    assert correlation(noise[..., N_LON - 1], noise[..., 0]) > 0.6
    # and far-apart points are not
    assert abs(correlation(noise[..., 0], noise[..., 8])) < 0.1


def test_ensemble_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="at least 2 members"):
        from_dict(ModelConfig, {"ensemble": {"noise_channels": 4, "members": 1}}).validate()
    with pytest.raises(ConfigError, match="crps_alpha"):
        from_dict(ModelConfig, {"ensemble": {"crps_alpha": 1.5}}).validate()


def test_crps_model_learns_a_known_spread() -> None:
    """Truth: x(t+1) = x(t) + 0.3 * eta, eta ~ N(0, 1) at every point. The CRPS-trained model's
    members must spread with a standard deviation near 0.3 around a mean tendency near 0."""
    sigma, members, batch = 0.3, 4, 8
    model = make_model(noise_length_points=1)
    loss = WeightedCRPSLoss(np.asarray(model.metadata.latitude), ["2m_temperature"],
                            [float("nan")], torch.ones(1),
                            LossConfig(area_weighting="cos"), alpha=0.95)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(2)

    def spread_and_mean() -> tuple[float, float]:
        with torch.no_grad():
            states = torch.randn(4, 1, 1, N_LAT, N_LON, generator=generator)
            draws = torch.stack([model(states, no_forcings(4)) for _ in range(16)])
            tendency = draws - states[:, 0]
            return float(tendency.std(dim=0).mean()), float(tendency.mean())

    before, _ = spread_and_mean()
    for _ in range(250):
        states = torch.randn(batch, 1, 1, N_LAT, N_LON, generator=generator)
        target = states[:, 0] + sigma * torch.randn(batch, 1, N_LAT, N_LON, generator=generator)
        prediction = model(states.repeat_interleave(members, 0), no_forcings(batch * members))
        value = loss(prediction.view(batch, members, 1, N_LAT, N_LON), target)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    after, mean = spread_and_mean()
    assert abs(before - sigma) > 0.1, before  # it did not start right
    assert after == pytest.approx(sigma, rel=0.25)
    assert abs(mean) < 0.1


# ------------------------------------------------------------ training (real store, Trainer)
@pytest.fixture(scope="module")
def store(ncep_file, tmp_path_factory: pytest.TempPathFactory):
    from weathermodel.data.config import PrepareConfig
    from weathermodel.data.prepare import prepare

    out = tmp_path_factory.mktemp("crps") / "ncep.zarr"
    return prepare(from_dict(PrepareConfig, {"sources": [{"path": str(ncep_file)}],
                                             "output": str(out), "end": "2013-02-28T18"}),
                   progress=False)


def train_config(store, run_dir, **model) -> "TrainConfig":
    from weathermodel.training.config import TrainConfig

    return from_dict(TrainConfig, {
        "data": {"store": str(store), "history": 2, "rollout": 2, "batch_size": 2,
                 "train": {"start": "2013-01-01", "end": "2013-02-20"},
                 "validation": {"start": "2013-02-21", "end": "2013-02-28"}},
        "model": {"kind": "transformer", "history": 2, **TINY, **model},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 3, "ema_decay": 0},
        "rollout_schedule": [{"from_step": 0, "rollout": 1}, {"from_step": 2, "rollout": 2}],
        "run_dir": str(run_dir), "checkpoint_every": 3, "log_every": 1, "val_every": 100,
        "val_batches": 1})


def test_crps_training_from_a_deterministic_model(store, tmp_path, monkeypatch) -> None:
    """A stochastic model fine-tuned from a deterministic one starts from its forecast (the
    noise weights start at zero), trains on the CRPS of its members, and is saved stochastic."""
    from weathermodel.data.dataset import WindowDataset
    from weathermodel.models.io import load_model
    from weathermodel.training.checkpoint import list_checkpoints
    from weathermodel.training.loop import Trainer

    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path / "cache"))
    Trainer(train_config(store, tmp_path / "deterministic"), progress=False).fit()
    deterministic_path = list_checkpoints(tmp_path / "deterministic")[-1][1]
    deterministic = load_model(deterministic_path)
    config = train_config(store, tmp_path / "crps")
    config.init_from = str(deterministic_path)
    config.model.ensemble.noise_channels, config.model.ensemble.members = 4, 3
    trainer = Trainer(config, progress=False)
    assert type(trainer.loss).__name__ == "WeightedCRPSLoss"
    sample = WindowDataset(store, history=2, rollout=1)[0]
    states, forcings = sample["inputs"][None], sample["forcings"][None]
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(states, forcings), deterministic(states, forcings))
    trainer.fit()
    stochastic = load_model(list_checkpoints(tmp_path / "crps")[-1][1])
    assert stochastic.is_stochastic and stochastic.config.ensemble.members == 3
    with torch.no_grad():
        first, second = stochastic(states, forcings), stochastic(states, forcings)
    assert float((first - second).abs().max()) > 0  # the noise weights learned something

    # forecast --members samples the model: no initial perturbation, reproducible by seed
    from weathermodel.inference.forecast import ForecastOptions, forecast

    model_path = list_checkpoints(tmp_path / "crps")[-1][1]

    def members(seed: int, name: str) -> np.ndarray:
        import xarray as xr

        out = forecast(ForecastOptions(
            checkpoint=str(model_path), data=str(store), init="2013-02-10T00/2013-02-11T00/12h",
            lead="12h", out=str(tmp_path / name), members=3, seed=seed, progress=False))
        with xr.open_zarr(out) as opened:
            return opened["2m_temperature"].transpose("number", ...).values

    torch.manual_seed(123)
    caller_state = torch.get_rng_state()
    once, again, other = members(0, "a.zarr"), members(0, "b.zarr"), members(1, "c.zarr")
    # the noise comes from the forecast's own generator: the caller's is left as it was
    assert torch.equal(torch.get_rng_state(), caller_state)
    np.testing.assert_array_equal(once, again)
    assert np.abs(once - other).max() > 0
    spread = once.std(axis=0)
    assert spread.min() > 0  # every member differs, the control included


def test_checkpoint_records_that_a_model_is_stochastic(tmp_path) -> None:
    from weathermodel.models.io import load_model, read_payload, save_model

    for noise, expected in ((4, True), (0, False)):
        path = save_model(make_model(noise_channels=noise), tmp_path / f"model{noise}.pt")
        assert read_payload(path)["stochastic"] is expected
        assert load_model(path).is_stochastic is expected

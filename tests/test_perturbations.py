"""Initial-condition perturbations: correlated random fields on the sphere (mean zero, target
variance, correlation length measured against great-circle distance on global regular, Gaussian
and regional grids), the same perturbation on every history state, member 0 the control,
forcing and diagnostic channels untouched, per-channel amplitudes, seeds, pairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weathermodel import conventions
from weathermodel.data.grid import gaussian_latitudes
from weathermodel.data.weights import cell_area_weights
from weathermodel.errors import ConfigError
from weathermodel.inference import forecast as forecast_module
from weathermodel.inference.forecast import ForecastOptions
from weathermodel.inference.perturbations import (PerturbationSettings, SphericalRandomField,
                                                  channel_amplitudes, great_circle_km,
                                                  normalised_legendre)
from weathermodel.models.io import load_model

PROJECT = Path(__file__).resolve().parents[1]
SPEEDY_CHECKPOINT = PROJECT / "checkpoints" / "speedy_transformer_2000" / "model.pt"

GRIDS = {  # name: (latitudes, longitudes, length scale km)
    "gaussian_t21": (gaussian_latitudes(32), np.arange(64) * 5.625, 1500.0),
    "regular_5deg": (np.arange(-90.0, 90.1, 5.0), np.arange(0.0, 360.0, 5.0), 1000.0),
    # the NCEP sample's North American window (2.5 degrees), longitudes -180..180
    "regional_2.5deg": (np.arange(15.0, 75.1, 2.5), np.arange(-160.0, -29.9, 2.5), 600.0),
}


def correlation_length(fields: np.ndarray, latitude: np.ndarray, longitude: np.ndarray,
                       scale_km: float, n_points: int = 150) -> float:
    """Distance (km) where the empirical correlation (over draws, between pairs of grid points,
    averaged in distance bins) falls to exp(-1/2), by linear interpolation between bins."""
    flat = fields.reshape(fields.shape[0], -1)
    flat = (flat - flat.mean(0)) / flat.std(0)
    lat, lon = (g.ravel() for g in np.meshgrid(latitude, longitude, indexing="ij"))
    chosen = np.random.default_rng(1).choice(lat.size, n_points, replace=False)
    correlation = (flat[:, chosen].T @ flat) / flat.shape[0]
    distance = great_circle_km(lat[chosen, None], lon[chosen, None], lat[None], lon[None])
    edges = np.arange(0.0, 3.0 * scale_km, scale_km / 8)
    bin_of = np.digitize(distance.ravel(), edges)
    centres, means = [], []
    for b in range(1, edges.size):
        inside = bin_of == b
        if inside.sum() > 20:
            centres.append(distance.ravel()[inside].mean())
            means.append(correlation.ravel()[inside].mean())
    centres, means = np.array(centres), np.array(means)
    below = np.nonzero(means < np.exp(-0.5))[0][0]
    return float(np.interp(np.exp(-0.5), [means[below], means[below - 1]],
                           [centres[below], centres[below - 1]]))


def test_legendre_functions_obey_the_addition_theorem() -> None:
    """sum_m |Y_lm|^2 = (2 l + 1) / (4 pi) at every latitude (orthonormal harmonics): the
    point variance of the fields is then exactly the one the spectrum sets."""
    latitude = np.concatenate([gaussian_latitudes(32), [-90.0, 0.0, 89.9, 90.0]])
    lmax = 60
    table = normalised_legendre(lmax, latitude)
    total = np.zeros((lmax + 1, latitude.size))
    for m, column in enumerate(table):
        total[m:] += (1.0 if m == 0 else 2.0) * column ** 2
    expected = (2 * np.arange(lmax + 1) + 1)[:, None] / (4 * np.pi)
    np.testing.assert_allclose(total, np.broadcast_to(expected, total.shape), rtol=1e-10)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_random_fields_have_mean_zero_unit_variance_and_the_length_scale(grid: str) -> None:
    latitude, longitude, length = GRIDS[grid]
    fields = SphericalRandomField(latitude, longitude, length).sample(
        600, np.random.default_rng(0))
    assert fields.shape == (600, latitude.size, longitude.size)
    weights = cell_area_weights(latitude, "edges")[:, None] / longitude.size / latitude.size
    # area-weighted mean of the per-point mean and variance over the draws
    assert abs(float(np.sum(weights * fields.mean(0)))) < 0.05
    assert float(np.sum(weights * fields.var(0))) == pytest.approx(1.0, abs=0.06)
    # homogeneous: every point near 1 (a variance of 600 draws is within +-0.25 at 4 sigma)
    assert fields.var(0).min() > 0.72 and fields.var(0).max() < 1.28
    measured = correlation_length(fields, latitude, longitude, length)
    assert measured == pytest.approx(length, rel=0.2), (grid, measured)
    # not white noise: neighbouring points are correlated
    neighbours = np.mean(fields[:, :, 1:] * fields[:, :, :-1]) / np.mean(fields ** 2)
    assert neighbours > 0.3


def test_the_length_scale_changes_the_correlation() -> None:
    latitude, longitude, _ = GRIDS["gaussian_t21"]
    rng = np.random.default_rng(3)
    short = correlation_length(SphericalRandomField(latitude, longitude, 900.0).sample(
        400, rng), latitude, longitude, 900.0)
    long = correlation_length(SphericalRandomField(latitude, longitude, 2500.0).sample(
        400, rng), latitude, longitude, 2500.0)
    assert short == pytest.approx(900.0, rel=0.2) and long == pytest.approx(2500.0, rel=0.2)


@pytest.fixture(scope="module")
def speedy_model():
    """The shipped global checkpoint: 24 prognostic channels, sst a forcing (NaN over land),
    precipitation a diagnostic, a 64 x 32 Gaussian grid, two history states."""
    return load_model(SPEEDY_CHECKPOINT).eval()


def _initial(model) -> np.ndarray:
    """A plausible initial window (history, C, lat, lon): the training means, sst NaN on the
    northern third (a land mask stand-in)."""
    metadata = model.metadata
    mean = np.asarray(metadata.mean, dtype=np.float32)
    shape = (model.history, len(mean), len(metadata.latitude), len(metadata.longitude))
    initial = np.broadcast_to(mean[None, :, None, None], shape).copy()
    initial[1] += 0.01 * np.asarray(metadata.std, dtype=np.float32)[:, None, None]
    sst = metadata.channels.index("sea_surface_temperature")
    initial[:, sst, -10:] = np.nan
    return initial


def _members(model, members: int, seed: int = 0, **options) -> np.ndarray:
    """The forecast's own initial members (member, history, C, lat, lon)."""
    forecast_options = ForecastOptions(checkpoint="", data="", init="", lead="", out="",
                                       members=members, seed=seed, **options)
    return forecast_module._initial_members(_initial(model), model, forecast_options, 0,
                                            torch.device("cpu")).numpy()


def test_forecast_members_share_one_perturbation_over_history_and_keep_roles(
        speedy_model) -> None:
    model, metadata = speedy_model, speedy_model.metadata
    initial = _initial(model)
    states = _members(model, 5, perturbation=0.5)
    assert states.shape == (5, *initial.shape)
    np.testing.assert_array_equal(states[0], initial)  # the control
    perturbation = states - initial[None]
    # the same perturbation on both history states: no fake tendency
    # (equal up to the float32 rounding of state + perturbation)
    largest = np.nanmax(np.abs(states), axis=(0, 1, 3, 4))
    rounding = 2 * np.spacing(largest)[None, :, None, None]
    assert np.all(np.abs(np.nan_to_num(perturbation[:, 0] - perturbation[:, 1])) <= rounding)
    untouched = metadata.role_index(conventions.FORCING, conventions.DIAGNOSTIC)
    assert len(untouched) == 2
    assert np.all(np.nan_to_num(perturbation[:, :, untouched]) == 0)
    sst = metadata.channels.index("sea_surface_temperature")
    assert np.array_equal(np.isnan(states[:, :, sst]), np.isnan(initial[None, :, sst]).repeat(
        5, 0))  # missing stays missing
    for channel in metadata.role_index(conventions.PROGNOSTIC):
        for member in range(1, 5):
            assert np.abs(perturbation[member, 0, channel]).max() > 0, (member, channel)


def test_per_channel_amplitude_is_a_fraction_of_the_reference_std(speedy_model) -> None:
    model, metadata = speedy_model, speedy_model.metadata
    members = 49
    for scale in ("tendency_std", "std"):
        states = _members(model, members, perturbation=0.3, perturbation_scale=scale)
        perturbation = (states[1:, 0] - states[0, 0]).astype(np.float64)
        weights = cell_area_weights(np.asarray(metadata.latitude), "edges")[:, None]
        variance = np.mean(weights * perturbation ** 2, axis=(0, 2, 3))
        reference = np.asarray(getattr(metadata, scale))
        for channel in metadata.role_index(conventions.PROGNOSTIC):
            assert np.sqrt(variance[channel]) == pytest.approx(0.3 * reference[channel],
                                                               rel=0.1), (scale, channel)
            ensemble_mean = np.sum(weights * perturbation[:, channel].mean(0)) / np.sum(
                weights * np.ones_like(perturbation[0, channel]))
            assert abs(ensemble_mean) < 0.1 * 0.3 * reference[channel]
    amplitudes = channel_amplitudes(metadata, PerturbationSettings(
        amplitude=0.2, channel_factors={"specific_humidity": 0.5, "temperature_850": 0.0}))
    channel = metadata.channels.index
    assert amplitudes[channel("specific_humidity_700")] == pytest.approx(
        0.1 * metadata.tendency_std[channel("specific_humidity_700")])
    assert amplitudes[channel("temperature_850")] == 0
    assert amplitudes[channel("sea_surface_temperature")] == 0
    with pytest.raises(ConfigError, match="neither"):
        channel_amplitudes(metadata, PerturbationSettings(channel_factors={"vorticity": 1.0}))


def test_perturbations_are_reproducible_and_pairs_are_symmetric(speedy_model) -> None:
    model = speedy_model
    first, again = _members(model, 4, seed=7), _members(model, 4, seed=7)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[1:], _members(model, 4, seed=8)[1:])
    pairs = _members(model, 5, perturbation_symmetric=True)
    initial = _initial(model)[None]
    difference = np.nan_to_num(pairs - initial)
    np.testing.assert_allclose(difference[1], -difference[2], atol=1e-3)
    np.testing.assert_allclose(difference[3], -difference[4], atol=1e-3)
    assert np.abs(difference[1] - difference[3]).max() > 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="length scale"):
        PerturbationSettings(length_scale_km=-5)
    with pytest.raises(ConfigError, match="amplitude"):
        PerturbationSettings(amplitude=float("nan"))
    with pytest.raises(ConfigError, match="scale"):
        PerturbationSettings(scale="variance")
    with pytest.raises(ConfigError, match="larger length scale"):
        SphericalRandomField(np.linspace(-89.9, 89.9, 721), np.arange(1440) * 0.25, 5.0)

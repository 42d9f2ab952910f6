"""Evaluation: every score equals an independent brute-force computation (loops over grid
points, init times and members), RMSE/MAE/MSE/bias/CRPS also equal the `scores` package, the
WeatherBench 2 latitude weights equal their defining formula, baselines and climatology have
the WB2 layout, and a large lazy forecast is scored chunk by chunk."""
from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scores
import xarray as xr
from scipy.stats import norm

from weathermodel.evaluation import (acc, align, bias, climatology_forecast,
                                     compute_climatology, crps, ensemble_mean_rmse,
                                     latitude_weights, mae, make_climatology, mse,
                                     persistence_forecast, rank_histogram, region_mask,
                                     resolve_weighting, rmse, rmse_sqrt_before_time_avg,
                                     score_table, spread, spread_skill_ratio, truth_dataset,
                                     zonal_energy_spectrum)
from weathermodel.evaluation.evaluate import evaluate
from weathermodel.evaluation.layout import rank_histograms
from weathermodel.errors import ConfigError

pytestmark = [pytest.mark.filterwarnings("ignore:weighting='wb2_edges' on a grid"),
              pytest.mark.filterwarnings("ignore:The data type .* does not have a Zarr V3")]

RTOL = 1e-6
VARIABLE = "temperature"
INITS = pd.date_range("2020-02-27", periods=6, freq="6h")  # valid times cross 29 February
LEADS = pd.to_timedelta(["6h", "12h", "24h"]).values
TRUTH_TIMES = pd.date_range("2020-02-27", periods=10, freq="6h")
LATITUDE = np.array([-80.0, -55.0, -20.0, 0.0, 10.0, 35.0, 62.0, 85.0])  # irregular spacing
LONGITUDE = np.arange(0.0, 360.0, 45.0)
LEVELS = np.array([500.0, 850.0])
MEMBERS = 4
NCEP_LATITUDE = np.arange(15.0, 75.1, 2.5)


# --------------------------------------------------------------------------------------------
# brute force, written independently of the package
# --------------------------------------------------------------------------------------------
def brute_weights(latitude: np.ndarray) -> np.ndarray:
    """WB2 get_lat_weights, one row at a time: edges at midpoints, outer edges at the poles."""
    order = np.argsort(latitude)
    lat = latitude[order]
    weights = []
    for i in range(lat.size):
        lower = -90.0 if i == 0 else (lat[i - 1] + lat[i]) / 2
        upper = 90.0 if i == lat.size - 1 else (lat[i] + lat[i + 1]) / 2
        weights.append(math.sin(math.radians(upper)) - math.sin(math.radians(lower)))
    weights = np.array(weights) / np.mean(weights)
    out = np.empty_like(weights)
    out[order] = weights
    return out


def brute_mask(latitude, longitude, box) -> np.ndarray:
    lat_min, lat_max, lon_min, lon_max = box
    mask = np.zeros((len(latitude), len(longitude)))
    for i, lat in enumerate(latitude):
        for j, lon in enumerate(longitude):
            span = (lon_max - lon_min) % 360 if lon_max - lon_min < 360 else 360
            mask[i, j] = lat_min <= lat <= lat_max and (lon - lon_min) % 360 <= span
    return mask


def brute_area_mean(field: np.ndarray, weights: np.ndarray, mask=None) -> float:
    numerator = denominator = 0.0
    for i in range(field.shape[0]):
        for j in range(field.shape[1]):
            w = weights[i] * (1.0 if mask is None else mask[i, j])
            numerator += w * field[i, j]
            denominator += w
    return numerator / denominator


def brute_crps(members: np.ndarray, y: float) -> float:
    m = members.size
    skill = sum(abs(x - y) for x in members) / m
    pairs = sum(abs(a - b) for a in members for b in members)
    return skill - pairs / (2 * m * (m - 1))


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic() -> dict:
    rng = np.random.default_rng(42)
    shape = (INITS.size, MEMBERS, LEADS.size, LEVELS.size, LATITUDE.size, LONGITUDE.size)
    ensemble = 250.0 + rng.normal(size=shape)
    truth_values = 250.0 + rng.normal(size=(TRUTH_TIMES.size, *shape[3:]))
    climatology_values = 250.0 + 0.5 * rng.normal(size=(366, 4, *shape[3:]))
    grid = {"level": LEVELS, "latitude": LATITUDE, "longitude": LONGITUDE}
    forecast = xr.Dataset({VARIABLE: (("time", "number", "prediction_timedelta", "level",
                                       "latitude", "longitude"), ensemble)},
                          coords={"time": INITS, "number": np.arange(MEMBERS),
                                  "prediction_timedelta": LEADS, **grid})
    truth = xr.Dataset({VARIABLE: (("time", "level", "latitude", "longitude"), truth_values,
                                   {"units": "K"})}, coords={"time": TRUTH_TIMES, **grid})
    climatology = xr.Dataset(
        {VARIABLE: (("dayofyear", "hour", "level", "latitude", "longitude"),
                    climatology_values)},
        coords={"dayofyear": np.arange(1, 367), "hour": [0, 6, 12, 18], **grid})
    return {"ensemble": ensemble, "truth": truth_values, "climatology": climatology_values,
            "forecast": forecast, "truth_ds": truth, "climatology_ds": climatology}


def truth_at(data: dict, t: int, lead: int) -> np.ndarray:
    valid = INITS[t] + pd.Timedelta(LEADS[lead])
    return data["truth"][list(TRUTH_TIMES).index(valid)]


def climatology_at_valid(data: dict, t: int, lead: int) -> np.ndarray:
    valid = INITS[t] + pd.Timedelta(LEADS[lead])
    return data["climatology"][valid.day_of_year - 1, valid.hour // 6]


def brute_score(data: dict, per_point, per_time=lambda x: x, after=lambda x: x,
                mask=None) -> np.ndarray:
    """(lead, level): after(mean_t per_time(area_mean(per_point(forecast, truth))))."""
    weights = brute_weights(LATITUDE)
    out = np.zeros((LEADS.size, LEVELS.size))
    for lead in range(LEADS.size):
        for k in range(LEVELS.size):
            values = []
            for t in range(INITS.size):
                field = per_point(data["ensemble"][t, :, lead, k], truth_at(data, t, lead)[k])
                values.append(per_time(brute_area_mean(field, weights, mask)))
            out[lead, k] = after(sum(values) / len(values))
    return out


def deterministic(data: dict) -> tuple[xr.Dataset, xr.Dataset]:
    aligned = align(data["forecast"].isel(number=0, drop=True), data["truth_ds"])
    return aligned.forecast, aligned.truth


def first_member(per_point):
    return lambda members, truth: per_point(members[0], truth)


# --------------------------------------------------------------------------------------------
# latitude weights and regions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("latitude", [
    np.linspace(-90.0, 90.0, 121),            # 1.5 degree grid with both poles
    np.arange(-89.5, 90.0, 1.0),              # cell-centred global grid
    np.linspace(90.0, -90.0, 73),             # descending
    LATITUDE,                                 # irregular
    NCEP_LATITUDE,                            # regional
])
def test_wb2_edge_weights_equal_the_defining_formula(latitude: np.ndarray) -> None:
    np.testing.assert_allclose(latitude_weights(latitude, "wb2_edges"), brute_weights(latitude),
                               rtol=1e-12)


def test_wb2_weights_on_the_regional_ncep_grid_differ_much_from_cos() -> None:
    """On the NCEP grid (15..75 N every 2.5 degrees) WB2's weights (outer edges at the poles)
    give the 15 N row 11.14 times its cos(lat) weight and 64 % of the total weight (cos: 5.7 %),
    the 75 N row 1.30 times, and every inner row 0.367 times its cos(lat) weight (both
    normalised to mean 1). ``weighting="edges"`` equals cos(lat) exactly on this grid."""
    wb2 = latitude_weights(NCEP_LATITUDE, "wb2_edges")
    cos = latitude_weights(NCEP_LATITUDE, "cos")
    ratio = wb2 / cos
    assert ratio[0] == pytest.approx(11.140, abs=1e-3)
    assert ratio[-1] == pytest.approx(1.298, abs=1e-3)
    np.testing.assert_allclose(ratio[1:-1], 0.36683, atol=1e-5)
    assert wb2[0] / wb2.sum() == pytest.approx(0.640, abs=1e-3)
    assert cos[0] / cos.sum() == pytest.approx(0.0574, abs=1e-3)
    np.testing.assert_allclose(latitude_weights(NCEP_LATITUDE, "edges"), cos, rtol=1e-12)
    with pytest.warns(UserWarning, match="does not reach the poles"):
        latitude_weights(NCEP_LATITUDE, "wb2_edges")


def test_auto_weighting_is_wb2_on_global_grids_and_edges_on_regional_ones() -> None:
    for global_latitude in (np.linspace(-90.0, 90.0, 121), np.arange(-89.5, 90.0, 1.0)):
        assert resolve_weighting("auto", global_latitude) == "wb2_edges"
        np.testing.assert_array_equal(latitude_weights(global_latitude),
                                      latitude_weights(global_latitude, "wb2_edges"))
    assert resolve_weighting("auto", NCEP_LATITUDE) == "edges"
    np.testing.assert_array_equal(latitude_weights(NCEP_LATITUDE),
                                  latitude_weights(NCEP_LATITUDE, "edges"))
    assert resolve_weighting("cos", NCEP_LATITUDE) == "cos"
    with pytest.raises(ConfigError, match="unknown weighting"):
        resolve_weighting("area", NCEP_LATITUDE)


@pytest.mark.parametrize("box", [(25.0, 60.0, -120.0, -75.0), (25.0, 60.0, 240.0, 285.0),
                                 (35.0, 75.0, -12.5, 42.5), (-50.0, 50.0, 300.0, 60.0)])
def test_region_masks_in_both_longitude_conventions(box) -> None:
    lon360 = np.arange(0.0, 360.0, 7.5)
    lon180 = np.where(lon360 >= 180.0, lon360 - 360.0, lon360)
    lat = np.arange(-90.0, 90.1, 5.0)
    expected = brute_mask(lat, lon360, box)
    np.testing.assert_array_equal(region_mask(lat, lon360, box), expected)
    np.testing.assert_array_equal(region_mask(lat, lon180, box), expected)
    assert expected.sum() > 0


# --------------------------------------------------------------------------------------------
# scores against brute force and the `scores` package
# --------------------------------------------------------------------------------------------
DETERMINISTIC = {
    "mse": (mse, first_member(lambda f, y: (f - y) ** 2), lambda x: x, lambda x: x),
    "rmse": (rmse, first_member(lambda f, y: (f - y) ** 2), lambda x: x, math.sqrt),
    "rmse_sqrt_before_time_avg": (rmse_sqrt_before_time_avg,
                                  first_member(lambda f, y: (f - y) ** 2), math.sqrt,
                                  lambda x: x),
    "mae": (mae, first_member(lambda f, y: np.abs(f - y)), lambda x: x, lambda x: x),
    "bias": (bias, first_member(lambda f, y: f - y), lambda x: x, lambda x: x),
}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_scores_equal_brute_force(synthetic: dict, name: str) -> None:
    function, per_point, per_time, after = DETERMINISTIC[name]
    forecast, truth = deterministic(synthetic)
    result = function(forecast, truth).compute()
    assert result[VARIABLE].dims == ("prediction_timedelta", "level")
    expected = brute_score(synthetic, per_point, per_time, after)
    np.testing.assert_allclose(result[VARIABLE].values, expected, rtol=RTOL)
    np.testing.assert_array_equal(result["n_pairs"].values, INITS.size)


def test_scores_equal_the_scores_package(synthetic: dict) -> None:
    forecast, truth = deterministic(synthetic)
    fcst, obs = forecast[VARIABLE], truth[VARIABLE].drop_vars("valid_pair")
    weights = xr.DataArray(brute_weights(LATITUDE), dims="latitude",
                           coords={"latitude": LATITUDE})
    everything = ["time", "latitude", "longitude"]
    space = ["latitude", "longitude"]
    pairs = {
        "mse": scores.continuous.mse(fcst, obs, reduce_dims=everything, weights=weights),
        "mae": scores.continuous.mae(fcst, obs, reduce_dims=everything, weights=weights),
        "bias": scores.continuous.additive_bias(fcst, obs, reduce_dims=everything,
                                                weights=weights),
        "rmse": np.sqrt(scores.continuous.mse(fcst, obs, reduce_dims=space,
                                              weights=weights).mean("time")),
        "rmse_sqrt_before_time_avg": scores.continuous.rmse(
            fcst, obs, reduce_dims=space, weights=weights).mean("time"),
    }
    for name, reference in pairs.items():
        mine = DETERMINISTIC[name][0](forecast, truth).compute()[VARIABLE]
        np.testing.assert_allclose(mine.values, reference.transpose(*mine.dims).values,
                                   rtol=RTOL, err_msg=name)
    aligned = align(synthetic["forecast"], synthetic["truth_ds"])
    reference = scores.probability.crps_for_ensemble(
        aligned.forecast[VARIABLE], aligned.truth[VARIABLE].drop_vars("valid_pair"), "number",
        method="fair", reduce_dims=everything, weights=weights)
    mine = crps(aligned.forecast, aligned.truth).compute()[VARIABLE]
    np.testing.assert_allclose(mine.values, reference.transpose(*mine.dims).values, rtol=RTOL)


def test_acc_equals_brute_force(synthetic: dict) -> None:
    forecast, truth = deterministic(synthetic)
    result = acc(forecast, truth, synthetic["climatology_ds"]).compute()[VARIABLE]
    weights = brute_weights(LATITUDE)
    expected = np.zeros((LEADS.size, LEVELS.size))
    for lead in range(LEADS.size):
        for k in range(LEVELS.size):
            values = []
            for t in range(INITS.size):
                c = climatology_at_valid(synthetic, t, lead)[k]
                fa = synthetic["ensemble"][t, 0, lead, k] - c
                ta = truth_at(synthetic, t, lead)[k] - c
                values.append(brute_area_mean(fa * ta, weights) / math.sqrt(
                    brute_area_mean(fa * fa, weights) * brute_area_mean(ta * ta, weights)))
            expected[lead, k] = np.mean(values)
    np.testing.assert_allclose(result.values, expected, rtol=RTOL)


def test_ensemble_scores_equal_brute_force(synthetic: dict) -> None:
    aligned = align(synthetic["forecast"], synthetic["truth_ds"])
    f, y = aligned.forecast, aligned.truth

    def pointwise_crps(members, truth):
        out = np.zeros(truth.shape)
        for i, j in np.ndindex(truth.shape):
            out[i, j] = brute_crps(members[:, i, j], truth[i, j])
        return out

    def ens_mean_se(members, truth):
        return (members.mean(axis=0) - truth) ** 2

    def variance(members, truth):
        return ((members - members.mean(axis=0)) ** 2).sum(axis=0) / (members.shape[0] - 1)

    expected_crps = brute_score(synthetic, pointwise_crps)
    expected_rmse = brute_score(synthetic, ens_mean_se, after=math.sqrt)
    expected_spread = brute_score(synthetic, variance, after=math.sqrt)
    np.testing.assert_allclose(crps(f, y).compute()[VARIABLE].values, expected_crps, rtol=RTOL)
    np.testing.assert_allclose(ensemble_mean_rmse(f, y).compute()[VARIABLE].values,
                               expected_rmse, rtol=RTOL)
    np.testing.assert_allclose(spread(f, y).compute()[VARIABLE].values, expected_spread,
                               rtol=RTOL)
    np.testing.assert_allclose(spread_skill_ratio(f, y).compute()[VARIABLE].values,
                               expected_spread / expected_rmse, rtol=RTOL)
    # the same with dask chunks of one member (as forecast stores hold them)
    lazy = crps(f.chunk({"time": 1, "number": 1}), y.chunk({"time": 1}))
    np.testing.assert_allclose(lazy.compute()[VARIABLE].values, expected_crps, rtol=RTOL)


def test_regional_scores_equal_brute_force(synthetic: dict) -> None:
    boxes = {"north_america": (25.0, 60.0, -120.0, -75.0), "europe": (35.0, 75.0, -12.5, 42.5),
             "across_meridian": (-50.0, 50.0, 300.0, 60.0)}
    forecast, truth = deterministic(synthetic)
    result = rmse(forecast, truth, regions=boxes).compute()[VARIABLE]
    assert result.dims == ("region", "prediction_timedelta", "level")
    for name, box in boxes.items():
        expected = brute_score(synthetic, first_member(lambda f, y: (f - y) ** 2),
                               after=math.sqrt, mask=brute_mask(LATITUDE, LONGITUDE, box))
        np.testing.assert_allclose(result.sel(region=name).values, expected, rtol=RTOL)
    named = rmse(forecast, truth, regions=["global", "tropics"]).compute()[VARIABLE]
    np.testing.assert_allclose(named.sel(region="global").values,
                               rmse(forecast, truth).compute()[VARIABLE].values, rtol=1e-12)


def test_perfect_forecast_scores_rmse_zero_and_acc_one(synthetic: dict) -> None:
    forecast, truth = deterministic(synthetic)
    perfect = truth.drop_vars("valid_pair")
    assert float(np.abs(rmse(perfect, truth).compute()[VARIABLE]).max()) == 0.0
    np.testing.assert_allclose(
        acc(perfect, truth, synthetic["climatology_ds"]).compute()[VARIABLE].values, 1.0,
        rtol=1e-12)


def test_fair_crps_of_a_large_gaussian_ensemble_is_the_analytic_crps() -> None:
    rng = np.random.default_rng(0)
    mu, sigma, members = 3.0, 2.0, 2000
    observations = np.array([-2.0, 0.5, 3.0, 4.0, 9.0])
    z = (observations - mu) / sigma
    analytic = sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))
    for index, y in enumerate(observations):
        ensemble = mu + sigma * rng.standard_normal((1, members, 1, 1, 1))
        forecast = xr.DataArray(ensemble, dims=("time", "number", "prediction_timedelta",
                                                "latitude", "longitude"),
                                coords={"latitude": [0.0], "longitude": [0.0]}, name="x")
        truth = xr.DataArray(np.full((1, 1, 1, 1), y), name="x",
                             dims=("time", "prediction_timedelta", "latitude", "longitude"),
                             coords={"latitude": [0.0], "longitude": [0.0]})
        value = float(crps(forecast, truth).compute()["x"].squeeze())
        assert value == pytest.approx(analytic[index], rel=0.03, abs=0.02), y


def test_spread_skill_ratio_of_a_consistent_ensemble_is_one() -> None:
    """Members and truth drawn from the same distribution: the ratio is sqrt(M / (M + 1))
    (WB2's definition, no finite-size correction), and 1 with the correction."""
    rng = np.random.default_rng(1)
    members, shape = 10, (60, 1, 16, 32)
    centre = rng.normal(scale=5.0, size=shape)
    ensemble = centre[:, None] + rng.normal(size=(shape[0], members, *shape[1:]))
    dims = ("time", "prediction_timedelta", "latitude", "longitude")
    coords = {"latitude": np.linspace(-60, 60, 16), "longitude": np.arange(32) * 11.25}
    forecast = xr.DataArray(ensemble, dims=(dims[0], "number", *dims[1:]), coords=coords,
                            name="x")
    truth = xr.DataArray(centre + rng.normal(size=shape), dims=dims, coords=coords, name="x")
    ratio = spread_skill_ratio(forecast, truth).compute()["x"].item()
    corrected = spread_skill_ratio(forecast, truth, finite_ensemble_correction=True
                                   ).compute()["x"].item()
    assert ratio == pytest.approx(math.sqrt(members / (members + 1)), abs=0.02)
    assert corrected == pytest.approx(1.0, abs=0.02)
    under = xr.DataArray(centre[:, None] + 0.5 * (ensemble - centre[:, None]),
                         dims=forecast.dims, coords=coords, name="x")
    assert spread_skill_ratio(under, truth).compute()["x"].item() < 0.6  # underdispersive


def test_rank_histogram_equals_a_brute_force_loop(synthetic: dict) -> None:
    """Every bin = time mean of the area-weighted fraction of points where exactly k members
    lie below the truth (continuous data: no ties), globally, in regions and lazily."""
    aligned = align(synthetic["forecast"], synthetic["truth_ds"])
    f, y = aligned.forecast, aligned.truth
    box = (25.0, 60.0, -120.0, -75.0)

    def in_bin(k):
        def one_hot(members, truth):
            out = np.zeros(truth.shape)
            for i, j in np.ndindex(truth.shape):
                out[i, j] = sum(1 for x in members[:, i, j] if x < truth[i, j]) == k
            return out
        return one_hot

    expected = np.stack([brute_score(synthetic, in_bin(k)) for k in range(MEMBERS + 1)], -1)
    in_box = np.stack([brute_score(synthetic, in_bin(k), mask=brute_mask(LATITUDE, LONGITUDE,
                                                                           box))
                       for k in range(MEMBERS + 1)], -1)
    result = rank_histogram(f, y).compute()[VARIABLE]
    assert result.dims == ("prediction_timedelta", "level", "rank")
    np.testing.assert_array_equal(result["rank"].values, np.arange(MEMBERS + 1))
    np.testing.assert_allclose(result.values, expected, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(result.sum("rank").values, 1.0, rtol=1e-12)
    regional = rank_histogram(f, y, regions={"box": box}).compute()[VARIABLE]
    np.testing.assert_allclose(regional.sel(region="box").values, in_box, rtol=RTOL,
                               atol=1e-12)
    lazy = rank_histogram(f.chunk({"time": 1, "number": 1}), y.chunk({"time": 1}))
    np.testing.assert_allclose(lazy.compute()[VARIABLE].values, expected, rtol=RTOL,
                               atol=1e-12)


def exchangeable_ensemble(members: int, spread_factor: float, seed: int = 1,
                          shape=(60, 1, 16, 32)) -> tuple[xr.DataArray, xr.DataArray]:
    """Truth and members around a common centre: truth deviations N(0, 1), member deviations
    N(0, spread_factor^2) (1: calibrated; < 1: under-dispersive)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(scale=5.0, size=shape)
    ensemble = centre[:, None] + spread_factor * rng.normal(size=(shape[0], members,
                                                                  *shape[1:]))
    dims = ("time", "prediction_timedelta", "latitude", "longitude")
    coords = {"latitude": np.linspace(-60, 60, shape[2]),
              "longitude": np.arange(shape[3]) * 360.0 / shape[3]}
    forecast = xr.DataArray(ensemble, dims=(dims[0], "number", *dims[1:]), coords=coords,
                            name="x")
    truth = xr.DataArray(centre + rng.normal(size=shape), dims=dims, coords=coords, name="x")
    return forecast, truth


def rank_frequency_tolerance(truth: xr.DataArray, bins: int) -> float:
    """5 standard errors of one bin's area-weighted frequency for independent points."""
    weights = np.broadcast_to(latitude_weights(truth["latitude"].values)[:, None],
                              (truth.sizes["latitude"], truth.sizes["longitude"]))
    effective = truth.sizes["time"] * weights.sum() ** 2 / (weights ** 2).sum()
    p = 1.0 / bins
    return 5.0 * math.sqrt(p * (1 - p) / effective)


def test_rank_histogram_is_flat_when_calibrated_and_u_shaped_when_under_dispersive() -> None:
    members = 10
    forecast, truth = exchangeable_ensemble(members, 1.0)
    flat = rank_histogram(forecast, truth).compute()["x"].squeeze().values
    tolerance = rank_frequency_tolerance(truth, members + 1)
    np.testing.assert_allclose(flat, 1.0 / (members + 1), atol=tolerance)
    skill = ensemble_mean_rmse(forecast, truth).compute()["x"].item()
    corrected_spread = spread(forecast, truth, finite_ensemble_correction=True
                              ).compute()["x"].item()
    assert corrected_spread / skill == pytest.approx(1.0, abs=0.02)
    assert spread(forecast, truth).compute()["x"].item() == pytest.approx(
        corrected_spread * math.sqrt(members / (members + 1)), rel=1e-12)
    under, truth = exchangeable_ensemble(members, 0.5)
    u_shape = rank_histogram(under, truth).compute()["x"].squeeze().values
    assert u_shape[0] > 2.5 / (members + 1) and u_shape[-1] > 2.5 / (members + 1)
    assert (u_shape[2:-2] < 0.8 / (members + 1)).all()
    assert (np.diff(u_shape[:3]) < 0).all() and (np.diff(u_shape[-3:]) > 0).all()
    assert spread_skill_ratio(under, truth, finite_ensemble_correction=True
                              ).compute()["x"].item() < 0.6


def test_rank_histogram_breaks_ties_at_random_with_a_fixed_seed() -> None:
    """Truth and members from one distribution with an atom at 0 (as dry precipitation):
    with ties broken at random the histogram stays flat, and it is the same at every call;
    counting only the members below would put every tie in the lowest bin."""
    members = 6
    forecast, truth = exchangeable_ensemble(members, 1.0, seed=3)
    forecast, truth = forecast.clip(min=0.0), truth.clip(min=0.0)
    assert float((truth == 0).mean()) > 0.3
    histogram = rank_histogram(forecast, truth).compute()["x"].squeeze().values
    np.testing.assert_allclose(histogram, 1.0 / (members + 1),
                               atol=rank_frequency_tolerance(truth, members + 1))
    again = rank_histogram(forecast.chunk({"time": 7}), truth.chunk({"time": 7}))
    np.testing.assert_array_equal(rank_histogram(forecast, truth).compute()["x"].values,
                                  rank_histogram(forecast, truth).compute()["x"].values)
    other_seed = rank_histogram(forecast, truth, seed=1).compute()["x"].squeeze().values
    assert not np.array_equal(other_seed, histogram)
    np.testing.assert_allclose(again.compute()["x"].squeeze().values.sum(), 1.0, rtol=1e-12)


def test_zonal_energy_spectrum_equals_a_brute_force_dft() -> None:
    rng = np.random.default_rng(3)
    lon = np.arange(0.0, 360.0, 360.0 / 15)  # odd L: no Nyquist term
    lat = np.array([-30.0, 0.0, 45.0])
    values = rng.normal(size=(4, lat.size, lon.size))
    data = xr.DataArray(values, dims=("time", "latitude", "longitude"),
                        coords={"latitude": lat, "longitude": lon}, name="u",
                        attrs={"units": "m s-1"})
    result = zonal_energy_spectrum(data)["u"]
    radius = 1000.0 * (6357.0 + 6378.0) / 2.0
    n = lon.size
    for i, latitude in enumerate(lat):
        circumference = 2 * math.pi * radius * math.cos(math.radians(latitude))
        for k in range(n // 2 + 1):
            power = 0.0
            for t in range(values.shape[0]):
                coefficient = sum(values[t, i, m] * complex(math.cos(2 * math.pi * k * m / n),
                                                            -math.sin(2 * math.pi * k * m / n))
                                  for m in range(n)) / n
                power += (1 if k == 0 else 2) * circumference * abs(coefficient) ** 2
            assert float(result[i, k]) == pytest.approx(power / values.shape[0], rel=RTOL)
        # Parseval: the spectrum sums to the line integral of the square
        spacing = circumference / n
        assert float(result[i].sum()) == pytest.approx(
            spacing * (values[:, i] ** 2).sum(axis=-1).mean(), rel=RTOL)
    assert result.attrs["units"] == "m (m s-1)2"


# --------------------------------------------------------------------------------------------
# alignment, baselines, climatology
# --------------------------------------------------------------------------------------------
def test_missing_truth_time_drops_and_counts_its_pairs(synthetic: dict, caplog) -> None:
    missing = TRUTH_TIMES[5]
    truth = synthetic["truth_ds"].drop_sel(time=missing)
    forecast = synthetic["forecast"].isel(number=0, drop=True)
    aligned = align(forecast, truth)
    valid = INITS.values[:, None] + LEADS[None, :]
    expected_missing = int((valid == missing.to_datetime64()).sum())
    assert expected_missing == 3 and aligned.n_missing == expected_missing
    np.testing.assert_array_equal(aligned.n_pairs.values,
                                  INITS.size - (valid == missing.to_datetime64()).sum(axis=0))
    assert "3 (init, lead) pairs have no truth" in caplog.text
    result = mse(aligned.forecast, aligned.truth).compute()
    np.testing.assert_array_equal(result["n_pairs"].values, aligned.n_pairs.values)
    weights = brute_weights(LATITUDE)
    for lead in range(LEADS.size):
        values = [brute_area_mean((synthetic["ensemble"][t, 0, lead, 0]
                                   - truth_at(synthetic, t, lead)[0]) ** 2, weights)
                  for t in range(INITS.size) if valid[t, lead] != missing.to_datetime64()]
        assert float(result[VARIABLE][lead, 0]) == pytest.approx(np.mean(values), rel=RTOL)
    # a forecast valid entirely beyond the truth: its init times are dropped as well
    late = forecast.assign_coords(time=INITS + pd.Timedelta("30D"))
    with pytest.raises(Exception, match="no valid time"):
        align(late, truth)


def ncep_truth(ncep_file: Path) -> xr.Dataset:
    air = xr.open_dataset(ncep_file)["air"].astype("float64")
    air = air.rename(lat="latitude", lon="longitude").sortby("latitude")
    return xr.Dataset({"2m_temperature": air.assign_attrs(units="K")})


def brute_persistence(truth: xr.Dataset, steps: int, inits: pd.DatetimeIndex) -> dict:
    values = truth["2m_temperature"].values
    times = list(pd.DatetimeIndex(truth["time"].values))
    weights = brute_weights(truth["latitude"].values)
    per_time = {"mse": [], "mae": [], "bias": []}
    for init in inits:
        i = times.index(init)
        if i + steps >= len(times):
            continue
        error = values[i] - values[i + steps]
        per_time["mse"].append(brute_area_mean(error ** 2, weights))
        per_time["mae"].append(brute_area_mean(np.abs(error), weights))
        per_time["bias"].append(brute_area_mean(error, weights))
    result = {k: float(np.mean(v)) for k, v in per_time.items()}
    result["rmse"] = math.sqrt(result["mse"])
    result["n_pairs"] = len(per_time["mse"])
    return result


def test_persistence_on_real_ncep_data_equals_brute_force(ncep_file: Path) -> None:
    truth = ncep_truth(ncep_file)
    inits = pd.DatetimeIndex(truth["time"].sel(time=slice("2013-10-01", "2013-12-31")).values)
    leads = pd.to_timedelta(["6h", "24h"]).values
    forecast = persistence_forecast(truth, inits, leads)
    assert forecast["2m_temperature"].dims == ("time", "prediction_timedelta", "latitude",
                                               "longitude")
    np.testing.assert_array_equal(forecast["valid_time"].values,
                                  inits.values[:, None] + leads[None, :])
    aligned = align(forecast, truth)
    for lead, steps in zip(leads, (1, 4)):
        expected = brute_persistence(truth, steps, inits)
        for name, function in (("rmse", rmse), ("mse", mse), ("mae", mae), ("bias", bias)):
            value = function(aligned.forecast, aligned.truth,
                             weighting="wb2_edges").compute()["2m_temperature"]
            assert float(value.sel(prediction_timedelta=lead)) == pytest.approx(
                expected[name], rel=RTOL), name
        assert int(aligned.n_pairs.sel(prediction_timedelta=lead)) == expected["n_pairs"]
    assert aligned.n_pairs.values.tolist() == [367, 364]  # valid times in 2014 are missing


def test_climatology_layout_and_known_values() -> None:
    rng = np.random.default_rng(5)
    times = pd.date_range("2010-01-01", "2012-12-31T12", freq="12h")  # 2012 is a leap year
    lat, lon = np.array([-10.0, 10.0]), np.array([0.0, 90.0, 180.0])
    truth = xr.Dataset({"t": (("time", "level", "latitude", "longitude"),
                              rng.normal(size=(times.size, 2, lat.size, lon.size)),
                              {"units": "K"})},
                       coords={"time": times, "level": [500.0, 850.0], "latitude": lat,
                               "longitude": lon})
    climatology = compute_climatology(truth.chunk({"time": 10}))["t"].compute()
    assert climatology.dims == ("dayofyear", "hour", "level", "latitude", "longitude")
    assert climatology.shape == (366, 2, 2, 2, 3)
    days = pd.DatetimeIndex(times)
    for day, hour in ((45, 12), (1, 0), (200, 12), (366, 0)):
        chosen = (days.day_of_year == day) & (days.hour == hour)
        expected = truth["t"].values[chosen].mean(axis=0)
        assert chosen.sum() == (1 if day == 366 else 3)
        np.testing.assert_allclose(climatology.sel(dayofyear=day, hour=hour).values, expected,
                                   rtol=1e-12)
    # without a leap year, day 366 repeats day 365 (WB2)
    common = compute_climatology(truth.sel(time=slice("2010", "2011")))["t"]
    np.testing.assert_array_equal(common.sel(dayofyear=366).values,
                                  common.sel(dayofyear=365).values)
    # smoothing: WB2's triangular window, periodic over the 366 days
    window = 5
    smooth = compute_climatology(truth, window_days=window)["t"].values
    raw = climatology.values
    weights = [0.0, 0.5, 1.0, 0.5, 0.0]
    for day in (0, 100, 365):
        expected = sum(w * raw[(day + shift) % 366] for w, shift in zip(weights, range(-2, 3)))
        np.testing.assert_allclose(smooth[day], expected / sum(weights), rtol=1e-12)


def test_climatology_of_real_ncep_data(ncep_file: Path) -> None:
    truth = ncep_truth(ncep_file)
    climatology = compute_climatology(truth)["2m_temperature"]
    assert climatology.shape == (366, 4, 25, 53)
    np.testing.assert_array_equal(climatology.sel(dayofyear=50, hour=12).values,
                                  truth["2m_temperature"].sel(time="2013-02-19T12").values)
    inits = pd.date_range("2013-12-31T12", periods=2, freq="6h")
    forecast = climatology_forecast(compute_climatology(truth), inits,
                                    pd.to_timedelta(["6h", "12h"]).values)
    np.testing.assert_array_equal(  # 2014-01-01T00 is day 1, hour 0
        forecast["2m_temperature"].sel(time=inits[1], prediction_timedelta="6h").values,
        climatology.sel(dayofyear=1, hour=0).values)


# --------------------------------------------------------------------------------------------
# opening and the whole evaluation
# --------------------------------------------------------------------------------------------
def test_truth_from_a_training_store_splits_channels(tmp_path: Path) -> None:
    times = pd.date_range("2020-01-01", periods=3, freq="6h")
    lat, lon = np.array([0.0, 10.0]), np.array([0.0, 120.0, 240.0])
    state = np.random.default_rng(2).normal(size=(3, 1, 3, 2, 3)).astype("float32")
    store = xr.Dataset(
        {"state": (("time", "number", "channel", "latitude", "longitude"), state)},
        coords={"time": times, "number": [0], "latitude": lat, "longitude": lon,
                "channel": ["temperature_850", "2m_temperature", "temperature_500"],
                "channel_variable": ("channel", ["temperature", "2m_temperature",
                                                 "temperature"]),
                "channel_level": ("channel", [850.0, np.nan, 500.0])},
        attrs={"weathermodel": {"format_version": 1, "complete": True, "variables": [
            {"name": "temperature", "units": "K"}, {"name": "2m_temperature", "units": "K"}]}})
    store.to_zarr(tmp_path / "store.zarr", zarr_format=3, consolidated=False)
    truth = truth_dataset(tmp_path / "store.zarr")
    assert truth["temperature"].dims == ("time", "level", "latitude", "longitude")
    assert truth["2m_temperature"].dims == ("time", "latitude", "longitude")
    np.testing.assert_array_equal(truth["level"].values, [500.0, 850.0])
    np.testing.assert_array_equal(truth["temperature"].sel(level=500.0).values, state[:, 0, 2])
    np.testing.assert_array_equal(truth["temperature"].sel(level=850.0).values, state[:, 0, 0])
    np.testing.assert_array_equal(truth["2m_temperature"].values, state[:, 0, 1])
    assert truth["temperature"].attrs["units"] == "K"


def test_bad_inputs_are_refused_with_a_fix(synthetic: dict, ncep_file: Path,
                                           tmp_path: Path) -> None:
    from weathermodel.errors import ConfigError, DataError

    forecast = synthetic["forecast"].isel(number=0, drop=True)
    shifted = forecast.assign_coords(latitude=LATITUDE + 1.0)
    with pytest.raises(DataError, match="latitude .* is not the truth's"):
        align(shifted, synthetic["truth_ds"])
    with pytest.raises(DataError, match="not aligned"):  # truth by valid time, not aligned
        rmse(forecast, synthetic["truth_ds"])
    with pytest.raises(ConfigError, match="unknown region"):
        rmse(*deterministic(synthetic), regions=["atlantis"])
    with pytest.raises(ConfigError, match="odd"):
        compute_climatology(synthetic["truth_ds"], window_days=4)
    with pytest.raises(DataError, match="no ensemble dimension"):
        crps(*deterministic(synthetic))
    store = tmp_path / "incomplete.zarr"  # as 'weathermodel forecast' leaves an interrupted run
    forecast.assign_attrs(weathermodel_forecast={"complete": False}).to_zarr(
        store, zarr_format=3, consolidated=False)
    with pytest.raises(DataError, match="does not exist"):
        evaluate({"model": store}, tmp_path / "no-truth.zarr")
    with pytest.raises(DataError, match="incomplete"):
        evaluate({"model": store}, ncep_file)
    # a raw file is converted to canonical names, units and latitude order
    raw = truth_dataset(ncep_file)["2m_temperature"]
    np.testing.assert_array_equal(raw.isel(time=slice(0, 8)).values,
                                  ncep_truth(ncep_file)["2m_temperature"].isel(
                                      time=slice(0, 8)).values.astype("float32"))


@pytest.fixture(scope="module")
def ncep_store(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weathermodel.configuration import from_dict
    from weathermodel.data.config import PrepareConfig
    from weathermodel.data.prepare import prepare

    out = tmp_path_factory.mktemp("evaluation") / "ncep.zarr"
    return prepare(from_dict(PrepareConfig, {"sources": [{"path": str(ncep_file)}],
                                             "output": str(out), "start": "2013-10-01",
                                             "end": "2013-11-30T18"}), progress=False)


def test_evaluate_forecast_stores_with_baselines(ncep_file: Path, ncep_store: Path,
                                                 tmp_path: Path) -> None:
    truth = truth_dataset(ncep_store)
    np.testing.assert_array_equal(  # the store holds the file's values, latitude ascending
        truth["2m_temperature"].values,
        ncep_truth(ncep_file)["2m_temperature"].sel(time=truth["time"]).values.astype("float32"))
    inits = pd.date_range("2013-11-01", "2013-11-10T18", freq="6h")
    leads = pd.to_timedelta(["6h", "24h"]).values
    model = persistence_forecast(truth, inits, leads).astype("float32")
    model.chunk({"time": 1, "prediction_timedelta": 1}).to_zarr(tmp_path / "model.zarr",
                                                                zarr_format=3,
                                                                consolidated=False)
    rng = np.random.default_rng(0)
    noise = rng.normal(scale=0.5, size=(3, *model["2m_temperature"].shape))
    ensemble = (model["2m_temperature"].expand_dims(number=3, axis=1)
                + np.moveaxis(noise, 0, 1)).to_dataset()
    ensemble.chunk({"time": 1, "number": 1}).to_netcdf(tmp_path / "ensemble.nc")
    climatology = make_climatology(ncep_store, tmp_path / "clim.zarr", window_days=15)
    assert climatology["2m_temperature"].dims == ("dayofyear", "hour", "latitude", "longitude")
    result = evaluate({"model": tmp_path / "model.zarr", "ensemble": tmp_path / "ensemble.nc"},
                      ncep_store, tmp_path / "clim.zarr", regions=["global", "north_america"],
                      out=tmp_path / "scores.nc", weighting="wb2_edges")
    scores_t2m = result["2m_temperature"]
    assert set(result["system"].values) == {"model", "ensemble", "persistence", "climatology"}
    assert scores_t2m.dims == ("system", "metric", "region", "prediction_timedelta")
    # the model store is persistence: same scores through the same code
    for metric in ("rmse", "mae", "bias", "acc"):
        np.testing.assert_allclose(scores_t2m.sel(system="model", metric=metric).values,
                                   scores_t2m.sel(system="persistence", metric=metric).values,
                                   rtol=1e-6)
    expected = brute_persistence(ncep_truth(ncep_file), 4, inits)
    assert float(scores_t2m.sel(system="model", metric="rmse", region="global",
                                prediction_timedelta=leads[1])) == pytest.approx(
        expected["rmse"], rel=1e-5)
    ens = scores_t2m.sel(system="ensemble", region="global")
    assert np.isfinite(ens.sel(metric=["crps", "spread", "spread_skill_ratio",
                                       "corrected_spread", "corrected_spread_skill_ratio"]
                               ).values).all()
    np.testing.assert_allclose(ens.sel(metric="corrected_spread_skill_ratio").values,
                               ens.sel(metric="spread_skill_ratio").values * math.sqrt(4 / 3),
                               rtol=1e-12)
    assert np.isnan(scores_t2m.sel(system="model", metric="crps").values).all()
    # the ensemble's rank histogram: 3 members, 4 bins of frequencies summing to 1
    histograms = rank_histograms(result)["2m_temperature"]
    assert histograms.dims == ("system", "region", "prediction_timedelta", "rank")
    np.testing.assert_array_equal(histograms["rank"].values, np.arange(4))
    np.testing.assert_allclose(histograms.sel(system="ensemble").sum("rank").values, 1.0,
                               rtol=1e-12)
    assert np.isnan(histograms.sel(system="model").values).all()
    histogram_table = score_table(result, metrics=["crps", "rank_histogram"])
    assert "2m_temperature (global) rank histogram of ensemble" in histogram_table
    assert "rank histogram of model" not in histogram_table
    assert "rank histogram" not in score_table(result)
    assert (result["n_pairs"].sel(system="model").values == [40, 40]).all()
    written = xr.open_dataset(tmp_path / "scores.nc")
    xr.testing.assert_allclose(written["2m_temperature"], scores_t2m)
    table = score_table(result)
    assert "2m_temperature [K] (global)" in table and "rmse:climatology" in table
    assert "acc:persistence" in table and "24h" in table


def test_lazy_forecast_is_scored_without_loading_it(tmp_path: Path) -> None:
    n_time, n_lead, n_level, n_lat, n_lon = 20, 20, 4, 181, 360
    inits = pd.date_range("2021-01-01", periods=n_time, freq="6h")
    leads = (np.arange(1, n_lead + 1) * np.timedelta64(6, "h")).astype("timedelta64[ns]")
    truth_times = pd.date_range("2021-01-01", periods=n_time + n_lead, freq="6h")
    grid = {"level": np.arange(n_level) * 100.0 + 500.0,
            "latitude": np.linspace(-90, 90, n_lat), "longitude": np.arange(n_lon) * 1.0}
    random = da.random.default_rng(0)
    forecast_data = random.standard_normal(
        (n_time, n_lead, n_level, n_lat, n_lon), chunks=(1, 1, n_level, n_lat, n_lon),
        dtype=np.float32)
    truth_data = random.standard_normal((truth_times.size, n_level, n_lat, n_lon),
                                        chunks=(1, n_level, n_lat, n_lon), dtype=np.float32)
    forecast = xr.Dataset({"z": (("time", "prediction_timedelta", "level", "latitude",
                                  "longitude"), forecast_data)},
                          coords={"time": inits, "prediction_timedelta": leads, **grid})
    truth = xr.Dataset({"z": (("time", "level", "latitude", "longitude"), truth_data)},
                       coords={"time": truth_times, **grid})
    assert forecast["z"].nbytes > 400e6
    aligned = align(forecast, truth)
    assert max(aligned.truth["z"].data.chunksize[:2]) == 1  # one (init, lead) per chunk
    lazy = rmse(aligned.forecast, aligned.truth, regions=["global", "tropics"])
    tracemalloc.start()
    with dask.config.set(scheduler="threads", num_workers=4):
        result = lazy.compute()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # at worst the whole truth (10 % of the forecast) and a few chunks per worker are held
    assert peak < 0.25 * forecast["z"].nbytes, f"peak {peak / 1e6:.0f} MB"
    # standard normal forecast and truth: the error variance is 2
    np.testing.assert_allclose(result["z"].values, math.sqrt(2.0), rtol=0.01)


def test_a_forecast_of_nan_is_reported(ncep_store: Path, tmp_path: Path, caplog) -> None:
    truth = truth_dataset(ncep_store)
    inits = pd.date_range("2013-11-01", "2013-11-02", freq="6h")
    model = persistence_forecast(truth, inits, pd.to_timedelta(["6h", "12h"]).values)
    broken = (model * np.nan).astype("float32")
    broken.to_zarr(tmp_path / "broken.zarr", zarr_format=3, consolidated=False)
    model.astype("float32").to_zarr(tmp_path / "fine.zarr", zarr_format=3, consolidated=False)
    with caplog.at_level("WARNING", logger="weathermodel.evaluation.evaluate"):
        scores = evaluate({"broken": tmp_path / "broken.zarr", "fine": tmp_path / "fine.zarr"},
                          ncep_store, baselines=[])
    assert bool(scores["2m_temperature"].sel(system="broken", metric="rmse").isnull().all())
    messages = [r.getMessage() for r in caplog.records if "has no" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("broken has no 2m_temperature score")

"""The almost-fair CRPS training loss against the `scores` package and a brute-force sum."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from scores.probability import crps_for_ensemble

from weathermodel.models.config import LossConfig
from weathermodel.models.loss import WeightedCRPSLoss

LATITUDE = np.linspace(-80.0, 80.0, 9)


def _loss(alpha: float, channels: int = 3) -> WeightedCRPSLoss:
    config = LossConfig(area_weighting="cos", level_weighting="uniform")
    return WeightedCRPSLoss(LATITUDE, ["temperature"] * channels, [500.0 + 100 * i for i in
                            range(channels)], torch.ones(channels), config, alpha=alpha)


def _ensemble(seed: int = 0, members: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randn(2, members, 3, len(LATITUDE), 7, generator=generator,
                             dtype=torch.float64)
    target = torch.randn(2, 3, len(LATITUDE), 7, generator=generator, dtype=torch.float64)
    return prediction, target


def _scores_crps(prediction: torch.Tensor, target: torch.Tensor, method: str) -> float:
    dims = ("batch", "member", "channel", "latitude", "longitude")
    forecast = xr.DataArray(prediction.numpy(), dims=dims,
                            coords={"latitude": LATITUDE})
    observed = xr.DataArray(target.numpy(), dims=dims[:1] + dims[2:],
                            coords={"latitude": LATITUDE})
    weights = xr.DataArray(np.cos(np.deg2rad(LATITUDE)), dims=["latitude"],
                           coords={"latitude": LATITUDE})
    weights = weights / weights.mean()
    return float(crps_for_ensemble(forecast, observed, "member", method=method,
                                   weights=weights))


@pytest.mark.parametrize("alpha, method", [(1.0, "fair"), (0.0, "ecdf")])
def test_crps_loss_equals_the_scores_package(alpha: float, method: str) -> None:
    prediction, target = _ensemble()
    ours = float(_loss(alpha)(prediction, target))
    assert ours == pytest.approx(_scores_crps(prediction, target, method), rel=1e-5)


def test_almost_fair_crps_equals_a_brute_force_pair_sum() -> None:
    prediction, target = _ensemble(seed=1, members=4)
    alpha, members = 0.95, 4
    epsilon = (1 - alpha) / members
    total = torch.zeros_like(target)
    for j in range(members):
        for k in range(members):
            if j != k:
                total += ((prediction[:, j] - target).abs() + (prediction[:, k] - target).abs()
                          - (1 - epsilon) * (prediction[:, j] - prediction[:, k]).abs())
    pointwise = total / (2 * members * (members - 1))
    area = torch.tensor(np.cos(np.deg2rad(LATITUDE)))
    expected = float((pointwise * area.view(-1, 1)).sum() / (area.sum() * 2 * 3 * 7))
    assert float(_loss(alpha)(prediction, target)) == pytest.approx(expected, rel=1e-6)


def test_crps_loss_skips_missing_targets_with_finite_gradients() -> None:
    prediction, target = _ensemble(seed=2)
    target[:, 0, :3] = float("nan")  # e.g. land points of a sea-only field
    prediction.requires_grad_(True)
    loss = _loss(1.0)(prediction, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(prediction.grad).all()
    assert float(prediction.grad[:, :, 0, :3].abs().max()) == 0.0
    # the value is the CRPS over the valid points only
    valid = prediction.detach().clone()
    keep = torch.ones_like(target, dtype=torch.bool)
    keep[:, 0, :3] = False
    skill = (valid - target.unsqueeze(1)).abs().mean(1)
    spread = (valid.unsqueeze(1) - valid.unsqueeze(2)).abs().sum((1, 2)) / (2 * 5 * 4)
    area = torch.tensor(np.cos(np.deg2rad(LATITUDE))).view(-1, 1).expand_as(target[0, 0])
    weights = area * keep
    expected = float(torch.where(keep, skill - spread, 0.0).mul(weights).sum() / weights.sum())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_crps_rewards_the_right_spread() -> None:
    """For truth ~ N(0, 1), members ~ N(0, sigma**2) score best at sigma = 1 (fair CRPS)."""
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(64, 3, len(LATITUDE), 7, generator=generator, dtype=torch.float64)
    scores = {}
    for sigma in (0.5, 1.0, 2.0):
        members = sigma * torch.randn(64, 4, 3, len(LATITUDE), 7, generator=generator,
                                      dtype=torch.float64)
        scores[sigma] = float(_loss(1.0)(members, target))
    assert scores[1.0] < scores[0.5] and scores[1.0] < scores[2.0]


def test_crps_loss_refuses_a_single_member() -> None:
    prediction, target = _ensemble(members=1)
    with pytest.raises(ValueError, match="at least 2 members"):
        _loss(1.0)(prediction, target)

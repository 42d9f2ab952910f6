"""The training loss: mean squared error of normalised tendencies, weighted by cell area,
pressure level and variable (GraphCast's weighting, configurable)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from weathermodel.models.config import LossConfig
from weathermodel.models.mesh import cell_area_weights


def channel_weights(channel_variables: list[str], channel_levels: list[float],
                    config: LossConfig) -> np.ndarray:
    """Weight of each channel: level weight (mean 1 over a variable's levels) x variable weight.

    ``pressure`` weights a level in proportion to its pressure (hPa), so the lower atmosphere,
    where most of the mass is, counts most; single-level variables get 1.
    """
    weights = np.ones(len(channel_variables), dtype="float64")
    levels = np.asarray(channel_levels, dtype="float64")
    if config.level_weighting == "pressure":
        for variable in set(channel_variables):
            index = [i for i, v in enumerate(channel_variables) if v == variable]
            on_levels = levels[index]
            if np.all(np.isfinite(on_levels)) and len(index) > 0:
                weights[index] = on_levels / on_levels.mean()
    for i, variable in enumerate(channel_variables):
        weights[i] *= config.variable_weights.get(variable, 1.0)
    return weights


class WeightedMSELoss(nn.Module):
    """``mean over batch, steps, grid, channels of w_lat * w_channel * ((pred - target) / s)**2``.

    ``s`` is the per-channel tendency std, so every channel contributes on the scale of its
    one-step change. Inputs are (B, [steps,] C, lat, lon) in physical units; weights are
    normalised to mean 1, so a unit error in every normalised tendency gives a loss of 1.
    """

    def __init__(self, latitude: np.ndarray, channel_variables: list[str],
                 channel_levels: list[float], tendency_std: torch.Tensor,
                 config: LossConfig) -> None:
        super().__init__()
        area = cell_area_weights(np.asarray(latitude), config.area_weighting)
        channel = channel_weights(channel_variables, channel_levels, config)
        channel = channel / channel.mean()
        self.register_buffer("area", torch.tensor(area, dtype=torch.float32).view(-1, 1))
        self.register_buffer("channel", torch.tensor(channel, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("scale", tendency_std.detach().float().reshape(-1, 1, 1))

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = ((prediction - target) / self.scale) ** 2
        return (error * self.area * self.channel).mean()

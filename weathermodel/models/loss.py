"""The training loss: mean squared error of normalised tendencies, weighted by cell area,
pressure level and variable (GraphCast's weighting, configurable), over the predicted channels
only and masked where the target is missing (Anemoi's loss mask)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from weathermodel.models.config import LossConfig
from weathermodel.models.forecaster import Forecaster
from weathermodel.data.weights import cell_area_weights


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
    """Weighted MSE of the predicted channels, skipping missing targets.

    ``sum(w * ((pred - target) / s)**2) / sum(w)`` over batch, steps, grid points and the
    output channels, with ``w = w_lat * w_channel * valid`` (``valid`` is 0 where the target is
    NaN: land points of a sea-only field, corners outside a regional domain). ``s`` is the
    channel's one-step tendency std for prognostic channels and its std for diagnostic ones
    (the scale the network predicts on), so a unit error in every normalised output gives a
    loss of 1. Inputs are (B, [steps,] C, lat, lon) in physical units, all channels of the
    store; forcing channels are not scored.

    Parameters
    ----------
    latitude : the grid's latitudes (degrees).
    channel_variables, channel_levels : variable and level (hPa, NaN for single level) of every
        channel of the store.
    scale : (n_output,) scale ``s`` of each output channel.
    config : the weighting options.
    output_index : the channels scored (prognostic and diagnostic ones); None scores all.
    """

    def __init__(self, latitude: np.ndarray, channel_variables: list[str],
                 channel_levels: list[float], scale: torch.Tensor, config: LossConfig,
                 output_index: list[int] | None = None) -> None:
        super().__init__()
        if output_index is None:
            output_index = list(range(len(channel_variables)))
        area = cell_area_weights(np.asarray(latitude), config.area_weighting)
        channel = channel_weights([channel_variables[i] for i in output_index],
                                  [channel_levels[i] for i in output_index], config)
        channel = channel / channel.mean()
        self.register_buffer("area", torch.tensor(area, dtype=torch.float32).view(-1, 1))
        self.register_buffer("channel", torch.tensor(channel, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("scale", scale.detach().float().reshape(-1, 1, 1))
        self.register_buffer("output_index", torch.tensor(output_index, dtype=torch.long))

    @classmethod
    def for_model(cls, model: Forecaster) -> "WeightedMSELoss":
        """The loss of a forecaster: its output channels, scales and loss options."""
        metadata = model.metadata
        return cls(np.asarray(metadata.latitude), metadata.channel_variables,
                   metadata.channel_levels, model.output_scale.flatten(), model.config.loss,
                   model.output_channel_index.tolist())

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        channel_dim = prediction.dim() - 3
        prediction = prediction.index_select(channel_dim, self.output_index).float()
        target = target.index_select(channel_dim, self.output_index).float()
        valid = torch.isfinite(target)
        # NaN targets are replaced before the subtraction: a NaN there would poison the gradient
        error = ((prediction - torch.where(valid, target, prediction.detach())) / self.scale) ** 2
        weights = self.area * self.channel * valid
        return (error * weights).sum() / weights.sum().clamp_min(1e-12)

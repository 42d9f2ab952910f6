"""Training losses, weighted by cell area, pressure level and variable (GraphCast's weighting,
configurable), over the predicted channels only and masked where the target is missing
(Anemoi's loss mask): the mean squared error of normalised outputs for deterministic models, and
the almost-fair CRPS of an ensemble (AIFS-CRPS, Lang et al. 2024) for ensemble models."""
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


class _WeightedLoss(nn.Module):
    """Weights and masking shared by the losses: area x channel weight x valid target.

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
    def for_model(cls, model: Forecaster, **options: float):
        """The loss of a forecaster: its output channels, scales and loss options."""
        metadata = model.metadata
        return cls(np.asarray(metadata.latitude), metadata.channel_variables,
                   metadata.channel_levels, model.output_scale.flatten(), model.config.loss,
                   model.output_channel_index.tolist(), **options)

    def _scored(self, values: torch.Tensor) -> torch.Tensor:
        """The output channels of ``values`` (channel axis third from last), in float32."""
        return values.index_select(values.dim() - 3, self.output_index).float()

    def _weighted_mean(self, pointwise: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        weights = self.area * self.channel * valid
        return (pointwise * weights).sum() / weights.sum().clamp_min(1e-12)


class WeightedMSELoss(_WeightedLoss):
    """Weighted MSE of the predicted channels, skipping missing targets.

    ``sum(w * ((pred - target) / s)**2) / sum(w)`` over batch, steps, grid points and the
    output channels, with ``w = w_lat * w_channel * valid`` (``valid`` is 0 where the target is
    NaN: land points of a sea-only field, corners outside a regional domain). ``s`` is the
    channel's one-step tendency std for prognostic channels and its std for diagnostic ones
    (the scale the network predicts on), so a unit error in every normalised output gives a
    loss of 1. Inputs are (B, [steps,] C, lat, lon) in physical units, all channels of the
    store; forcing channels are not scored. Parameters as :class:`_WeightedLoss`.
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction, target = self._scored(prediction), self._scored(target)
        valid = torch.isfinite(target)
        # NaN targets are replaced before the subtraction: a NaN there would poison the gradient
        error = ((prediction - torch.where(valid, target, prediction.detach())) / self.scale) ** 2
        return self._weighted_mean(error, valid)


class WeightedCRPSLoss(_WeightedLoss):
    """Weighted almost-fair CRPS of an ensemble (AIFS-CRPS's afCRPS), skipping missing targets.

    For members ``x_1..x_M`` and target ``y`` at one point, in units of the output scale ``s``::

        afCRPS = 1/M sum_j |x_j - y| - (1 - eps) / (2 M (M - 1)) sum_{j,k} |x_j - x_k|

    with ``eps = (1 - alpha) / M`` (Lang et al. 2024, arXiv:2412.15832). ``alpha = 1`` is the
    fair CRPS (unbiased for the ensemble's distribution, what ``evaluate`` scores), ``alpha = 0``
    the plain empirical-CDF CRPS; AIFS-CRPS trains with ``alpha = 0.95``, which keeps a small
    penalty on members collapsing onto each other. The pairwise sum is computed from the sorted
    members (``sum_{j,k}|x_j - x_k| = 2 sum_i (2i - M + 1) x_(i)``, ``i`` from 0), so memory grows
    with ``M``, not ``M**2``. Weighted and masked as :class:`WeightedMSELoss`.

    Shapes: ``prediction`` (B, M, [steps,] C, lat, lon), ``target`` (B, [steps,] C, lat, lon),
    physical units, all channels of the store.
    """

    def __init__(self, *args, alpha: float = 0.95, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        members = prediction.shape[1]
        if members < 2:
            raise ValueError("the CRPS of an ensemble needs at least 2 members per sample")
        prediction, target = self._scored(prediction), self._scored(target)
        valid = torch.isfinite(target)
        target = torch.where(valid, target, 0.0)
        prediction = torch.where(valid.unsqueeze(1), prediction, 0.0) / self.scale
        target = target / self.scale
        skill = (prediction - target.unsqueeze(1)).abs().mean(dim=1)
        ranked = prediction.sort(dim=1).values
        rank = torch.arange(members, device=prediction.device, dtype=prediction.dtype)
        rank = (2 * rank - members + 1).view(1, -1, *([1] * (prediction.dim() - 2)))
        pair_sum = 2 * (rank * ranked).sum(dim=1)
        epsilon = (1.0 - self.alpha) / members
        spread = (1.0 - epsilon) * pair_sum / (2 * members * (members - 1))
        return self._weighted_mean(skill - spread, valid)

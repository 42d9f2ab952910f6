"""The one interface of every forecaster: a one-step predictor in physical units.

``Forecaster`` wraps a network (graph or transformer) with what makes it a weather model:

* variable roles (Anemoi's): every channel of the store is *prognostic* (input and output,
  fed back), a *forcing* read from the data (input only, e.g. sea surface temperature) or a
  *diagnostic* (output only, e.g. precipitation); see :func:`resolve_roles`;
* an input imputer (Anemoi's ``InputImputer``, ``mean`` statistic): missing (NaN) input values
  become the training mean, optionally with a mask channel telling the network where;
* inputs normalised by the training statistics (states by mean/std, forcings and statics too);
* prognostic channels predicted as the *normalised tendency*, the next state being
  ``last state + prediction * tendency_std`` (residual prediction, GraphCast); diagnostic
  channels predicted directly as ``mean + prediction * std``.

* a stochastic model (``ensemble.noise_channels > 0``, CRPS-trained as AIFS-CRPS / FGN) takes
  smooth random noise fields as extra inputs, drawn afresh at every step: each call is one
  ensemble member.

``rollout`` feeds predictions back autoregressively, taking the forcing channels of each new
input from the data when given (``future``) and persisting them otherwise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weathermodel import conventions
from weathermodel.data.dataset import StoreSummary
from weathermodel.errors import ConfigError
from weathermodel.models.config import ModelConfig

_STAT_FLOOR = 1e-8  # a constant channel (e.g. a static mask) must not divide by zero


@dataclass
class ModelMetadata:
    """Everything about the data a model was built for: plain lists, saved in checkpoints.

    Units are the store's canonical units; statistics are per channel (states), per forcing
    and per static field, in the store's order. ``channel_roles`` holds each channel's role
    (``prognostic``, ``forcing`` or ``diagnostic``); ``channel_has_missing`` whether the
    channel held missing values in training (those inputs are imputed).
    """

    channels: list[str]
    channel_variables: list[str]
    channel_levels: list[float]
    forcings: list[str]
    statics: list[str]
    latitude: list[float]
    longitude: list[float]
    time_step_seconds: int
    mean: list[float]
    std: list[float]
    tendency_std: list[float]
    forcing_mean: list[float]
    forcing_std: list[float]
    static_mean: list[float]
    static_std: list[float]
    variables: list[dict]
    grid: dict
    channel_roles: list[str] = field(default_factory=list)
    channel_has_missing: list[bool] = field(default_factory=list)
    #: first and last time of the period the statistics come from (ISO; empty: unrecorded)
    statistics_period: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:  # files written before roles: every channel prognostic
        if not self.channel_roles:
            self.channel_roles = [conventions.PROGNOSTIC] * len(self.channels)
        if not self.channel_has_missing:
            self.channel_has_missing = [False] * len(self.channels)
        for name in ("channel_variables", "channel_levels", "channel_roles",
                     "channel_has_missing", "mean", "std", "tendency_std"):
            if len(getattr(self, name)) != len(self.channels):
                raise ValueError(f"model metadata: {name} has {len(getattr(self, name))} "
                                 f"entries for {len(self.channels)} channels")

    def role_index(self, *roles: str) -> list[int]:
        """Indices of the channels whose role is one of ``roles``, in channel order."""
        return [i for i, role in enumerate(self.channel_roles) if role in roles]

    @classmethod
    def from_summary(cls, summary: StoreSummary,
                     config: ModelConfig | None = None) -> "ModelMetadata":
        """The metadata of a model trained on ``summary``'s store, with the roles ``config``
        gives (registry defaults where it says nothing)."""
        meta = summary.metadata
        statics = np.asarray(summary.statics, dtype="float64")
        return cls(
            channels=list(summary.channels), channel_variables=list(summary.channel_variables),
            channel_levels=_floats(summary.channel_levels),
            forcings=list(meta["forcings"]), statics=list(meta["statics"]),
            latitude=[float(v) for v in summary.latitude],
            longitude=[float(v) for v in summary.longitude],
            time_step_seconds=int(meta["time_step_seconds"]),
            mean=_floats(summary.mean), std=_floats(summary.std),
            tendency_std=_floats(summary.tendency_std),
            forcing_mean=_floats(summary.forcing_mean), forcing_std=_floats(summary.forcing_std),
            static_mean=_floats(statics.mean(axis=(1, 2))),
            static_std=_floats(statics.std(axis=(1, 2))),
            variables=list(meta["variables"]), grid=dict(meta["grid"]),
            channel_roles=resolve_roles(list(summary.channel_variables), config),
            channel_has_missing=[bool(f > 0) for f in np.asarray(summary.missing_fraction)],
            statistics_period=[str(t) for t in (summary.statistics_period or [])])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetadata":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def resolve_roles(channel_variables: list[str], config: ModelConfig | None) -> list[str]:
    """Role of each channel: the config's ``forcing`` / ``diagnostic`` lists where they name
    the variable, else the variable's registry kind (:func:`weathermodel.conventions.default_role`).

    Raises
    ------
    ConfigError : a listed variable is not in the store, or no channel is left prognostic.
    """
    present = set(channel_variables)
    explicit: dict[str, str] = {}
    for role, names in ((conventions.FORCING, config.forcing if config else None),
                        (conventions.DIAGNOSTIC, config.diagnostic if config else None)):
        if names is None:
            continue
        absent = sorted(set(names) - present)
        if absent:
            raise ConfigError(f"model.{role} names {absent}, which the store does not hold "
                              f"(it has {sorted(present)})", f"remove them from model.{role}")
        explicit.update({name: role for name in names})
    defaults_overridden = {role for role, names in ((conventions.FORCING, config and config.forcing),
                                                    (conventions.DIAGNOSTIC, config and config.diagnostic))
                           if names is not None}
    roles = []
    for variable in channel_variables:
        role = explicit.get(variable)
        if role is None:
            role = conventions.default_role(variable)
            if role in defaults_overridden:  # an explicit list replaces the registry default
                role = conventions.PROGNOSTIC
        roles.append(role)
    if conventions.PROGNOSTIC not in roles:
        raise ConfigError("no prognostic variable is left: every channel is a forcing or a "
                          "diagnostic", "make at least one variable prognostic")
    return roles


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype="float64")]


def _buffer(values: list[float], floor: bool = False) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float32)
    tensor = torch.nan_to_num(tensor, nan=1.0 if floor else 0.0)
    return tensor.clamp_min(_STAT_FLOOR) if floor else tensor


def build_network(config: ModelConfig, in_channels: int, out_channels: int,
                  latitude: np.ndarray, longitude: np.ndarray, grid: dict,
                  cache_dir: str | Path | None = None) -> nn.Module:
    """The network a config names, mapping (B, in, lat, lon) to (B, out, lat, lon)."""
    if config.kind == "graph":
        from weathermodel.models.graph import GraphNetwork

        return GraphNetwork(config.graph, in_channels, out_channels, latitude, longitude,
                            config.activation_checkpointing, cache_dir=cache_dir)
    from weathermodel.models.transformer import WeatherTransformer

    return WeatherTransformer(config.transformer, in_channels, out_channels, len(latitude),
                              len(longitude), config.activation_checkpointing,
                              periodic_longitude=bool(grid.get("is_global", True)))


def _index(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


class Forecaster(nn.Module):
    """One-step forecaster in physical units.

    Parameters
    ----------
    config : the model configuration.
    metadata : the store's channels, roles, grid and statistics.
    statics : static fields (n_statics, lat, lon) in physical units.
    """

    def __init__(self, config: ModelConfig, metadata: ModelMetadata, statics: np.ndarray,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.config, self.metadata = config, metadata
        n_forcings = len(metadata.forcings)
        self.register_buffer("mean", _buffer(metadata.mean).view(1, -1, 1, 1))
        self.register_buffer("std", _buffer(metadata.std, floor=True).view(1, -1, 1, 1))
        self.register_buffer("tendency_std",
                             _buffer(metadata.tendency_std, floor=True).view(1, -1, 1, 1))
        self.register_buffer("forcing_mean", _buffer(metadata.forcing_mean).view(1, 1, -1, 1, 1))
        self.register_buffer("forcing_std",
                             _buffer(metadata.forcing_std, floor=True).view(1, 1, -1, 1, 1))
        static_mean = _buffer(metadata.static_mean).view(-1, 1, 1)
        static_std = _buffer(metadata.static_std, floor=True).view(-1, 1, 1)
        normalised = (torch.as_tensor(np.asarray(statics, "float32")) - static_mean) / static_std
        self.register_buffer("statics", normalised)
        self.history = config.history
        inputs = metadata.role_index(conventions.PROGNOSTIC, conventions.FORCING)
        outputs = metadata.role_index(conventions.PROGNOSTIC, conventions.DIAGNOSTIC)
        masked = [i for i in inputs if metadata.channel_has_missing[i]] \
            if config.imputer_mask_channel else []
        # channel index lists (not saved: they follow from the metadata)
        self.register_buffer("input_channel_index", _index(inputs), persistent=False)
        self.register_buffer("output_channel_index", _index(outputs), persistent=False)
        self.register_buffer("masked_channel_index", _index(masked), persistent=False)
        self.register_buffer("forcing_channel_index", _index(metadata.role_index(conventions.FORCING)),
                             persistent=False)
        is_diagnostic = [role == conventions.DIAGNOSTIC for role in metadata.channel_roles]
        # per output channel: the scale of the network's output and whether it is a tendency
        output_scale = torch.where(torch.tensor(is_diagnostic)[outputs],
                                   self.std[0, outputs, 0, 0], self.tendency_std[0, outputs, 0, 0])
        self.register_buffer("output_scale", output_scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("output_is_tendency",
                             (~torch.tensor(is_diagnostic)[outputs]).view(1, -1, 1, 1),
                             persistent=False)
        in_channels = (config.history * (len(inputs) + len(masked))
                       + (config.history + 1) * n_forcings + len(metadata.statics)
                       + config.ensemble.noise_channels)
        self.network_in_channels = in_channels
        self.network = build_network(config, in_channels, len(outputs),
                                     np.asarray(metadata.latitude), np.asarray(metadata.longitude),
                                     metadata.grid, cache_dir=cache_dir)

    @property
    def lead_time_hours(self) -> float:
        return self.metadata.time_step_seconds / 3600.0

    @property
    def is_stochastic(self) -> bool:
        """Whether each call draws noise (a CRPS-trained ensemble model): one call, one member."""
        return self.config.ensemble.stochastic

    @property
    def noise_input_columns(self) -> slice:
        """The network input channels that carry noise: the last ``noise_channels``."""
        width = self.network_in_channels
        return slice(width - self.config.ensemble.noise_channels, width)

    def noise(self, batch: int, like: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Smooth standard-normal noise (B, noise_channels, lat, lon) for one step.

        Values are drawn on every ``noise_length_points``-th grid point and interpolated
        bilinearly between them; on a global grid the coarse grid wraps in longitude (exactly
        periodic when the number of longitudes is a multiple of the length), so the field is
        continuous across the date line. Draws use ``generator`` (on ``like``'s device), or
        torch's global generator when None (training, which seeds it).
        """
        ensemble = self.config.ensemble
        n_lat, n_lon = self.statics.shape[-2:]
        step = ensemble.noise_length_points
        periodic = bool(self.metadata.grid.get("is_global", True))
        # coarse values sit on every step-th point; the fine field is cropped to the grid
        coarse_lat = -(-(n_lat - 1) // step) + 1
        coarse_lon = -(-n_lon // step) if periodic else -(-(n_lon - 1) // step) + 1
        coarse = torch.randn(batch, ensemble.noise_channels, coarse_lat, coarse_lon,
                             device=like.device, generator=generator)
        if periodic:  # one more column repeats the first: one full turn of longitude
            coarse = torch.cat([coarse, coarse[..., :1]], dim=-1)
        fine_size = ((coarse_lat - 1) * step + 1, (coarse.shape[-1] - 1) * step + 1)
        fine = nn.functional.interpolate(coarse, size=fine_size, mode="bilinear",
                                         align_corners=True)[..., :n_lat, :n_lon]
        return fine.to(like.dtype)

    def network_inputs(self, states: torch.Tensor, forcings: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised, imputed, stacked inputs (B, in_channels, lat, lon).

        states : (B, history, C, lat, lon) physical, all channels (diagnostic ones are not
        used; NaN where missing); forcings : (B, history + 1, F, lat, lon) computed forcings at
        the input times and the target time; generator : of a stochastic model's noise.
        """
        batch = states.shape[0]
        index = self.input_channel_index
        normalised = (states[:, :, index] - self.mean[:, None, index]) / self.std[:, None, index]
        pieces = [torch.nan_to_num(normalised, nan=0.0).flatten(1, 2)]  # 0 = the training mean
        if self.masked_channel_index.numel():
            missing = torch.isnan(states[:, :, self.masked_channel_index])
            pieces.append(missing.to(normalised.dtype).flatten(1, 2))
        forcing = ((forcings - self.forcing_mean) / self.forcing_std).flatten(1, 2)
        statics = self.statics.expand(batch, -1, -1, -1).to(normalised.dtype)
        noise = [self.noise(batch, normalised, generator)] if self.is_stochastic else []
        return torch.cat([*pieces, forcing, statics, *noise], dim=1)  # noise last (see
        # noise_input_columns)

    def forward(self, states: torch.Tensor, forcings: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Next state (B, C, lat, lon) in physical units from ``history`` states.

        A stochastic model draws new noise at every call (from ``generator``, else torch's
        global generator): the batch entries of a repeated state are different members.
        Prognostic and diagnostic channels are predicted; forcing channels are carried over
        from the last input state (:meth:`rollout` replaces them by the data when it has them).
        """
        if states.shape[1] != self.history or forcings.shape[1] != self.history + 1:
            raise ValueError(f"expected {self.history} states and {self.history + 1} forcing "
                             f"times, got {states.shape[1]} and {forcings.shape[1]}")
        x = self.network_inputs(states, forcings, generator)
        lead = torch.full((x.shape[0],), self.lead_time_hours, device=x.device)
        output = self.network(x, lead).float() * self.output_scale
        last = states[:, -1]
        index = self.output_channel_index
        # the base of a tendency is the imputed last state (its mean where it is missing)
        base = torch.where(torch.isnan(last[:, index]), self.mean[:, index], last[:, index])
        predicted = torch.where(self.output_is_tendency, base + output,
                                self.mean[:, index] + output)
        return last.index_copy(1, index, predicted)

    def rollout(self, states: torch.Tensor, forcings: torch.Tensor, steps: int,
                future: torch.Tensor | None = None) -> torch.Tensor:
        """Autoregressive rollout: (B, steps, C, lat, lon).

        forcings : (B, history + steps, F, lat, lon), at every input and target time.
        future : (B, >= steps, C, lat, lon) states at the target times, from which the forcing
            channels of each fed-back state are taken (training has them); None persists the
            forcing channels of the last input state.
        """
        history = states
        outputs = []
        index = self.forcing_channel_index
        for step in range(steps):
            window = forcings[:, step:step + self.history + 1]
            prediction = self(history, window)
            if future is not None and index.numel():
                prediction = prediction.index_copy(1, index, future[:, step, index])
            outputs.append(prediction)
            history = torch.cat([history[:, 1:], prediction[:, None]], dim=1)
        return torch.stack(outputs, dim=1)

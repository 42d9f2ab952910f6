"""The one interface of every forecaster: a one-step predictor in physical units.

``Forecaster`` wraps a network (graph or transformer) with what makes it a weather model:
inputs normalised by the store's statistics (states by mean/std, forcings and statics too), the
network predicting the *normalised tendency*, and the next state recovered as
``last state + prediction * tendency_std`` (residual prediction). The network therefore sees
unit-variance inputs and targets. ``rollout`` feeds predictions back autoregressively.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weathermodel.data.dataset import StoreSummary
from weathermodel.models.config import ModelConfig

_STAT_FLOOR = 1e-8  # a constant channel (e.g. a static mask) must not divide by zero


@dataclass
class ModelMetadata:
    """Everything about the data a model was built for: plain lists, saved in checkpoints.

    Units are the store's canonical units; statistics are per channel (states), per forcing
    and per static field, in the store's order.
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

    @classmethod
    def from_summary(cls, summary: StoreSummary) -> "ModelMetadata":
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
            variables=list(meta["variables"]), grid=dict(meta["grid"]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetadata":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype="float64")]


def _buffer(values: list[float], floor: bool = False) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float32)
    tensor = torch.nan_to_num(tensor, nan=1.0 if floor else 0.0)
    return tensor.clamp_min(_STAT_FLOOR) if floor else tensor


def build_network(config: ModelConfig, in_channels: int, out_channels: int,
                  latitude: np.ndarray, longitude: np.ndarray,
                  cache_dir: str | Path | None = None) -> nn.Module:
    """The network a config names, mapping (B, in, lat, lon) to (B, out, lat, lon)."""
    if config.kind == "graph":
        from weathermodel.models.graph import GraphNetwork

        return GraphNetwork(config.graph, in_channels, out_channels, latitude, longitude,
                            config.activation_checkpointing, cache_dir=cache_dir)
    from weathermodel.models.transformer import WeatherTransformer

    return WeatherTransformer(config.transformer, in_channels, out_channels, len(latitude),
                              len(longitude), config.activation_checkpointing)


class Forecaster(nn.Module):
    """One-step forecaster in physical units.

    Parameters
    ----------
    config : the model configuration.
    metadata : the store's channels, grid and statistics.
    statics : static fields (n_statics, lat, lon) in physical units.
    """

    def __init__(self, config: ModelConfig, metadata: ModelMetadata, statics: np.ndarray,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.config, self.metadata = config, metadata
        n_channels, n_forcings = len(metadata.channels), len(metadata.forcings)
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
        in_channels = (config.history * n_channels + (config.history + 1) * n_forcings
                       + len(metadata.statics))
        self.network = build_network(config, in_channels, n_channels,
                                     np.asarray(metadata.latitude), np.asarray(metadata.longitude),
                                     cache_dir=cache_dir)

    @property
    def lead_time_hours(self) -> float:
        return self.metadata.time_step_seconds / 3600.0

    def network_inputs(self, states: torch.Tensor, forcings: torch.Tensor) -> torch.Tensor:
        """Normalised, stacked inputs (B, in_channels, lat, lon).

        states : (B, history, C, lat, lon) physical; forcings : (B, history + 1, F, lat, lon)
        at the input times and the target time.
        """
        batch = states.shape[0]
        normalised = ((states - self.mean[:, None]) / self.std[:, None]).flatten(1, 2)
        forcing = ((forcings - self.forcing_mean) / self.forcing_std).flatten(1, 2)
        statics = self.statics.expand(batch, -1, -1, -1)
        return torch.cat([normalised, forcing, statics], dim=1)

    def forward(self, states: torch.Tensor, forcings: torch.Tensor) -> torch.Tensor:
        """Next state (B, C, lat, lon) in physical units from ``history`` states."""
        if states.shape[1] != self.history or forcings.shape[1] != self.history + 1:
            raise ValueError(f"expected {self.history} states and {self.history + 1} forcing "
                             f"times, got {states.shape[1]} and {forcings.shape[1]}")
        x = self.network_inputs(states, forcings)
        lead = torch.full((x.shape[0],), self.lead_time_hours, device=x.device)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                            enabled=self.config.bf16):
            tendency = self.network(x, lead)
        return states[:, -1] + tendency.float() * self.tendency_std

    def rollout(self, states: torch.Tensor, forcings: torch.Tensor, steps: int) -> torch.Tensor:
        """Autoregressive rollout: (B, steps, C, lat, lon).

        forcings : (B, history + steps, F, lat, lon), at every input and target time.
        """
        history = states
        outputs = []
        for step in range(steps):
            window = forcings[:, step:step + self.history + 1]
            prediction = self(history, window)
            outputs.append(prediction)
            history = torch.cat([history[:, 1:], prediction[:, None]], dim=1)
        return torch.stack(outputs, dim=1)

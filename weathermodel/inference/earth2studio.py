"""A weathermodel checkpoint as an Earth2Studio prognostic model.

    from earth2studio.data import DataArrayFile
    from earth2studio.io import ZarrBackend
    from earth2studio.run import deterministic
    from weathermodel.inference.earth2studio import WeatherModelPrognostic

    model = WeatherModelPrognostic.load("checkpoints/speedy_transformer_2000")
    io = deterministic(["2000-10-01T00"], 20, model, DataArrayFile("ic.nc"), ZarrBackend())

It follows Earth2Studio's ``PrognosticModel`` protocol (``__call__``, ``create_iterator``,
``input_coords``, ``output_coords``, ``to``) with Earth2Studio's conventions: tensors
(..., time, lead_time, variable, lat, lon), variables in its lexicon's short names
(``t2m``, ``z500``, ``u850``, ``sst``, ``tpf``; other channels keep weathermodel's
``name_level``), ``lead_time`` relative to ``time``. The inputs are the prognostic and
forcing variables at ``history`` lead times; the outputs add the diagnostic ones
(missing, NaN, at lead 0). Every step runs through
:meth:`weathermodel.inference.predictor.Predictor.iter_predict`: the same contract checks and
the same rollout as ``predict`` and ``weathermodel forecast``, so the three agree. Forcing
channels (e.g. sea surface temperature) are persisted along the forecast, as ``predict`` does
when the data holds no later times.

Earth2Studio is an optional extra (``pip install weathermodel[earth2studio]``); this module
imports only ``torch`` and ``numpy`` itself.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from weathermodel import conventions
from weathermodel.inference.predictor import Predictor, load_forecaster

#: Earth2Studio lexicon short names of WeatherBench 2 variables (``{name}{level}`` on levels)
EARTH2STUDIO_NAMES = {
    "geopotential": "z", "temperature": "t", "u_component_of_wind": "u",
    "v_component_of_wind": "v", "specific_humidity": "q", "relative_humidity": "r",
    "vertical_velocity": "w", "2m_temperature": "t2m", "2m_dewpoint_temperature": "d2m",
    "10m_u_component_of_wind": "u10m", "10m_v_component_of_wind": "v10m",
    "100m_u_component_of_wind": "u100m", "100m_v_component_of_wind": "v100m",
    "surface_pressure": "sp", "mean_sea_level_pressure": "msl",
    "sea_surface_temperature": "sst", "total_column_water_vapour": "tcwv",
    "total_precipitation_6hr": "tp06", "mean_total_precipitation_rate": "tpf",
    "geopotential_at_surface": "zsl", "land_sea_mask": "lsm",
}


def earth2studio_name(variable: str, level: float) -> str:
    """The Earth2Studio name of ``variable`` (at ``level`` hPa, NaN for single-level
    fields): its lexicon name where it has one, else weathermodel's channel name."""
    short = EARTH2STUDIO_NAMES.get(variable)
    if np.isnan(level):
        return short or variable
    return f"{short}{level:g}" if short else f"{variable}_{level:g}"


class WeatherModelPrognostic(torch.nn.Module):
    """Earth2Studio ``PrognosticModel`` running a weathermodel checkpoint.

    Parameters
    ----------
    predictor : the checkpoint, loaded by :func:`weathermodel.load_forecaster`.
    """

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor
        self.forecaster = predictor.model  # registered: ``.to(device)`` moves it
        metadata = predictor.metadata
        self.time_step = predictor.time_step
        names = [earth2studio_name(v, level) for v, level in
                 zip(metadata.channel_variables, metadata.channel_levels)]
        self.inputs = metadata.role_index(conventions.PROGNOSTIC, conventions.FORCING)
        self.outputs = metadata.role_index(conventions.PROGNOSTIC, conventions.FORCING,
                                           conventions.DIAGNOSTIC)
        self.input_names = np.array([names[i] for i in self.inputs])
        self.output_names = np.array([names[i] for i in self.outputs])
        self.latitude = np.asarray(metadata.latitude)
        self.longitude = np.asarray(metadata.longitude)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu"
             ) -> "WeatherModelPrognostic":
        """The model of a checkpoint (a model file, or a folder holding ``model.pt``)."""
        return cls(load_forecaster(path, device=device))

    def __str__(self) -> str:
        return f"weathermodel({Path(self.predictor.checkpoint).parent.name})"

    def to(self, device: Any) -> "WeatherModelPrognostic":  # type: ignore[override]
        super().to(device)
        self.predictor.device = torch.device(device)
        return self

    # ----------------------------------------------------------------------------------------
    # coordinate systems
    # ----------------------------------------------------------------------------------------
    def input_coords(self) -> OrderedDict:
        """(batch, time, lead_time, variable, lat, lon): ``history`` states one step apart,
        the last at lead 0; prognostic and forcing variables; the checkpoint's grid."""
        history = self.forecaster.history
        return OrderedDict(
            batch=np.empty(0), time=np.empty(0),
            lead_time=(np.arange(-history + 1, 1) * self.time_step).astype("timedelta64[ns]"),
            variable=self.input_names.copy(), lat=self.latitude.copy(),
            lon=self.longitude.copy())

    def output_coords(self, input_coords: OrderedDict) -> OrderedDict:
        """One step after the last input lead time; prognostic, forcing and diagnostic
        variables.

        Raises
        ------
        ValueError : the input's lead times, variables or grid are not :meth:`input_coords`'.
        """
        expected = self.input_coords()
        lead_time = np.asarray(input_coords["lead_time"]).astype("timedelta64[ns]")
        relative = lead_time - lead_time[-1]
        if not np.array_equal(relative, expected["lead_time"]):
            raise ValueError(f"lead_time {lead_time} is not {self.forecaster.history} states "
                             f"{self.time_step.astype('timedelta64[h]')} apart")
        for key in ("variable", "lat", "lon"):
            have = np.asarray(input_coords[key])
            if have.shape != expected[key].shape or not np.all(have == expected[key]):
                raise ValueError(f"input coordinate '{key}' differs from the model's "
                                 f"{expected[key]!r}")
        coords = OrderedDict((key, value) for key, value in input_coords.items()
                             if key not in ("lead_time", "variable", "lat", "lon"))
        coords["lead_time"] = lead_time[-1:] + self.time_step
        coords["variable"] = self.output_names.copy()
        coords["lat"], coords["lon"] = self.latitude.copy(), self.longitude.copy()
        return coords

    # ----------------------------------------------------------------------------------------
    # stepping
    # ----------------------------------------------------------------------------------------
    def _initial_conditions(self, x: np.ndarray, init: np.datetime64,
                            lead_time: np.ndarray) -> xr.Dataset:
        """One sample (lead_time, variable, lat, lon) as a dataset in canonical names."""
        metadata = self.predictor.metadata
        times = (init + lead_time).astype("datetime64[ns]")
        units = {v["name"]: v["units"] for v in metadata.variables}
        grouped: dict[str, list[tuple[float, np.ndarray]]] = {}
        for position, channel in enumerate(self.inputs):
            grouped.setdefault(metadata.channel_variables[channel], []).append(
                (metadata.channel_levels[channel], x[:, position]))
        data_vars: dict[str, Any] = {}
        levels: list[float] = []
        for name, pairs in grouped.items():
            if np.isnan(pairs[0][0]):
                data_vars[name] = (("time", "latitude", "longitude"), pairs[0][1],
                                   {"units": units[name]})
            else:
                pairs = sorted(pairs, key=lambda pair: pair[0])
                levels = levels or [level for level, _ in pairs]
                array = xr.DataArray(np.stack([values for _, values in pairs], axis=1),
                                     dims=("time", "level", "latitude", "longitude"),
                                     coords={"level": [level for level, _ in pairs]})
                data_vars[name] = array.assign_attrs(units=units[name])
        return xr.Dataset(data_vars, coords={"time": times, "latitude": self.latitude,
                                             "longitude": self.longitude})

    def _output_values(self, dataset: xr.Dataset) -> np.ndarray:
        """(variable, lat, lon) of one start date's lead, in :attr:`output_names` order."""
        metadata = self.predictor.metadata
        fields = []
        for channel in self.outputs:
            variable, level = metadata.channel_variables[channel], metadata.channel_levels[channel]
            if variable not in dataset:  # a forcing: persisted (added by _steps)
                fields.append(None)
                continue
            array = dataset[variable]
            if not np.isnan(level):
                array = array.sel(level=level)
            fields.append(array.values.reshape(array.shape[-2:]))
        return fields  # type: ignore[return-value]

    def _steps(self, x: torch.Tensor, coords: OrderedDict, n_steps: int
               ) -> Iterator[tuple[torch.Tensor, OrderedDict]]:
        """Steps 1..n_steps of every sample of ``x``, rolled out in lockstep."""
        self.output_coords(coords)  # checks lead times, variables and grid
        dims = list(coords)
        if dims[-4:] != ["lead_time", "variable", "lat", "lon"] or "time" not in dims[:-4]:
            raise ValueError(f"x must be (..., time, lead_time, variable, lat, lon), got {dims}")
        leading = x.shape[:-4]
        samples = x.detach().float().cpu().numpy().reshape(-1, *x.shape[-4:])
        times = np.broadcast_to(
            np.asarray(coords["time"], "datetime64[ns]").reshape(
                [-1 if dim == "time" else 1 for dim in dims[:-4]]), leading).reshape(-1)
        lead_time = np.asarray(coords["lead_time"]).astype("timedelta64[ns]")
        rollouts = [self.predictor._iterate(self._initial_conditions(sample, init, lead_time),
                                            n_steps)
                    for sample, init in zip(samples, times)]
        forcing_positions = [position for position, channel in enumerate(self.outputs)
                             if channel in self.inputs and self.predictor.metadata
                             .channel_roles[channel] == conventions.FORCING]
        last_forcing = {position: samples[:, -1, self.inputs.index(self.outputs[position])]
                        for position in forcing_positions}
        out_coords = self.output_coords(coords)
        for step, leads in enumerate(zip(*rollouts)):
            values = np.empty((len(samples), len(self.outputs), *samples.shape[-2:]),
                              dtype="float32")
            for sample, dataset in enumerate(leads):
                for position, field in enumerate(self._output_values(dataset)):
                    values[sample, position] = (last_forcing[position][sample]
                                                if field is None else field)
            step_coords = out_coords.copy()
            step_coords["lead_time"] = lead_time[-1:] + (step + 1) * self.time_step
            output = torch.from_numpy(values).reshape(*leading, 1, *values.shape[1:])
            yield output.to(x.device), step_coords

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, coords: OrderedDict
                 ) -> tuple[torch.Tensor, OrderedDict]:
        """One step: (..., time, lead_time, variable, lat, lon) -> the next state."""
        return next(self._steps(x, coords, 1))

    def create_iterator(self, x: torch.Tensor, coords: OrderedDict
                        ) -> Iterator[tuple[torch.Tensor, OrderedDict]]:
        """The initial state (lead 0; diagnostics NaN), then one step after another, without
        end (the workflow stops it); memory does not grow with the lead."""
        self.output_coords(coords)
        initial = torch.full((*x.shape[:-4], 1, len(self.outputs), *x.shape[-2:]),
                             float("nan"), dtype=torch.float32, device=x.device)
        for position, channel in enumerate(self.outputs):
            if channel in self.inputs:
                initial[..., 0, position, :, :] = x[..., -1, self.inputs.index(channel), :, :]
        initial_coords = self.output_coords(coords)
        initial_coords["lead_time"] = np.asarray(coords["lead_time"])[-1:]
        yield initial, initial_coords
        yield from self._steps(x, coords, sys.maxsize)

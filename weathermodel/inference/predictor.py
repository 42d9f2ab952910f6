"""The Python API of a forecast: ``xarray`` in, ``xarray`` out, as GraphCast's predictor.

    import weathermodel, xarray as xr
    forecaster = weathermodel.load_forecaster("checkpoints/speedy_transformer_2000")
    initial = xr.open_dataset("era5_2000-10-01.nc")    # canonical names, >= history steps
    forecast = forecaster.predict(initial, lead="5d")  # WeatherBench 2 layout

Initial conditions are checked by the same contract as ``weathermodel forecast --data``
(:func:`weathermodel.inference.contract.check_initial_conditions`: variables, levels, units,
grid and its order, time step, value ranges), and rolled out by the same code
(:func:`weathermodel.inference.forecast.rollout_starts`), so ``predict`` equals the CLI's
forecast of the same start dates. Every time of ``initial_conditions`` preceded by
``history - 1`` states one model step apart is a start date; all start dates of one call run
as one batch.

The output has the forecast store's layout: variables in WeatherBench 2 names with dims
``time`` (initialisation), [``number``,] ``prediction_timedelta``, [``level``,] ``latitude``,
``longitude`` and a ``valid_time`` coordinate; units as the checkpoint's (SI). Forcing
channels (e.g. sea surface temperature) are inputs only and not part of it; later times of
the data, when given, provide them along the forecast (persisted beyond), as in the CLI.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import xarray as xr

from weathermodel import conventions
from weathermodel.errors import ConfigError, DataError
from weathermodel.inference import output
from weathermodel.inference.calibrate import checkpoint_perturbation, perturbation_options
from weathermodel.inference.contract import check_initial_conditions
from weathermodel.inference.forecast import (ForecastOptions, health_report, lead_steps,
                                             rollout_starts)
from weathermodel.inference.perturbations import PerturbationSettings
from weathermodel.models.forecaster import Forecaster
from weathermodel.models.io import load_model, model_file

_WHERE = "initial_conditions"


def load_forecaster(path: str | Path, device: str | torch.device | None = None) -> "Predictor":
    """Load a checkpoint (a model file, or a folder holding ``model.pt``) as a
    :class:`Predictor`.

    Parameters
    ----------
    path : model file or checkpoint folder (e.g. ``checkpoints/ncep_graph_2013``).
    device : where it runs (default: the first GPU when there is one, else the CPU).
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    file = model_file(path)
    shipped = checkpoint_perturbation(file)
    return Predictor(load_model(str(file)).to(device).eval(), device, str(file),
                     shipped[1] if shipped else None)


class Predictor:
    """A forecaster with an ``xarray`` interface.

    Parameters
    ----------
    model : the forecaster (in eval mode, on ``device``).
    device : where it runs.
    checkpoint : the model file it came from (recorded in the output's attributes).
    perturbation : the initial perturbations calibrated for the checkpoint (its folder's
        ``perturbation.yaml``), used by ensembles when no amplitude is given; None: the
        forecast's defaults.
    """

    def __init__(self, model: Forecaster, device: torch.device, checkpoint: str = "",
                 perturbation: PerturbationSettings | None = None) -> None:
        self.model, self.device, self.checkpoint = model, device, checkpoint
        self.perturbation = perturbation
        self.metadata = model.metadata
        self.time_step = np.timedelta64(self.metadata.time_step_seconds, "s").astype(
            "timedelta64[ns]")

    # ----------------------------------------------------------------------------------------
    # what it needs and what it gives
    # ----------------------------------------------------------------------------------------
    def _variables(self, *roles: str) -> dict[str, list[float]]:
        variables: dict[str, list[float]] = {}
        for index in self.metadata.role_index(*roles):
            levels = variables.setdefault(self.metadata.channel_variables[index], [])
            if not np.isnan(self.metadata.channel_levels[index]):
                levels.append(float(self.metadata.channel_levels[index]))
        return {name: sorted(levels) for name, levels in variables.items()}

    def _units(self) -> dict[str, str]:
        return {v["name"]: v["units"] for v in self.metadata.variables}

    @property
    def input_coords(self) -> dict[str, Any]:
        """What ``initial_conditions`` must hold.

        ``time``: the states' offsets from the start date (timedelta64, e.g. ``[-6h, 0h]``
        for a history of two); ``variables``: variable name -> pressure levels (hPa; empty
        for single-level fields); ``units``: variable -> units; ``latitude``, ``longitude``:
        the grid in the order required (degrees). Forcing variables (e.g. sea surface
        temperature) are inputs too.
        """
        variables = self._variables(conventions.PROGNOSTIC, conventions.FORCING)
        units = self._units()
        return {"time": np.arange(-self.model.history + 1, 1) * self.time_step,
                "variables": variables, "units": {name: units[name] for name in variables},
                "latitude": np.asarray(self.metadata.latitude),
                "longitude": np.asarray(self.metadata.longitude)}

    @property
    def output_coords(self) -> dict[str, Any]:
        """What each step gives: ``prediction_timedelta`` (one model step), ``variables``
        (name -> pressure levels, prognostic and diagnostic), ``units``, ``level`` (every
        level of the output), ``latitude``, ``longitude``."""
        variables = self._variables(conventions.PROGNOSTIC,
                                   conventions.DIAGNOSTIC)
        units = self._units()
        return {"prediction_timedelta": np.asarray([self.time_step]),
                "variables": variables, "units": {name: units[name] for name in variables},
                "level": np.asarray(output.all_levels(self.metadata)),
                "latitude": np.asarray(self.metadata.latitude),
                "longitude": np.asarray(self.metadata.longitude)}

    # ----------------------------------------------------------------------------------------
    # forecasts
    # ----------------------------------------------------------------------------------------
    def start_times(self, initial_conditions: xr.Dataset) -> np.ndarray:
        """The start dates of ``initial_conditions``: every time preceded by ``history - 1``
        states one model step apart (datetime64[ns])."""
        if conventions.TIME not in initial_conditions.coords:
            raise DataError(f"the initial conditions have no '{conventions.TIME}' coordinate "
                            f"(coords: {sorted(map(str, initial_conditions.coords))})",
                            "give a dataset with a time coordinate in canonical names",
                            path=_WHERE)
        times = np.asarray(initial_conditions[conventions.TIME].values, "datetime64[ns]")
        history = self.model.history
        starts = [t for t in times
                  if np.isin(t - np.arange(1, history) * self.time_step, times).all()]
        if not starts:
            raise DataError(f"no time of the initial conditions has the {history - 1} earlier "
                            f"state(s) {self.time_step.astype('timedelta64[h]')} apart that "
                            f"the model needs (times: {[str(t) for t in times[:4]]})",
                            f"give {history} consecutive states at the model's time step",
                            path=_WHERE)
        return np.asarray(starts, dtype="datetime64[ns]")

    def iter_predict(self, initial_conditions: xr.Dataset, lead: str = "5d", members: int = 1,
                     perturbation: float | None = None, seed: int = 0, on_unhealthy: str = "flag",
                     start_times: Any = None) -> Iterator[xr.Dataset]:
        """The forecast one lead at a time (memory flat in lead time): a dataset per model
        step, each with ``prediction_timedelta`` of length one; see :meth:`predict`."""
        yield from self._iterate(initial_conditions,
                                 lead_steps(lead, self.metadata.time_step_seconds), members,
                                 perturbation, seed, on_unhealthy, start_times)

    def _iterate(self, initial_conditions: xr.Dataset, n_leads: int, members: int = 1,
                 perturbation: float | None = None, seed: int = 0, on_unhealthy: str = "flag",
                 start_times: Any = None) -> Iterator[xr.Dataset]:
        """:meth:`iter_predict` for ``n_leads`` model steps (computed as they are asked for,
        so an unbounded ``n_leads`` is fine)."""
        if members < 1:
            raise ConfigError(f"members = {members}", "give 1 or more")
        if on_unhealthy not in ("flag", "stop"):
            raise ConfigError(f"on_unhealthy = {on_unhealthy!r}", "give 'flag' or 'stop'")
        state = check_initial_conditions(initial_conditions, self.metadata, _WHERE)
        inits = (self.start_times(initial_conditions) if start_times is None
                 else np.atleast_1d(np.asarray(start_times, dtype="datetime64[ns]")))
        options = ForecastOptions(checkpoint=self.checkpoint, data=_WHERE, init="",
                                  lead=f"{n_leads} steps", out=_WHERE, members=members,
                                  seed=seed, on_unhealthy=on_unhealthy, progress=False,
                                  **self._perturbation_fields(perturbation))
        for step in rollout_starts(self.model, options, state, inits,
                                   list(range(inits.size)), n_leads, self.device):
            values = step.values.float().cpu().numpy()
            health = health_report(step.indices, step.lead, step.health.cpu().numpy(), inits,
                                   self.metadata, options)
            dataset = output.lead_dataset(self.metadata, values, inits,
                                          (step.lead + 1) * self.time_step)
            dataset.attrs["weathermodel_health"] = json.dumps(health)
            yield dataset

    def _perturbation_fields(self, amplitude: float | None) -> dict[str, Any]:
        """The forecast's perturbation options: the checkpoint's calibrated settings (with
        ``amplitude`` instead of theirs when given), else the defaults."""
        base = self.perturbation or PerturbationSettings()
        settings = base if amplitude is None else dataclasses.replace(base, amplitude=amplitude)
        return perturbation_options(settings,
                                    amplitude is not None or self.perturbation is not None)

    def predict(self, initial_conditions: xr.Dataset, lead: str = "5d", members: int = 1,
                perturbation: float | None = None, seed: int = 0, on_unhealthy: str = "flag",
                start_times: Any = None) -> xr.Dataset:
        """Forecast from every start date of ``initial_conditions``.

        Parameters
        ----------
        initial_conditions : canonical names and dims (``time``, [``level``,] ``latitude``,
            ``longitude``), SI units as the checkpoint's, ``history`` or more states at the
            model's time step (see :attr:`input_coords`).
        lead : forecast length, a multiple of the model's time step (``"5d"``, ``"120h"``).
        members : ensemble size; member 0 is the unperturbed control of a deterministic
            model; every member of a stochastic (CRPS-trained) model is a sample of it.
        perturbation, seed : initial perturbations of the other members (as ``weathermodel
            forecast --perturbation --seed``; the i-th start date is seeded as the CLI's
            i-th); None: the perturbations calibrated for the checkpoint (its folder's
            ``perturbation.yaml``), else 0.1 tendency stds, or none for a stochastic model.
        on_unhealthy : ``"flag"`` records NaN/inf or values far outside the training range
            in the attribute ``weathermodel_health`` (JSON); ``"stop"`` raises.
        start_times : the start dates (datetime64 or ISO strings; default: every time of
            ``initial_conditions`` with the model's history before it).

        Returns
        -------
        xr.Dataset : ``time`` (the start dates), [``number``,] ``prediction_timedelta``,
            [``level``,] ``latitude``, ``longitude``; ``valid_time`` coordinate.

        Raises
        ------
        DataError : the initial conditions break the contract (names the problem and fix).
        ConfigError : a lead that is not a multiple of the time step, members < 1.
        """
        leads = list(self.iter_predict(initial_conditions, lead, members, perturbation, seed,
                                       on_unhealthy, start_times))
        dataset = xr.concat(leads, dim="prediction_timedelta", data_vars="minimal",
                            coords="different", compat="equals", join="exact",
                            combine_attrs="override")
        health = [entry for part in leads for entry in json.loads(part.attrs[
            "weathermodel_health"])]
        dataset.attrs = {"Conventions": "CF-1.8", "weathermodel_health": json.dumps(health),
                         "weathermodel_checkpoint": self.checkpoint}
        return dataset

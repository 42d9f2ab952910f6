"""``weathermodel calibrate``: the perturbation amplitude that makes an ensemble's spread match
its error.

A perturbed-initial-condition ensemble is calibrated when its spread-skill ratio (SSR) is 1:
the ensemble spread equals the root-mean-square error of the ensemble mean. The SSR follows
WeatherBench 2 (and :func:`weathermodel.evaluation.metrics.spread_skill_ratio`):

    SSR = sqrt( mean_t <var_ens>_A / mean_t <(mean_ens - truth)^2>_A ) * sqrt((M + 1) / M)

with ``<>_A`` the area-weighted spatial mean (the evaluation's default latitude weights),
``var_ens`` the unbiased (ddof = 1) member variance, ``mean_t`` the mean over start dates and
the finite-ensemble correction sqrt((M + 1) / M) (Fortin et al. 2014), so that an ensemble of M
members exchangeable with the truth scores 1. (It is computed here on the in-memory ensemble:
inference may not import evaluation.)

The amplitude is found by a safeguarded secant search on ``log(amplitude)`` for the root of
``g = mean over channels and leads of log(SSR)``, with the same random fields at every trial
(common random numbers: g is then a smooth function of the amplitude). The result is written to
a small YAML or JSON *perturbation file* that ``weathermodel forecast --perturbation-file``
reads.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

import weathermodel
from weathermodel import conventions
from weathermodel.data.sources import file_checksum
from weathermodel.data.weights import latitude_weights
from weathermodel.errors import ConfigError, DataError
from weathermodel.inference import forecast as forecast_workflow
from weathermodel.inference.contract import open_initial_conditions
from weathermodel.inference.perturbations import PerturbationSettings, default_length_scale_km
from weathermodel.models.io import load_model, model_file

FILE_FORMAT = "weathermodel-perturbation"
FILE_VERSION = 1
CHECKPOINT_PERTURBATION_FILE = "perturbation.yaml"


@dataclass
class CalibrationOptions:
    """Options of ``weathermodel calibrate`` (see its ``--help``).

    Attributes
    ----------
    checkpoint, data : the model and the validation data (training store or canonical data
        holding the initial conditions and the truth at every valid time).
    init : validation start dates, ``START`` or ``START/END/STEP``.
    lead : the lead time the SSR is calibrated at (``72h``), or a range ``48h/120h`` (every
        model step in it, inclusive).
    out : the perturbation file to write (``.yaml``, ``.yml`` or ``.json``).
    members : ensemble size (the control included).
    channels : channels or variables whose SSR counts (default: every prognostic channel).
    amplitude : first trial amplitude, in reference standard deviations.
    length_scale_km, scale, symmetric, bred_cycles : the perturbation
        (:class:`~weathermodel.inference.perturbations.PerturbationSettings`).
    tolerance : stop when |log SSR| <= tolerance (0.05: SSR within about 5 % of 1).
    max_iterations : largest number of trial amplitudes (ensemble runs over all starts).
    seed : random seed (the same fields at every trial).
    """

    checkpoint: str
    data: str
    init: str
    lead: str
    out: str
    members: int = 8
    channels: list[str] | None = None
    amplitude: float = 0.1
    length_scale_km: float | None = None
    scale: str = "tendency_std"
    symmetric: bool = False
    bred_cycles: int = 0
    tolerance: float = 0.05
    max_iterations: int = 8
    seed: int = 0
    progress: bool = True


@dataclass
class Trial:
    """One trial amplitude and the SSR it gave (per scored channel and overall)."""

    amplitude: float
    ssr: float
    channel_ssr: dict[str, float] = field(default_factory=dict)


def _lead_indices(text: str, time_step_seconds: int) -> list[int]:
    """Rollout step indices (0 = first step) of ``72h`` or of the range ``48h/120h``."""
    parts = text.split("/")
    if len(parts) > 2:
        raise ConfigError(f"--lead {text!r} is not LEAD or FIRST/LAST",
                          "write e.g. 72h or 48h/120h")
    steps = [forecast_workflow.lead_steps(part, time_step_seconds) for part in parts]
    if steps[-1] < steps[0]:
        raise ConfigError(f"--lead {text!r}: the last lead is before the first",
                          "write FIRST/LAST with FIRST <= LAST")
    return list(range(steps[0] - 1, steps[-1]))


def _scored_channels(metadata, names: list[str] | None) -> list[int]:
    prognostic = metadata.role_index(conventions.PROGNOSTIC)
    if not names:
        return prognostic
    chosen = [i for i in prognostic if metadata.channels[i] in names
              or metadata.channel_variables[i] in names]
    named = {metadata.channels[i] for i in chosen} | {metadata.channel_variables[i]
                                                       for i in chosen}
    unknown = sorted(set(names) - named)
    if unknown:
        raise ConfigError(f"--channels names {unknown}, which are not prognostic channels or "
                          "variables of the model",
                          f"choose among {[metadata.channels[i] for i in prognostic]}")
    return chosen


class EnsembleScorer:
    """Runs the ensemble of every validation start at a trial amplitude (through the forecast's
    own rollout) and returns its spread-skill ratio."""

    def __init__(self, options: CalibrationOptions) -> None:
        if options.members < 2:
            raise ConfigError("calibration needs an ensemble: --members must be at least 2",
                              "give e.g. --members 8")
        if not options.tolerance > 0 or options.max_iterations < 1:
            raise ConfigError("--tolerance must be > 0 and --max-iterations >= 1",
                              "give e.g. --tolerance 0.05 --max-iterations 8")
        self.options = options
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = load_model(options.checkpoint).to(self.device).eval()
        metadata = self.model.metadata
        self.state = open_initial_conditions(options.data, metadata)
        self.inits = forecast_workflow.parse_init_times(options.init)
        self.leads = _lead_indices(options.lead, metadata.time_step_seconds)
        self.channels = _scored_channels(metadata, options.channels)
        self.weights = latitude_weights(np.asarray(metadata.latitude))[:, None]
        self.step = np.timedelta64(metadata.time_step_seconds, "s")
        times = self.state.indexes["time"]
        valid = [np.datetime64(init + (lead + 1) * self.step, "ns")
                 for init in self.inits for lead in self.leads]
        absent = sorted({str(t) for t in valid if t not in times})
        if absent:
            raise DataError(f"the truth at valid time(s) {absent[:3]} (of {len(absent)}) is "
                            "not in the data", "choose start dates whose leads the data covers",
                            path=options.data)
        self.truth = {t: self.state.sel(time=t).values[0][self.channels] for t in valid}
        PerturbationSettings(amplitude=options.amplitude, length_scale_km=options.length_scale_km,
                             scale=options.scale, bred_cycles=options.bred_cycles)  # checks

    def forecast_options(self, amplitude: float) -> forecast_workflow.ForecastOptions:
        o = self.options
        return forecast_workflow.ForecastOptions(
            checkpoint=o.checkpoint, data=o.data, init=o.init, lead=o.lead.split("/")[-1],
            out="", members=o.members, perturbation=amplitude,
            perturbation_length_km=o.length_scale_km, perturbation_scale=o.scale,
            perturbation_symmetric=o.symmetric, perturbation_bred_cycles=o.bred_cycles,
            seed=o.seed, on_unhealthy="flag", progress=False)

    def __call__(self, amplitude: float) -> Trial:
        """The SSR (with the finite-ensemble correction) at ``amplitude``."""
        options = self.forecast_options(amplitude)
        n_leads = max(self.leads) + 1
        position_of = {lead: position for position, lead in enumerate(self.leads)}
        variance = np.zeros((len(self.leads), len(self.channels)))
        error = np.zeros_like(variance)
        batches = forecast_workflow.start_batches(
            self.inits.size, forecast_workflow.batch_starts_of(options, self.model))
        for indices in tqdm(batches, desc=f"amplitude {amplitude:.4g}",
                            disable=not self.options.progress, leave=False):
            # the forecast's own rollout: the same members 'forecast' makes for these starts
            for lead in forecast_workflow.rollout_starts(self.model, options, self.state,
                                                         self.inits, indices, n_leads,
                                                         self.device):
                if lead.lead not in position_of:
                    continue
                values = lead.values[:, :, self.channels].double().cpu().numpy()
                for members, index in zip(values, indices):  # members: (member, C, lat, lon)
                    valid = np.datetime64(self.inits[index] + (lead.lead + 1) * self.step, "ns")
                    position = position_of[lead.lead]
                    variance[position] += self._area_mean(members.var(axis=0, ddof=1))
                    error[position] += self._area_mean(
                        (members.mean(axis=0) - self.truth[valid]) ** 2)
        members = self.options.members
        correction = math.sqrt((members + 1) / members)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.sqrt(variance / error) * correction  # (lead, channel); 1/n cancels
        if not np.isfinite(ratio).all() or (ratio <= 0).any():
            raise DataError(f"the spread-skill ratio at amplitude {amplitude:g} is not a "
                            "positive number (zero spread, zero error, or NaN forecasts)",
                            "check the forecasts; give a larger --amplitude")
        names = [self.model.metadata.channels[i] for i in self.channels]
        per_channel = np.exp(np.log(ratio).mean(axis=0))
        return Trial(amplitude=float(amplitude), ssr=float(np.exp(np.log(ratio).mean())),
                     channel_ssr={n: float(v) for n, v in zip(names, per_channel)})

    def _area_mean(self, values: np.ndarray) -> np.ndarray:
        """Area-weighted mean over (lat, lon) per channel, leaving missing points out."""
        present = np.isfinite(values)
        weights = np.broadcast_to(self.weights, values.shape) * present
        return np.sum(np.where(present, values, 0.0) * weights, axis=(-2, -1)) \
            / np.sum(weights, axis=(-2, -1))


def search_amplitude(score, start: float, tolerance: float, max_iterations: int
                     ) -> tuple[Trial, list[Trial]]:
    """Root of log SSR(amplitude) by secant steps on log amplitude, kept inside the bracket
    once one is found (bisection when a step leaves it). ``score(amplitude) -> Trial``.

    The first step assumes spread proportional to amplitude (slope 1 in log-log), the linear
    regime of small perturbations. Returns the trial nearest to SSR = 1 and every trial.
    """
    if not start > 0:
        raise ConfigError(f"the first trial amplitude {start} is not positive",
                          "give e.g. --amplitude 0.1")
    trials = [score(start)]
    low = high = None  # (log amplitude, log ssr) with log ssr < 0 and > 0
    x, y = math.log(start), math.log(trials[0].ssr)
    previous: tuple[float, float] | None = None
    for _ in range(max_iterations - 1):
        if abs(y) <= tolerance:
            break
        if y < 0:
            low = (x, y) if low is None or x > low[0] else low
        else:
            high = (x, y) if high is None or x < high[0] else high
        slope = 1.0
        if previous is not None and previous[0] != x:
            slope = (y - previous[1]) / (x - previous[0])
        slope = min(max(slope, 0.1), 3.0)  # spread grows with amplitude; guard the step
        candidate = x - y / slope
        if low is not None and high is not None and not low[0] < candidate < high[0]:
            candidate = 0.5 * (low[0] + high[0])
        candidate = min(max(candidate, x - 4.0), x + 4.0)  # at most a factor ~55 per step
        previous = (x, y)
        trials.append(score(math.exp(candidate)))
        x, y = candidate, math.log(trials[-1].ssr)
    best = min(trials, key=lambda trial: abs(math.log(trial.ssr)))
    return best, trials


def calibrate(options: CalibrationOptions) -> dict[str, Any]:
    """Search the amplitude and write the perturbation file; returns its contents."""
    out = Path(options.out)
    if out.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"the perturbation file {out} must end in .yaml, .yml or .json",
                          "give e.g. --out outputs/perturbation.yaml")
    scorer = EnsembleScorer(options)
    best, trials = search_amplitude(scorer, options.amplitude, options.tolerance,
                                    options.max_iterations)
    metadata = scorer.model.metadata
    length = options.length_scale_km or default_length_scale_km(np.asarray(metadata.latitude))
    contents = {
        "format": FILE_FORMAT, "version": FILE_VERSION,
        "amplitude": best.amplitude, "length_scale_km": float(length), "scale": options.scale,
        "symmetric": options.symmetric, "bred_cycles": options.bred_cycles,
        "calibration": {
            "checkpoint": options.checkpoint, "checkpoint_digest":
                file_checksum(str(model_file(options.checkpoint)))[0], "data": options.data,
            "init": options.init, "lead": options.lead, "members": options.members,
            "seed": options.seed, "spread_skill_ratio": best.ssr,
            "channel_spread_skill_ratio": best.channel_ssr,
            "converged": abs(math.log(best.ssr)) <= options.tolerance,
            "trials": [{"amplitude": t.amplitude, "spread_skill_ratio": t.ssr}
                       for t in trials],
            "package_version": weathermodel.__version__,
        },
    }
    write_perturbation_file(out, contents)
    return contents


def write_perturbation_file(path: str | Path, contents: dict[str, Any]) -> None:
    """Write ``contents`` as YAML or JSON (by the suffix), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(contents, indent=1) if path.suffix.lower() == ".json"
            else yaml.safe_dump(contents, sort_keys=False))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_perturbation_file(path: str | Path) -> PerturbationSettings:
    """The :class:`PerturbationSettings` of a file written by :func:`calibrate` (or by hand:
    ``amplitude`` is required; ``length_scale_km``, ``scale``, ``symmetric``, ``bred_cycles``
    optional)."""
    return _settings(_perturbation_contents(path), path)


def _perturbation_contents(path: str | Path) -> dict[str, Any]:
    """The contents of a perturbation file, checked to be one this package reads."""
    path = Path(path)
    try:
        contents = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read the perturbation file: {error}",
                          "give the file 'weathermodel calibrate' wrote", path=str(path)) \
            from error
    except yaml.YAMLError as error:
        raise ConfigError(f"the perturbation file is not YAML/JSON: {error}",
                          "give the file 'weathermodel calibrate' wrote", path=str(path)) \
            from error
    if not isinstance(contents, dict) or "amplitude" not in contents:
        raise ConfigError("the perturbation file has no 'amplitude'",
                          "give the file 'weathermodel calibrate' wrote", path=str(path))
    if contents.get("version", FILE_VERSION) > FILE_VERSION:
        raise ConfigError(f"the perturbation file is of version {contents['version']}, newer "
                          f"than this package reads ({FILE_VERSION})",
                          "update weathermodel", path=str(path))
    return contents


def _settings(contents: dict[str, Any], path: str | Path) -> PerturbationSettings:
    """The settings among a perturbation file's ``contents``."""
    known = {"amplitude", "length_scale_km", "scale", "symmetric", "bred_cycles"}
    try:
        return PerturbationSettings(**{k: v for k, v in contents.items() if k in known})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the perturbation file holds invalid settings: {error}",
                          "give the file 'weathermodel calibrate' wrote", path=str(path)) \
            from error


def checkpoint_perturbation(checkpoint: str | Path
                            ) -> tuple[Path, PerturbationSettings] | None:
    """The initial perturbations calibrated for a checkpoint and shipped with it: the file
    ``perturbation.yaml`` (written by :func:`calibrate`) in the checkpoint's folder, with its
    settings; None when there is none.

    Raises
    ------
    ConfigError : the file was calibrated for another model file (its recorded digest differs
        from the model file's): a stale calibration is refused rather than used.
    """
    file = model_file(checkpoint)
    candidate = file.parent / CHECKPOINT_PERTURBATION_FILE
    if not candidate.is_file():
        return None
    contents = _perturbation_contents(candidate)
    recorded = (contents.get("calibration") or {}).get("checkpoint_digest")
    if recorded and recorded != file_checksum(str(file))[0]:
        raise ConfigError(f"{candidate} was calibrated for another model file than {file} "
                          "(its checkpoint digest differs)",
                          "run 'weathermodel calibrate' for this model, or give "
                          "--perturbation / --perturbation-file", path=str(candidate))
    return candidate, _settings(contents, candidate)


def perturbation_options(settings: PerturbationSettings, explicit: bool) -> dict[str, Any]:
    """:class:`~weathermodel.inference.forecast.ForecastOptions`' perturbation fields from
    ``settings``; the amplitude only when ``explicit`` (else None: the forecast's default,
    0.1 or 0 for a stochastic model)."""
    return {"perturbation": settings.amplitude if explicit else None,
            "perturbation_length_km": settings.length_scale_km,
            "perturbation_scale": settings.scale,
            "perturbation_symmetric": settings.symmetric,
            "perturbation_bred_cycles": settings.bred_cycles}

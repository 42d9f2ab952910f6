"""``weathermodel demo``: the whole path on the shipped 2013 NCEP sample, reanalysis to scorecard.

The workflow, one stage a section (each stage is the public API a user would call):

1. **prepare** the shipped sample (``weathermodel/sample_data``) into a training store;
2. **train** a small graph model on January-September 2013 with ``configs/train_ncep.yaml``
   (fewer steps by default, to stay within minutes), or load the shipped checkpoint
   (``--use-checkpoint``), trained by ``scripts/train_demo_checkpoint.sh`` with the full recipe;
3. **forecast** every 00 and 12 UTC start date of October-December 2013 to 5 days;
4. **climatology** of the 2013 record (61-day smoothing; it includes the verification months,
   so the climatology baseline is an optimistic one — there is only one year to learn from);
5. **evaluate** the model, persistence and climatology against the reanalysis (WeatherBench 2
   conventions, ``edges`` latitude weights on this regional grid), write the scores, the
   scorecard, lead-time plots, spectra and maps, and print the skill table.

Every stage resumes: running the demo again after an interruption continues where it stopped,
and a complete stage is reused (pass ``fresh=True`` / ``--fresh`` to start over).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from weathermodel.errors import ConfigError

SHIPPED_CHECKPOINT = "ncep_graph_2013.pt"
SAMPLE_FILE = "air_temperature_2013.nc"
TRAIN_CONFIG = "train_ncep.yaml"
SKILL_LEADS_HOURS = (6, 24, 72, 120)


@dataclass
class DemoOptions:
    """Options of one demo run (see ``weathermodel demo --help``).

    out_dir : every output goes below this folder.
    use_checkpoint : forecast with this checkpoint instead of training; ``"shipped"`` for the
        checkpoint shipped with the package.
    train_steps : optimizer steps of the demo's training (None: the recipe's own schedule
        shortened to ``DEFAULT_TRAIN_STEPS``).
    init : start dates, ``START/END/STEP``.
    lead : forecast length.
    overrides : extra ``key=value`` overrides of the training configuration.
    fresh : delete ``out_dir`` first.
    progress : show progress bars.
    """

    out_dir: Path = Path("outputs/demo")
    use_checkpoint: str | None = None
    train_steps: int | None = None
    init: str = "2013-10-01/2013-12-26T12/12h"
    lead: str = "5d"
    overrides: Sequence[str] = field(default_factory=tuple)
    fresh: bool = False
    progress: bool = True


DEFAULT_TRAIN_STEPS = 1000


def resource_path(*parts: str) -> Path:
    """A file shipped inside the package (sample data, configs, the checkpoint)."""
    path = Path(str(resources.files("weathermodel").joinpath("resources", *parts)))
    if not path.exists():
        raise ConfigError(f"the packaged file {'/'.join(parts)} is missing",
                          "reinstall weathermodel (pip install weathermodel) or run from a "
                          "source checkout", path=str(path))
    return path


def sample_path() -> Path:
    return Path(str(resources.files("weathermodel").joinpath("sample_data", SAMPLE_FILE)))


class _Stages:
    """Prints numbered stage banners with their elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.number, self.started = total, 0, time.perf_counter()
        self.stage_started = self.started

    def begin(self, title: str) -> None:
        self.number += 1
        self.stage_started = time.perf_counter()
        print(f"\n[{self.number}/{self.total}] {title}", flush=True)

    def end(self, what: str) -> None:
        seconds = time.perf_counter() - self.stage_started
        print(f"      done in {seconds:.0f} s: {what}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def prepare_store(out_dir: Path, progress: bool) -> Path:
    """Stage 1: the training store of the shipped sample (resumes; reuses a complete one)."""
    from weathermodel.configuration import load_config
    from weathermodel.data.config import PrepareConfig
    from weathermodel.data.prepare import prepare

    store = out_dir / "ncep_2013.zarr"
    config = load_config(PrepareConfig, None, [
        f"sources={json.dumps([{'path': str(sample_path())}])}",
        f"output={json.dumps(str(store))}", "time_step=\"6h\""])
    return prepare(config, progress=progress)


def train_config(store: Path, run_dir: Path, train_steps: int | None,
                 overrides: Sequence[str] = ()):
    """The shipped recipe (``configs/train_ncep.yaml``) pointed at the demo's store, with its
    rollout schedule compressed to ``train_steps`` optimizer steps."""
    from weathermodel.configuration import load_config
    from weathermodel.training.config import TrainConfig

    recipe = resource_path("configs", TRAIN_CONFIG)
    places = [f"data.store={json.dumps(str(store))}", f"run_dir={json.dumps(str(run_dir))}"]
    base = load_config(TrainConfig, recipe, places)
    steps = train_steps or min(DEFAULT_TRAIN_STEPS, base.optim.max_steps)
    scale = steps / base.optim.max_steps
    schedule = [{"from_step": int(round(stage.from_step * scale)), "rollout": stage.rollout}
                for stage in base.rollout_schedule]
    return load_config(TrainConfig, recipe, [
        *places, f"optim.max_steps={steps}",
        f"optim.warmup_steps={min(base.optim.warmup_steps, max(1, steps // 10))}",
        f"rollout_schedule={json.dumps(schedule)}",
        f"checkpoint_every={max(1, min(base.checkpoint_every, steps))}",
        f"val_every={max(1, steps)}", *overrides])


def train_model(store: Path, out_dir: Path, options: DemoOptions) -> Path:
    """Stage 2: train (resuming a previous demo run); returns the final model file."""
    from weathermodel.training.checkpoint import list_checkpoints
    from weathermodel.training.loop import train

    run_dir = out_dir / "train"
    config = train_config(store, run_dir, options.train_steps, options.overrides)
    done = list_checkpoints(run_dir)
    if done and done[-1][0] >= config.optim.max_steps and (run_dir / "model.pt").is_file():
        print(f"      reusing the trained model in {run_dir}")
    else:
        train(config, resume=bool(done), progress=options.progress)
    return run_dir / "model.pt"


def run_forecast(checkpoint: Path, store: Path, out_dir: Path, options: DemoOptions) -> Path:
    """Stage 3: forecasts from every start date (resumes an interrupted run; replaces the
    forecast of another model or other dates, since the demo owns its output folder)."""
    from weathermodel.inference.forecast import (ForecastOptions, forecast,
                                                 forecast_fingerprint, stored_fingerprint)
    from weathermodel.inference.output import progress_dir

    out = out_dir / "forecast.zarr"
    run = ForecastOptions(checkpoint=str(checkpoint), data=str(store), init=options.init,
                          lead=options.lead, out=str(out), progress=options.progress)
    if out.exists() and stored_fingerprint(out) != forecast_fingerprint(run):
        shutil.rmtree(out)
        shutil.rmtree(progress_dir(out), ignore_errors=True)
    return forecast(run)


def build_climatology(store: Path, out_dir: Path) -> Path:
    """Stage 4: day-of-year x hour climatology of the whole 2013 record, 61-day smoothing."""
    from weathermodel.evaluation.evaluate import make_climatology

    climatology = out_dir / "climatology.nc"
    if not climatology.exists():
        make_climatology(store, climatology, window_days=61)
    return climatology


def run_evaluation(forecast_store: Path, store: Path, climatology: Path,
                   out_dir: Path) -> xr.Dataset:
    """Stage 5: scores of the model and the baselines, spectra and plots."""
    from weathermodel.evaluation.evaluate import evaluate, plot_evaluation

    forecasts = {"graph": str(forecast_store)}
    scores = evaluate(forecasts, store, climatology, out=out_dir / "scores.nc",
                      weighting="edges")
    plot_evaluation(scores, forecasts, store, out_dir / "plots",
                    spectra_out=out_dir / "spectra.nc")
    return scores


def skill_table(scores: xr.Dataset, variable: str | None = None,
                leads_hours: Sequence[int] = SKILL_LEADS_HOURS) -> str:
    """Markdown table of RMSE per system at the given leads, with the model's RMSE relative to
    persistence's ("12 % lower")."""
    variable = variable or next(iter(scores.data_vars))
    rmse = scores[variable].sel(metric="rmse")
    for dim in [d for d in rmse.dims if d not in ("system", "prediction_timedelta")]:
        rmse = rmse.isel({dim: 0})
    systems = [str(s) for s in rmse["system"].values]
    units = scores[variable].attrs.get("units", "")
    header = (f"| lead | " + " | ".join(f"RMSE {s} [{units}]" for s in systems)
              + " | graph vs persistence |")
    lines = [header, "|" + "---|" * (len(systems) + 2)]
    for hours in leads_hours:
        lead = np.timedelta64(hours, "h")
        if lead not in rmse["prediction_timedelta"].values:
            continue
        values = {s: float(rmse.sel(system=s, prediction_timedelta=lead)) for s in systems}
        gain = ""
        if "graph" in values and "persistence" in values:
            change = 100 * (values["graph"] / values["persistence"] - 1)
            gain = f"{abs(change):.0f} % {'lower' if change < 0 else 'higher'}"
        cells = " | ".join("-" if np.isnan(values[s]) else f"{values[s]:.2f}" for s in systems)
        lines.append(f"| {hours} h | {cells} | {gain} |")
    return "\n".join(lines) + "\n"


def run_demo(options: DemoOptions) -> Path:
    """Run the whole path; returns the output folder. See the module docstring."""
    out_dir = Path(options.out_dir)
    if options.fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(5)
    stages.begin(f"prepare the training store from the shipped sample ({SAMPLE_FILE})")
    store = prepare_store(out_dir, options.progress)
    stages.end(str(store))
    if options.use_checkpoint:
        stages.begin("load the checkpoint (no training)")
        checkpoint = (resource_path("checkpoints", SHIPPED_CHECKPOINT)
                      if options.use_checkpoint == "shipped" else Path(options.use_checkpoint))
        if not checkpoint.is_file():
            raise ConfigError("no checkpoint at this path", "give an existing checkpoint or "
                              "'shipped'", path=str(checkpoint))
    else:
        stages.begin("train a small graph model on January-September 2013")
        checkpoint = train_model(store, out_dir, options)
    stages.end(str(checkpoint))
    stages.begin(f"forecast start dates {options.init} to {options.lead}")
    forecast_store = run_forecast(checkpoint, store, out_dir, options)
    stages.end(str(forecast_store))
    stages.begin("climatology of the 2013 reanalysis (61-day window)")
    climatology = build_climatology(store, out_dir)
    stages.end(str(climatology))
    stages.begin("evaluate against the reanalysis, persistence and climatology; plots")
    scores = run_evaluation(forecast_store, store, climatology, out_dir)
    table = skill_table(scores)
    (out_dir / "skill.md").write_text(table)
    stages.end(str(out_dir / "scores.nc"))
    plots = sorted((out_dir / "plots").glob("*.png"))
    print(f"\nweathermodel demo finished in {stages.elapsed() / 60:.1f} min. Outputs in "
          f"{out_dir}:\n  store {store}\n  checkpoint {checkpoint}\n  forecasts "
          f"{forecast_store}\n  scores {out_dir / 'scores.nc'}\n  skill table "
          f"{out_dir / 'skill.md'}\n  plots " + ", ".join(p.name for p in plots))
    print("\nRMSE on October-December 2013 start dates (latitude weights from cell edges):")
    print(table, end="")
    return out_dir


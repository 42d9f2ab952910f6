"""The ``weathermodel`` command: one subcommand per stage of the path."""
from __future__ import annotations

import argparse
import json
import os
import logging
import sys
from typing import Any

from weathermodel import __version__
from weathermodel.errors import WeatherModelError

log = logging.getLogger("weathermodel")


def _add_prepare(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare", help="ingest reanalysis files into a training store",
        description="Read netCDF, GRIB, zarr (paths, globs or URLs), convert to canonical names, "
                    "units and grid order, and write a zarr v3 training store with statistics "
                    "and forcings. Re-running the same command resumes an interrupted run.")
    parser.add_argument("sources", nargs="*", help="input files, globs, zarr stores or URLs")
    parser.add_argument("--config", help="YAML file with PrepareConfig options")
    parser.add_argument("--out", "--output", dest="output", help="training store to write")
    parser.add_argument("--variables", help="comma-separated canonical variables to keep")
    parser.add_argument("--levels", help="comma-separated pressure levels (hPa) to keep")
    parser.add_argument("--start", help="first time to keep (ISO)")
    parser.add_argument("--end", help="last time to keep (ISO)")
    parser.add_argument("--time-step", help="expected time step, e.g. 6h")
    parser.add_argument("--on-gap", choices=["error", "skip"],
                        help="irregular or missing steps: refuse (default) or skip windows")
    parser.add_argument("--max-missing-fraction", type=float,
                        help="largest fraction of NaN values allowed per variable")
    parser.add_argument("--time-block", type=int, help="time steps written per task")
    parser.add_argument("--compressor", choices=["none", "zstd"])
    parser.add_argument("--dask-scheduler", help="address of a dask distributed scheduler")
    parser.add_argument("--statistics-period", metavar="START/END",
                        help="period (inclusive, ISO) of the normalisation statistics, e.g. "
                             "2013-01-01/2013-09-30T18 (default: the whole record)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing store made from other inputs")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help=argparse.SUPPRESS)


def _split_sources_and_overrides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    sources = [s for s in args.sources if "=" not in s or s.startswith(("http", "gs:", "s3:"))]
    overrides = [s for s in args.sources if s not in sources] + list(args.overrides)
    return sources, overrides


def _date_range_flag(value: str | None, flag: str) -> dict[str, str] | None:
    """``START/END`` -> ``{"start": START, "end": END}`` (None when the flag is absent)."""
    from weathermodel.errors import ConfigError

    if value is None:
        return None
    parts = value.split("/")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ConfigError(f"{flag} {value!r} is not of the form START/END",
                          f"write e.g. {flag} 2013-01-01/2013-09-30T18")
    return {"start": parts[0].strip(), "end": parts[1].strip()}


def run_prepare(args: argparse.Namespace) -> int:
    from weathermodel.configuration import dump_config, load_config
    from weathermodel.data.config import PrepareConfig
    from weathermodel.data.prepare import prepare

    sources, overrides = _split_sources_and_overrides(args)
    flag_values = {
        "output": args.output, "start": args.start, "end": args.end,
        "time_step": args.time_step, "on_gap": args.on_gap,
        "max_missing_fraction": args.max_missing_fraction, "time_block": args.time_block,
        "compressor": args.compressor, "dask_scheduler": args.dask_scheduler,
        "variables": args.variables.split(",") if args.variables else None,
        "levels": [float(v) for v in args.levels.split(",")] if args.levels else None,
        "statistics": _date_range_flag(args.statistics_period, "--statistics-period"),
    }
    flag_overrides = [f"{key}={json.dumps(value)}" for key, value in flag_values.items()
                      if value is not None]
    if sources:
        flag_overrides.append(f"sources={json.dumps([{'path': s} for s in sources])}")
    config = load_config(PrepareConfig, args.config, flag_overrides + overrides)
    print("# weathermodel prepare: effective configuration\n" + dump_config(config), flush=True)
    path = prepare(config, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"store complete: {path}")
    return 0


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train a forecaster on a training store",
        description="Train on 1..N processes and nodes (launch under torchrun or srun for "
                    "several). Prints the full configuration, shows progress, logs to CSV and "
                    "TensorBoard in run_dir, and checkpoints atomically.")
    parser.add_argument("--config", required=True, help="YAML file with TrainConfig options")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in run_dir")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="override options, e.g. optim.max_steps=500 data.batch_size=8")


def run_train(args: argparse.Namespace) -> int:
    from weathermodel.configuration import load_config
    from weathermodel.training.config import TrainConfig
    from weathermodel.training.loop import train

    config = load_config(TrainConfig, args.config, list(args.overrides))
    metrics = train(config, resume=args.resume, progress=not args.no_progress)
    for key in sorted(metrics):
        if key.startswith(("train/loss", "val/rmse")):
            print(f"{key}: {metrics[key]:.5g}")
    return 0


def _add_forecast(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "forecast", help="roll a checkpoint out from many start dates into a forecast store",
        description="Autoregressive forecasts from every start date, written lead by lead to a "
                    "WeatherBench-2-style zarr v3 store (or netCDF4). Under torchrun or srun "
                    "each rank takes a share of the start dates. Re-running the same command "
                    "after an interruption continues it.")
    parser.add_argument("--checkpoint", required=True, help="model or training checkpoint")
    parser.add_argument("--data", required=True,
                        help="initial conditions: a training store or a canonical zarr/netCDF")
    parser.add_argument("--init", required=True, help="START or START/END/STEP, or a "
                        "comma-separated list of those, e.g. 2013-10-01/2013-12-31T18/6h")
    parser.add_argument("--lead", required=True, help="forecast length, e.g. 5d or 120h")
    parser.add_argument("--out", required=True,
                        help="output store (or a .nc / .grib2 file with --format)")
    parser.add_argument("--format", dest="output_format", choices=["zarr", "netcdf", "grib"],
                        default="zarr", help="zarr store, netCDF4 file or GRIB2 file")
    parser.add_argument("--members", type=int, default=1, help="ensemble size")
    parser.add_argument("--perturbation", type=float, default=None,
                        help="initial perturbation std of each prognostic channel, in its "
                             "tendency (or --perturbation-scale) standard deviations (default "
                             "0.1, or the --perturbation-file's)")
    _add_perturbation_args(parser)
    parser.add_argument("--perturbation-file", help="perturbation settings written by "
                        "'weathermodel calibrate' (flags given explicitly override them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-unhealthy", choices=["flag", "stop"], default="flag",
                        help="NaN/inf or values far outside training: flag them or stop")
    parser.add_argument("--batch-starts", type=int, default=None, metavar="N",
                        help="start dates rolled out together (default: as many as keep one "
                        "network call's largest tensor under 64 MiB, at most 8 samples)")
    parser.add_argument("--no-progress", action="store_true")


def _add_perturbation_args(parser: argparse.ArgumentParser) -> None:
    """The shape of initial-condition perturbations (forecast and calibrate)."""
    parser.add_argument("--perturbation-length-scale", type=float, metavar="KM",
                        help="correlation length scale of the perturbation fields on the "
                             "sphere, km (default: twice the latitude spacing, >= 250 km)")
    parser.add_argument("--perturbation-scale", choices=["tendency_std", "std"],
                        help="per-channel reference std of the amplitude (default: "
                             "tendency_std)")
    parser.add_argument("--perturbation-pairs", action="store_true", default=None,
                        help="symmetric pairs: members 2k-1 and 2k get +p and -p")
    parser.add_argument("--perturbation-bred-cycles", type=int, metavar="N",
                        help="grow the perturbations as bred vectors over N 6-hour cycles "
                             "before the start date (default 0: random fields)")


def _perturbation_options(args: argparse.Namespace) -> dict[str, Any]:
    """ForecastOptions' perturbation fields: the flags given, else the file's (``--perturbation
    -file``, or for an ensemble without either amplitude flag the ``perturbation.yaml``
    calibrated for the checkpoint in its folder), else defaults."""
    from weathermodel.inference.calibrate import (checkpoint_perturbation,
                                                  perturbation_options,
                                                  read_perturbation_file)
    from weathermodel.inference.perturbations import PerturbationSettings

    file = args.perturbation_file
    if file is None and args.perturbation is None and args.members > 1:
        shipped = checkpoint_perturbation(args.checkpoint)
        if shipped is not None:
            file = shipped[0]
            print(f"initial perturbations: {file} (calibrated for this checkpoint; "
                  "--perturbation or --perturbation-file override it)")
    settings = read_perturbation_file(file) if file else PerturbationSettings()
    flags = {"amplitude": args.perturbation, "length_scale_km": args.perturbation_length_scale,
             "scale": args.perturbation_scale, "symmetric": args.perturbation_pairs,
             "bred_cycles": args.perturbation_bred_cycles}
    chosen = {**vars(settings), **{k: v for k, v in flags.items() if v is not None}}
    settings = PerturbationSettings(**chosen)  # checks the values before anything runs
    return perturbation_options(settings, args.perturbation is not None or bool(file))


def run_forecast(args: argparse.Namespace) -> int:
    from weathermodel.inference.forecast import ForecastOptions, forecast
    from weathermodel.inference.grib import check_checkpoint_for_grib

    if args.output_format == "grib":  # no ecCodes, or a variable without GRIB encoding
        check_checkpoint_for_grib(args.checkpoint)  # refused before anything is computed
    options = ForecastOptions(
        checkpoint=args.checkpoint, data=args.data, init=args.init, lead=args.lead,
        out=args.out, output_format=args.output_format, members=args.members,
        seed=args.seed, on_unhealthy=args.on_unhealthy, batch_starts=args.batch_starts,
        progress=not args.no_progress, **_perturbation_options(args))
    path = forecast(options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"forecast complete: {path}")
    return 0


def _add_calibrate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="choose the ensemble's perturbation amplitude on a validation period",
        description="Run the perturbed-initial-condition ensemble from validation start dates "
                    "and search the perturbation amplitude whose spread-skill ratio (WeatherBench "
                    "2, with the (M+1)/M finite-ensemble correction) is 1 at the chosen lead; "
                    "write it to a perturbation file for 'forecast --perturbation-file'.")
    parser.add_argument("--checkpoint", required=True, help="model or training checkpoint")
    parser.add_argument("--data", required=True, help="validation data: a training store or "
                        "canonical dataset holding the initial conditions and the truth")
    parser.add_argument("--init", required=True, help="validation start dates, START or "
                        "START/END/STEP or a comma-separated list of those, e.g. "
                        "2000-10-01/2000-12-01/10d")
    parser.add_argument("--lead", required=True, help="lead to calibrate at (72h) or a range "
                        "FIRST/LAST (48h/120h)")
    parser.add_argument("--out", required=True, help="perturbation file to write (.yaml/.json)")
    parser.add_argument("--members", type=int, default=8, help="ensemble size (default 8)")
    parser.add_argument("--channels", help="comma-separated channels or variables whose "
                        "spread-skill ratio counts (default: every prognostic channel)")
    parser.add_argument("--amplitude", type=float, default=0.1,
                        help="first trial amplitude, in reference stds (default 0.1)")
    _add_perturbation_args(parser)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="stop when |log SSR| is below this (default 0.05)")
    parser.add_argument("--max-iterations", type=int, default=8,
                        help="most trial amplitudes (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run_calibrate(args: argparse.Namespace) -> int:
    from weathermodel.inference.calibrate import CalibrationOptions, calibrate

    result = calibrate(CalibrationOptions(
        checkpoint=args.checkpoint, data=args.data, init=args.init, lead=args.lead,
        out=args.out, members=args.members, channels=_comma_list(args.channels),
        amplitude=args.amplitude, length_scale_km=args.perturbation_length_scale,
        scale=args.perturbation_scale or "tendency_std",
        symmetric=bool(args.perturbation_pairs),
        bred_cycles=args.perturbation_bred_cycles or 0, tolerance=args.tolerance,
        max_iterations=args.max_iterations, seed=args.seed, progress=not args.no_progress))
    record = result["calibration"]
    for trial in record["trials"]:
        print(f"amplitude {trial['amplitude']:.4g}: spread-skill ratio "
              f"{trial['spread_skill_ratio']:.3f}")
    print(f"chosen amplitude {result['amplitude']:.4g} (length scale "
          f"{result['length_scale_km']:.0f} km): spread-skill ratio "
          f"{record['spread_skill_ratio']:.3f} at {args.lead}"
          + ("" if record["converged"] else " (not within the tolerance)"))
    print(f"perturbation file written: {args.out}")
    return 0


def _add_evaluate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score forecast stores and baselines against a truth (WeatherBench 2)",
        description="Score forecast stores (zarr or netCDF, WeatherBench 2 layout) and the "
                    "persistence and climatology baselines against a training store or a "
                    "canonical dataset, with WeatherBench 2 conventions (area-weighted; RMSE = "
                    "sqrt of the time mean of the MSE; ACC against the climatology). Prints RMSE "
                    "and ACC per variable, level, region and lead; writes every score to --out.")
    parser.add_argument("forecasts", nargs="+", metavar="[NAME=]PATH",
                        help="forecast stores; NAME defaults to the file name")
    parser.add_argument("--truth", required=True,
                        help="training store or canonical dataset (zarr, netCDF)")
    parser.add_argument("--climatology",
                        help="climatology from 'weathermodel climatology' (ACC, climatology "
                             "baseline)")
    parser.add_argument("--baselines", default="persistence,climatology",
                        help="comma-separated baselines, or 'none' (default: %(default)s)")
    parser.add_argument("--regions", help="comma-separated regions, e.g. global,tropics,"
                                          "extra_tropics_nh,north_america (default: whole grid)")
    parser.add_argument("--weighting", choices=["auto", "wb2_edges", "edges", "cos"],
                        default="auto",
                        help="latitude weights: wb2_edges (WeatherBench 2's), edges (exact "
                             "cell areas), cos; auto (default): wb2_edges on global grids, "
                             "edges on regional ones")
    _add_selection_args(parser, "first initialisation time to score (ISO)",
                        "last initialisation time to score (ISO)")
    parser.add_argument("--skipna", action="store_true",
                        help="leave missing values out of the means (default: NaN propagates)")
    parser.add_argument("--out", help="write the scores to this file (.nc) or zarr store")
    parser.add_argument("--table-metrics", default="rmse,acc",
                        help="metrics printed in the table (default: %(default)s)")
    parser.add_argument("--plots", metavar="DIR",
                        help="also write PNG plots into DIR: lead-time curves, scorecards "
                             "against persistence, zonal energy spectra and maps")


def _add_selection_args(parser: argparse.ArgumentParser, start_help: str,
                        end_help: str) -> None:
    """--variables, --start, --end and --dask-scheduler, shared by the scoring commands."""
    parser.add_argument("--variables", help="comma-separated variables (default: all)")
    parser.add_argument("--start", help=start_help)
    parser.add_argument("--end", help=end_help)
    parser.add_argument("--dask-scheduler", help="address of a dask distributed scheduler")


def _comma_list(text: str | None) -> list[str] | None:
    return [item for item in text.split(",") if item] if text else None


def run_evaluate(args: argparse.Namespace) -> int:
    from weathermodel.evaluation.evaluate import (evaluate, named_forecasts, plot_evaluation,
                                                  score_table)

    baselines = [] if args.baselines.lower() in ("", "none") else _comma_list(args.baselines)
    forecasts = named_forecasts(args.forecasts)
    scores = evaluate(forecasts, args.truth, args.climatology,
                      baselines=baselines, regions=_comma_list(args.regions), out=args.out,
                      weighting=args.weighting, variables=_comma_list(args.variables),
                      start=args.start, end=args.end, skipna=args.skipna,
                      scheduler=args.dask_scheduler)
    print(score_table(scores, metrics=_comma_list(args.table_metrics) or ["rmse"]), end="")
    if args.out:
        print(f"scores written: {args.out}")
    if args.plots:
        paths = plot_evaluation(scores, forecasts, args.truth, args.plots, start=args.start,
                                end=args.end, scheduler=args.dask_scheduler)
        print(f"{len(paths)} plots written: {args.plots}")
    return 0


def _add_climatology(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "climatology", help="day-of-year x hour climatology of a truth (for ACC and baselines)",
        description="Mean by day of year and hour of day of a training store or canonical "
                    "dataset, optionally smoothed over neighbouring days (WeatherBench 2 "
                    "layout: dayofyear, hour, [level], latitude, longitude).")
    parser.add_argument("truth", help="training store or canonical dataset")
    parser.add_argument("--out", required=True, help="climatology to write (.nc or zarr)")
    parser.add_argument("--window-days", type=int, default=None,
                        help="odd smoothing window in days (WeatherBench 2 uses 61; default: "
                             "no smoothing)")
    _add_selection_args(parser, "first time to use (ISO)", "last time to use (ISO)")


def run_climatology(args: argparse.Namespace) -> int:
    from weathermodel.evaluation.evaluate import make_climatology

    climatology = make_climatology(args.truth, args.out, window_days=args.window_days,
                                   start=args.start, end=args.end,
                                   variables=_comma_list(args.variables),
                                   scheduler=args.dask_scheduler)
    sizes = ", ".join(f"{dim}={size}" for dim, size in climatology.sizes.items())
    print(f"climatology written: {args.out} ({sizes})")
    return 0


def _add_inspect(subparsers: Any) -> None:
    parser = subparsers.add_parser("inspect", help="print the metadata of a training store")
    parser.add_argument("store")


def run_inspect(args: argparse.Namespace) -> int:
    from weathermodel.data.store import open_store

    ds = open_store(args.store, require_complete=False)
    metadata = ds.attrs["weathermodel"]
    print(ds)
    summary = {k: metadata[k] for k in ("complete", "channels", "grid", "time_step_seconds",
                                         "time_range", "n_times", "n_members", "gaps")
               if k in metadata}
    print(json.dumps(summary, indent=1))
    return 0


def _add_plan(subparsers: Any) -> None:
    from weathermodel.plan import add_plan_arguments

    add_plan_arguments(subparsers.add_parser(
        "plan", help="predict peak memory per device of training and forecasting",
        description="Predict the peak memory per device of a training step and of a forecast "
                    "step from a training configuration and its store's grid (or --grid), "
                    "print the assumptions, and recommend batch size, activation "
                    "checkpointing and edge chunks that fit the device."))


def run_plan(args: argparse.Namespace) -> int:
    from weathermodel.plan import run_plan_command

    return run_plan_command(args)


def _add_demo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="the whole path on the shipped 2013 NCEP sample, reanalysis to scorecard",
        description="Prepare the shipped sample, train a small graph model on January-September "
                    "2013 (or load a checkpoint), forecast October-December to 5 days, score "
                    "it against the reanalysis, persistence and climatology, and write the "
                    "scorecard, plots and maps. Re-running continues an interrupted demo.")
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: "
                                                              "%(default)s)")
    parser.add_argument("--use-checkpoint", nargs="?", const="shipped", default=None,
                        metavar="PATH", help="skip training: forecast with the shipped "
                                             "checkpoint, or with PATH")
    parser.add_argument("--train-steps", type=int, help="optimizer steps of the demo training")
    parser.add_argument("--init", default="2013-10-01/2013-12-26T12/12h",
                        help="start dates START/END/STEP (default: %(default)s)")
    parser.add_argument("--lead", default="5d", help="forecast length (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="overrides of the training configuration")


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weathermodel.demo import DemoOptions, run_demo as demo

    demo(DemoOptions(out_dir=Path(args.out), use_checkpoint=args.use_checkpoint,
                     train_steps=args.train_steps, init=args.init, lead=args.lead,
                     overrides=tuple(args.overrides), fresh=args.fresh,
                     progress=not args.no_progress))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weathermodel",
                                     description="Data-driven weather prediction, reanalysis "
                                                 "to scorecard.")
    parser.add_argument("--version", action="version", version=f"weathermodel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (conversions)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prepare(subparsers)
    _add_train(subparsers)
    _add_forecast(subparsers)
    _add_calibrate(subparsers)
    _add_evaluate(subparsers)
    _add_climatology(subparsers)
    _add_inspect(subparsers)
    _add_demo(subparsers)
    _add_plan(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "prepare":
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"prepare": run_prepare, "train": run_train, "forecast": run_forecast,
                "calibrate": run_calibrate,
                "evaluate": run_evaluate, "climatology": run_climatology,
                "inspect": run_inspect, "demo": run_demo}
    handlers["plan"] = run_plan
    from weathermodel.errors import is_storage_error, storage_error

    # what survives a failed write, and how to carry on, per command
    kept = {"prepare": "the blocks written so far are kept: run the same command again to "
                       "resume the store",
            "train": "the checkpoints written so far are kept: run the same command with "
                     "--resume to continue from the newest",
            "forecast": "the start dates finished so far are kept: run the same command again "
                        "to resume the forecast",
            "evaluate": "a previous output at that path is replaced only by a complete one: "
                        "run the same command again",
            "climatology": "a previous output at that path is replaced only by a complete one: "
                           "run the same command again",
            "demo": "every finished stage is kept: run the same command again to continue"}.get(
        args.command, "run the same command again once there is room")
    try:
        return handlers[args.command](args)
    except WeatherModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, file-size limit, read-only or forbidden path
        if not is_storage_error(error):
            raise
        output = getattr(args, "output", None) or getattr(args, "out", None)
        print(f"error: {storage_error(error, output, kept)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

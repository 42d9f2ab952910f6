"""Seconds and peak memory to score a year of 1-degree forecasts at 10 leads: our
``weathermodel.evaluation.evaluate`` next to WeatherBench 2's evaluation of the same files, in
the same run; and our scores checked equal to WB2's to 1e-6 relative.

Data (synthetic but realistic, written to a temporary folder, removed afterwards):

* grid: 1 degree, 181 latitudes ascending -90..90 (WB2's convention; both sides would flip a
  descending axis) x 360 longitudes 0..359;
* variables: ``2m_temperature`` (K) and ``geopotential`` at 500 hPa (m2 s-2): a seasonal and
  diurnal cycle, travelling planetary waves and noise;
* forecast (WB2 layout, zarr v2 with consolidated metadata, float32, one init time per chunk):
  dims (time, prediction_timedelta, [level], latitude, longitude); ``--inits`` initialisation
  times 12-hourly (00 and 12 UTC) from 2020-01-01 (default 732: the year 2020; ``--quick``:
  62, one month), leads 1..10 days; the forecast is the truth at the valid time plus a
  lead-dependent bias and noise that grows with the lead;
* truth (zarr v2, float32, one time per chunk): 6-hourly, covering every init + lead;
* climatology (WB2 layout: hour 0/6/12/18 x dayofyear 1..366, float32): the noise-free seasonal
  and diurnal part of the truth.

Each evaluation runs in its own fresh child process of the WB2 environment (.venv-wb2: the
same numpy, xarray, dask and zarr for both); the timer starts after the imports and stops when
the scores are in memory, and the peak RSS is the child's VmHWM from /proc/self/status (not
ru_maxrss, which survives fork+exec). Timed code paths:

* ours: ``weathermodel.evaluation.evaluate.evaluate({"bench": FORECAST}, TRUTH, CLIMATOLOGY,
  baselines=[], weighting="wb2_edges")``: mse, rmse, rmse_sqrt_before_time_avg, mae, bias, acc
  in one dask graph on the local threaded scheduler;
* WB2: ``weatherbench2.evaluation.evaluate_in_memory(config.Data(...), {"deterministic":
  config.Eval(metrics={mse: MSE(), rmse_sqrt_before_time_avg: RMSESqrtBeforeTimeAvg(),
  mae: MAE(), bias: Bias(), acc: ACC(climatology)})})``, by_init=True: WB2's in-memory path
  (its ``open_forecast_and_truth_datasets`` with dask, each ``Metric.compute``, results written
  to a netCDF that the child reads back), as its ``scripts/evaluate.py --use_beam=False`` runs it.
  WB2 has no RMSE metric: its RMSE is sqrt(MSE), compared with our ``rmse``.

Prints both times and peaks, ``RATIO eval_time_ours_over_wb2 <x>``,
``RATIO eval_peak_rss_ours_over_wb2 <x>`` (absolute VmHWM; below 1: ours is faster / smaller),
and per metric the max relative difference over variables and leads; exits 1 if any exceeds
``--rtol`` (1e-6).

    bash benchmarks/setup_wb2_env.sh                        # once
    .venv/bin/python benchmarks/bench_evaluate_vs_wb2.py --quick   # a month, a few minutes
    .venv/bin/python benchmarks/bench_evaluate_vs_wb2.py           # the year

Without the WB2 environment it says so and exits 0 without a RATIO line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = "benchmarks/setup_wb2_env.sh"
MISSING = (f"SKIP: WeatherBench 2 is not installed: run `bash {SETUP}` (it makes .venv-wb2), "
           "then run this benchmark again")
RESULT_TAG = "RESULT_JSON "
VARIABLES = ("2m_temperature", "geopotential")
LEVEL = 500
METRICS = ("mse", "rmse", "rmse_sqrt_before_time_avg", "mae", "bias", "acc")
LEADS_DAYS = tuple(range(1, 11))


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------
def _fields(times, lat, lon, noise_rng=None):
    """Truth (noise_rng given) or climatology (noise_rng None) of both variables at ``times``
    (pandas DatetimeIndex): dict name -> (n_times, n_lat, n_lon) float32."""
    import numpy as np

    phi = np.deg2rad(lat)[None, :, None]
    lam = np.deg2rad(lon)[None, None, :]
    day = np.asarray(times.day_of_year, dtype=np.float64)[:, None, None]
    hour = np.asarray(times.hour, dtype=np.float64)[:, None, None]
    season = np.cos(2 * np.pi * (day - 200.0) / 365.25)
    diurnal = np.cos(2 * np.pi * hour / 24.0 + lam)
    t2m = 288.0 - 45.0 * np.sin(phi) ** 2 + 12.0 * season * np.sin(phi) + 3.0 * np.cos(phi) * \
        diurnal
    z500 = 9.80665 * (5800.0 - 500.0 * np.sin(phi) ** 2 + 80.0 * season * np.sin(phi))
    if noise_rng is not None:  # travelling waves (days since 2020-01-01) and noise
        days = np.asarray((times - times[0]).total_seconds() / 86400.0)[:, None, None]
        wave = np.cos(phi) ** 2 * (np.sin(5 * lam - 0.8 * days) + 0.5 * np.sin(3 * lam + 0.3 * days
                                                                                 + 2 * phi))
        t2m = t2m + 4.0 * wave + noise_rng.standard_normal(wave.shape, dtype=np.float32)
        z500 = z500 + 900.0 * wave + 50.0 * noise_rng.standard_normal(wave.shape,
                                                                      dtype=np.float32)
    shape = (len(times), lat.size, lon.size)
    return {"2m_temperature": np.broadcast_to(t2m, shape).astype(np.float32),
            "geopotential": np.broadcast_to(z500, shape).astype(np.float32)}


def _dataset(arrays, coords, leading, attrs=None):
    """Dataset of 2m_temperature (leading..., lat, lon) and geopotential (leading..., level,
    lat, lon) at level 500."""
    import xarray as xr

    units = {"2m_temperature": "K", "geopotential": "m2 s-2"}
    variables = {}
    for name, values in arrays.items():
        if name == "geopotential":
            variables[name] = ((*leading, "level", "latitude", "longitude"),
                               values[..., None, :, :], {"units": units[name]})
        else:
            variables[name] = ((*leading, "latitude", "longitude"), values, {"units": units[name]})
    return xr.Dataset(variables, coords={**coords, "level": ("level", [LEVEL], {"units": "hPa"})},
                      attrs=attrs or {})


def make_data(root: Path, n_inits: int, batch: int = 24) -> dict:
    """Write forecast, truth and climatology zarr stores under ``root``; returns their paths
    and sizes."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    lat = np.linspace(-90.0, 90.0, 181)
    lon = np.arange(360.0)
    inits = pd.date_range("2020-01-01", periods=n_inits, freq="12h")
    leads = pd.to_timedelta(list(LEADS_DAYS), unit="D")
    truth_times = pd.date_range(inits[0], inits[-1] + leads[-1], freq="6h")
    space = {"latitude": lat, "longitude": lon}
    paths = {"forecast": root / "forecast.zarr", "truth": root / "truth.zarr",
             "climatology": root / "climatology.zarr"}

    truth = {name: np.empty((len(truth_times), lat.size, lon.size), np.float32)
             for name in VARIABLES}
    for start in range(0, len(truth_times), 64):  # batches: bounded float64 temporaries
        for name, values in _fields(truth_times[start:start + 64], lat, lon, rng).items():
            truth[name][start:start + 64] = values
    truth_ds = _dataset(truth, {"time": truth_times, **space}, ("time",))
    truth_ds.chunk({"time": 1}).to_zarr(paths["truth"], mode="w", zarr_format=2,
                                        consolidated=True)
    position = pd.Index(truth_times)
    lead_bias = {"2m_temperature": 0.05, "geopotential": 4.0}  # per day of lead
    lead_sigma = {"2m_temperature": 0.4, "geopotential": 40.0}  # per sqrt(day) of lead
    lead_days = np.asarray(LEADS_DAYS, dtype=np.float32)[None, :, None, None]
    for start in range(0, n_inits, batch):
        chunk_inits = inits[start:start + batch]
        valid = (chunk_inits.values[:, None] + leads.values[None, :]).ravel()
        index = position.get_indexer(valid)
        arrays = {}
        for name, values in truth.items():
            at_valid = values[index].reshape(len(chunk_inits), len(leads), lat.size, lon.size)
            error = lead_bias[name] * lead_days + lead_sigma[name] * np.sqrt(lead_days) * \
                rng.standard_normal(at_valid.shape, dtype=np.float32)
            arrays[name] = (at_valid + error).astype(np.float32)
        forecast = _dataset(arrays, {"time": chunk_inits, "prediction_timedelta": leads, **space},
                            ("time", "prediction_timedelta"))
        forecast = forecast.chunk({"time": 1})
        if start == 0:
            forecast.to_zarr(paths["forecast"], mode="w", zarr_format=2, consolidated=True)
        else:
            forecast.to_zarr(paths["forecast"], append_dim="time", zarr_format=2,
                             consolidated=True)
    del truth

    # climatology, WB2 layout: (hour, dayofyear, [level], latitude, longitude)
    slots = pd.DatetimeIndex([pd.Timestamp("2020-01-01") + pd.Timedelta(days=d, hours=h)
                              for h in (0, 6, 12, 18) for d in range(366)])
    clim = {name: values.reshape(4, 366, lat.size, lon.size)
            for name, values in _fields(slots, lat, lon).items()}
    clim_ds = _dataset(clim, {"hour": [0, 6, 12, 18], "dayofyear": np.arange(1, 367), **space},
                       ("hour", "dayofyear"))
    clim_ds.chunk({"hour": -1, "dayofyear": 8}).to_zarr(paths["climatology"], mode="w",
                                                        zarr_format=2, consolidated=True)

    def disk(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    n_values = n_inits * len(LEADS_DAYS) * len(VARIABLES) * lat.size * lon.size
    return {"paths": {k: str(v) for k, v in paths.items()}, "n_inits": n_inits,
            "first_init": str(inits[0]), "last_init": str(inits[-1]),
            "n_truth_times": len(truth_times), "forecast_gib": n_values * 4 / 2**30,
            "forecast_disk_gib": disk(paths["forecast"]) / 2**30,
            "truth_disk_gib": disk(paths["truth"]) / 2**30,
            "climatology_disk_gib": disk(paths["climatology"]) / 2**30}


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(field + ":")))


def _squeezed(array) -> list[float]:
    """(lead[, level=1]) -> list over leads."""
    if "level" in array.dims:
        array = array.sel(level=LEVEL)
    return [float(v) for v in array.values]


def _import_ours() -> None:
    import logging

    logging.disable(logging.WARNING)
    import weathermodel.evaluation.evaluate  # noqa: F401


def _child_ours(data: dict) -> tuple[float, dict]:
    from weathermodel.evaluation.evaluate import evaluate

    paths = data["paths"]
    begin = time.perf_counter()
    scores = evaluate({"bench": paths["forecast"]}, paths["truth"], paths["climatology"],
                      baselines=[], weighting="wb2_edges")
    seconds = time.perf_counter() - begin
    scores = scores.sel(system="bench")
    n_pairs = [int(v) for v in scores["n_pairs"].values]
    values = {m: {v: _squeezed(scores[v].sel(metric=m)) for v in VARIABLES} for m in METRICS}
    return seconds, {"scores": values, "n_pairs": n_pairs}


def _import_wb2() -> None:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import weatherbench2.evaluation  # noqa: F401  (imports apache_beam, xarray_beam)


def _child_wb2(data: dict, out_dir: str) -> tuple[float, dict]:
    import numpy as np
    import xarray as xr
    from weatherbench2 import config, evaluation, metrics

    paths = data["paths"]
    begin = time.perf_counter()
    climatology = evaluation.make_latitude_increasing(xr.open_zarr(paths["climatology"]))
    data_config = config.Data(
        selection=config.Selection(variables=list(VARIABLES), levels=[LEVEL],
                                   time_slice=slice(data["first_init"], data["last_init"])),
        paths=config.Paths(forecast=paths["forecast"], obs=paths["truth"], output_dir=out_dir,
                           climatology=paths["climatology"]),
        by_init=True)
    eval_configs = {"deterministic": config.Eval(metrics={
        "mse": metrics.MSE(), "rmse_sqrt_before_time_avg": metrics.RMSESqrtBeforeTimeAvg(),
        "mae": metrics.MAE(), "bias": metrics.Bias(),
        "acc": metrics.ACC(climatology=climatology)})}
    evaluation.evaluate_in_memory(data_config, eval_configs)
    result = xr.load_dataset(os.path.join(out_dir, "deterministic.nc"))
    seconds = time.perf_counter() - begin
    values = {}
    for metric in METRICS:
        source = "mse" if metric == "rmse" else metric
        values[metric] = {}
        for name in VARIABLES:
            series = _squeezed(result[name].sel(metric=source))
            values[metric][name] = list(np.sqrt(series)) if metric == "rmse" else series
    return seconds, {"scores": values}


def child_main(which: str, data_json: str, out_dir: str) -> None:
    data = json.loads(Path(data_json).read_text())
    _import_ours() if which == "ours" else _import_wb2()
    before_kib = _status_kib("VmRSS")
    if which == "ours":
        seconds, result = _child_ours(data)
    else:
        seconds, result = _child_wb2(data, out_dir)
    result.update(seconds=seconds, peak_kib=_status_kib("VmHWM"), rss_before_kib=before_kib)
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(python: str, which: str, data_json: Path, out_dir: Path, timeout: int) -> dict:
    """One evaluation in a fresh process; imports happen before the child's timer starts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    result = subprocess.run([python, str(Path(__file__).resolve()), "--child", which,
                             "--data-json", str(data_json), "--out-dir", str(out_dir)],
                            capture_output=True, text=True, timeout=timeout, cwd=out_dir)
    wall = time.perf_counter() - wall
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise RuntimeError(f"the {which} evaluation failed (exit {result.returncode})")
    line = next(ln for ln in reversed(result.stdout.splitlines()) if ln.startswith(RESULT_TAG))
    parsed = json.loads(line[len(RESULT_TAG):])
    parsed["process_seconds"] = wall
    return parsed


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------
def find_wb2_python(explicit: str | None) -> str | None:
    """A Python that imports both weatherbench2.evaluation and weathermodel, else None."""
    candidates = [explicit, os.environ.get("WB2_PYTHON"), str(ROOT / ".venv-wb2" / "bin" /
                                                                "python"), sys.executable]
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import warnings; warnings.simplefilter('ignore');"
                                "import weatherbench2.evaluation, weathermodel.evaluation"],
                               capture_output=True, text=True, cwd=tempfile.gettempdir())
        if probe.returncode == 0:
            return python
        if python == explicit:
            print(f"{python} cannot import weatherbench2.evaluation and weathermodel:\n"
                  f"{probe.stderr[-1500:]}", file=sys.stderr)
    return None


def relative_differences(ours: dict, wb2: dict) -> dict[str, float]:
    """Per metric, max over variables and leads of |ours - wb2| / |wb2|."""
    import numpy as np

    worst = {}
    for metric in METRICS:
        diffs = []
        for name in VARIABLES:
            a, b = np.asarray(ours[metric][name]), np.asarray(wb2[metric][name])
            if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
                diffs.append(np.inf)
                continue
            diffs.append(float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))))
        worst[metric] = max(diffs)
    return worst


def _mib(kib: int) -> float:
    return kib / 1024.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one month of init times (62) instead of the year (732)")
    parser.add_argument("--inits", type=int, help="number of 12-hourly init times (overrides)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each side, alternating ours, wb2, wb2, ours, ...; the "
                             "median time and peak are reported")
    parser.add_argument("--rtol", type=float, default=1e-6,
                        help="largest relative difference of any score allowed")
    parser.add_argument("--wb2-python", help="Python of the WB2 environment (default "
                                             ".venv-wb2/bin/python, then $WB2_PYTHON)")
    parser.add_argument("--tmp", help="folder for the data (default: the system's temp)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per child")
    parser.add_argument("--child", choices=("ours", "wb2"), help=argparse.SUPPRESS)
    parser.add_argument("--data-json", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.data_json, args.out_dir)
        return 0

    python = find_wb2_python(args.wb2_python)
    if python is None:
        print(MISSING)
        return 0
    n_inits = args.inits or (62 if args.quick else 732)
    root = Path(tempfile.mkdtemp(prefix="bench_eval_wb2_", dir=args.tmp))
    try:
        begin = time.perf_counter()
        data = make_data(root, n_inits)
        data_json = root / "data.json"
        data_json.write_text(json.dumps(data))
        print(f"data: {n_inits} init times 12-hourly {data['first_init'][:16]}.."
              f"{data['last_init'][:16]} x {len(LEADS_DAYS)} leads (1..10 days) x "
              f"{len(VARIABLES)} variables ({', '.join(VARIABLES[:1])}, {VARIABLES[1]} "
              f"{LEVEL} hPa) on 181 x 360 (1 degree), float32: forecast "
              f"{data['forecast_gib']:.2f} GiB in memory, {data['forecast_disk_gib']:.2f} GiB "
              f"on disk (zarr v2, one init per chunk); truth 6-hourly, "
              f"{data['n_truth_times']} times, {data['truth_disk_gib']:.2f} GiB; climatology "
              f"{data['climatology_disk_gib']:.2f} GiB; written in "
              f"{time.perf_counter() - begin:.0f} s", flush=True)
        print(f"python: {python} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
              f", {os.cpu_count()} CPUs; dask's default threaded scheduler on both sides)",
              flush=True)
        order = []
        for i in range(args.repeat):
            order += ["ours", "wb2"] if i % 2 == 0 else ["wb2", "ours"]
        runs: dict[str, list[dict]] = {"ours": [], "wb2": []}
        for i, which in enumerate(order):
            try:
                result = run_child(python, which, data_json, root / f"out_{which}_{i}",
                                   args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                print(f"FAIL: {error}")
                return 1
            runs[which].append(result)
            peak, before = _mib(result["peak_kib"]), _mib(result["rss_before_kib"])
            print(f"{'ours' if which == 'ours' else 'WB2 ':4s}: {result['seconds']:8.2f} s "
                  f"evaluating ({result['process_seconds']:.1f} s with start-up), peak RSS "
                  f"{peak:8.1f} MiB (VmHWM; {before:.0f} MiB after imports, "
                  f"+{peak - before:.0f} MiB while evaluating)", flush=True)

        def median(which: str, key: str) -> float:
            import statistics

            return statistics.median(r[key] for r in runs[which])

        time_ratio = median("ours", "seconds") / median("wb2", "seconds")
        peak_ratio = median("ours", "peak_kib") / median("wb2", "peak_kib")
        growth = [median(w, "peak_kib") - median(w, "rss_before_kib") for w in ("ours", "wb2")]
        pairs = n_inits * len(LEADS_DAYS)
        print(f"throughput: ours {pairs / median('ours', 'seconds'):.1f}, WB2 "
              f"{pairs / median('wb2', 'seconds'):.1f} (init, lead) pairs per second "
              f"({len(VARIABLES)} variables, {len(METRICS)} metrics)")
        print(f"RATIO eval_time_ours_over_wb2 {time_ratio:.3f} (ours "
              f"{median('ours', 'seconds'):.1f} s, WB2 {median('wb2', 'seconds'):.1f} s, "
              f"{n_inits} inits x {len(LEADS_DAYS)} leads; below 1: ours faster)")
        print(f"RATIO eval_peak_rss_ours_over_wb2 {peak_ratio:.3f} (VmHWM ours "
              f"{_mib(median('ours', 'peak_kib')):.0f} MiB, WB2 "
              f"{_mib(median('wb2', 'peak_kib')):.0f} MiB; growth while evaluating "
              f"{_mib(growth[0]):.0f} vs {_mib(growth[1]):.0f} MiB)")

        ours, wb2 = runs["ours"][0], runs["wb2"][0]
        expected_pairs = [n_inits] * len(LEADS_DAYS)
        if ours["n_pairs"] != expected_pairs:
            print(f"FAIL: ours scored {ours['n_pairs']} init times per lead, expected "
                  f"{n_inits}")
            return 1
        worst = relative_differences(ours["scores"], wb2["scores"])
        failed = [m for m, d in worst.items() if not d <= args.rtol]
        print(f"metric agreement with WB2 (max relative difference over {len(VARIABLES)} "
              f"variables x {len(LEADS_DAYS)} leads; tolerance {args.rtol:g}):")
        for metric, diff in worst.items():
            wb2_name = {"rmse": "sqrt(MSE)", "mse": "MSE", "rmse_sqrt_before_time_avg":
                        "RMSESqrtBeforeTimeAvg", "mae": "MAE", "bias": "Bias",
                        "acc": "ACC"}[metric]
            print(f"  {metric:26s} vs WB2 {wb2_name:22s} {diff:.3e}"
                  f"{'  FAIL' if metric in failed else ''}")
        for name in VARIABLES:
            print(f"  e.g. {name}: rmse day 1 / day 10 ours {ours['scores']['rmse'][name][0]:.6g}"
                  f" / {ours['scores']['rmse'][name][-1]:.6g}, WB2 "
                  f"{wb2['scores']['rmse'][name][0]:.6g} / {wb2['scores']['rmse'][name][-1]:.6g};"
                  f" acc day 10 ours {ours['scores']['acc'][name][-1]:.6g}, WB2 "
                  f"{wb2['scores']['acc'][name][-1]:.6g}")
        if failed:
            print(f"FAIL: {', '.join(failed)} differ from WB2 by more than {args.rtol:g}")
            return 1
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

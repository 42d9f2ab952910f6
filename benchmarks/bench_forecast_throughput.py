"""Forecast throughput of the demo's forecast, old path vs new path, measured in one run.

The demo's model (``checkpoints/ncep_graph_2013``) forecasts from the demo's store (the
shipped NCEP sample prepared as ``weathermodel demo`` does; built under ``outputs/`` when
missing). Two settings of the same code, through :class:`ForecastOptions`:

* ``old``: one start date per batch, each lead written in the rolling thread (what
  ``weathermodel forecast`` did before batching and background writes);
* ``new``: the defaults (automatic ``batch_starts``, 8 start dates per batch for the demo's
  graph; writes on a background thread overlapping the next step; computed forcings once per
  valid time on the device; health statistics without a sync per channel, in both).

With ``--reference-revision REV`` (e.g. the commit before the forecast and graph-network
speed work), a third variant ``reference`` runs the same forecast with the package as it was at
that revision (a temporary ``git worktree``, first on ``PYTHONPATH``), so the speed-up of all
changes together (forecast loop and network) is measured in the same run.

Each forecast runs in a fresh process (peak RSS from VmHWM), old and new interleaved,
``--repeats`` times; it prints the median steps/s (start dates x leads / seconds of the
``forecast`` call) of each and their ratio, then the peak memory of each at two lead counts to
show that memory stays flat in lead time.

    .venv/bin/python benchmarks/bench_forecast_throughput.py [--starts 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CHECKPOINT = PROJECT / "checkpoints" / "ncep_graph_2013" / "model.pt"

_CHILD = """
import json, sys, time
import torch
from weathermodel.inference.forecast import ForecastOptions, forecast
checkpoint, data, init, lead, out, batch, overlap = sys.argv[1:8]
speed = {} if batch == "reference" else {
    "batch_starts": None if batch == "auto" else int(batch), "overlap_writes": overlap == "1"}
options = ForecastOptions(checkpoint=checkpoint, data=data, init=init, lead=lead, out=out,
                          progress=False, **speed)
begin = time.perf_counter()
forecast(options)
seconds = time.perf_counter() - begin
with open("/proc/self/status") as status:
    peak_kib = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
print(json.dumps({"peak_kib": peak_kib, "seconds": seconds,
                  "threads": torch.get_num_threads()}))
"""



def demo_store(out_dir: Path) -> Path:
    """The demo's training store (``weathermodel demo`` stage 1), reused when complete."""
    from weathermodel.demo import prepare_store

    return Path(prepare_store(out_dir, progress=False))


def run_forecast_child(child: str, arguments: list[str], out: Path,
                       package_root: Path | None = None) -> dict:
    """Run the ``child`` script (a forecast into ``out``, printing a JSON line last) in a
    fresh process; ``package_root``: import weathermodel from there. ``out`` is removed
    before and after."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".progress"), ignore_errors=True)
    env = dict(os.environ)
    if package_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")])
    # -P: without it ``python -c`` puts the working directory first on sys.path, and run from
    # the repository root the "reference" child would import the current package instead
    result = subprocess.run([sys.executable, "-P", "-c", child, *arguments], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_child(store: Path, init: str, lead: str, out: Path, batch: str, overlap: str,
              package_root: Path | None = None) -> dict:
    """One forecast of the demo's checkpoint in a fresh process."""
    return run_forecast_child(_CHILD, [str(CHECKPOINT), str(store), init, lead, str(out), batch,
                                       overlap], out, package_root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=16, help="start dates (12-hourly from "
                        "2013-10-01, as the demo's)")
    parser.add_argument("--lead", default="5d", help="forecast length (the demo's: 5d)")
    parser.add_argument("--batch-starts", type=int, default=None,
                        help="start dates per batch of the new path (default: the default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-leads", default="1d,10d",
                        help="two lead counts whose peak memory is compared")
    parser.add_argument("--out-dir", default=str(PROJECT / "outputs" / "bench_forecast"))
    parser.add_argument("--reference-revision", default=None,
                        help="also time the package at this git revision (all speed changes "
                        "since then together)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_dir = Path(args.out_dir)
    os.environ.setdefault("WEATHERMODEL_CACHE", str(out_dir / "cache"))
    store = demo_store(out_dir)
    from weathermodel.inference.forecast import lead_steps

    batch = str(args.batch_starts or "auto")
    modes = {"old": ("1", "0"), "new": (batch, "1")}
    roots: dict[str, Path | None] = {name: None for name in modes}
    if args.reference_revision:
        reference_tree = out_dir / "reference_tree"
        subprocess.run(["git", "-C", str(PROJECT), "worktree", "remove", "--force",
                        str(reference_tree)], capture_output=True)
        subprocess.run(["git", "-C", str(PROJECT), "worktree", "add", "--detach",
                        str(reference_tree), args.reference_revision], check=True,
                       capture_output=True)
        modes["reference"] = ("reference", "0")
        roots["reference"] = reference_tree
    last = f"2013-10-01T00 + {args.starts - 1} x 12h"
    import numpy as np

    end = np.datetime64("2013-10-01T00") + np.timedelta64(12 * (args.starts - 1), "h")
    init = f"2013-10-01T00/{str(end)[:13]}/12h"
    steps = args.starts * lead_steps(args.lead, 6 * 3600)
    print(f"demo forecast: {CHECKPOINT.parent.name}, store {store}, {args.starts} start dates "
          f"({last}) x {args.lead} = {steps} model steps; OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}; new path: batch_starts={batch}, background writes")
    rates: dict[str, list[float]] = {name: [] for name in modes}
    peaks: dict[str, list[float]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        run_child(store, init.split("/")[0], "6h", Path(tmp) / "warm.zarr", "1", "0")  # cache
        for repeat in range(args.repeats):
            for name, (batch_starts, overlap) in modes.items():
                result = run_child(store, init, args.lead, Path(tmp) / f"{name}.zarr",
                                   batch_starts, overlap, roots[name])
                rates[name].append(steps / result["seconds"])
                peaks[name].append(result["peak_kib"] / 1024)
                print(f"  repeat {repeat + 1} {name}: {result['seconds']:.2f} s, "
                      f"{rates[name][-1]:.1f} steps/s, peak RSS {peaks[name][-1]:.0f} MiB",
                      flush=True)
        median = {name: statistics.median(values) for name, values in rates.items()}
        print(f"old (batch 1, no overlap): median {median['old']:.1f} steps/s")
        print(f"new (batch {batch}, overlap): median {median['new']:.1f} steps/s")
        print(f"RATIO forecast_steps_per_s_new_vs_old {median['new'] / median['old']:.2f}")
        if "reference" in median:
            print(f"reference ({args.reference_revision}): median "
                  f"{median['reference']:.1f} steps/s")
            print(f"RATIO forecast_steps_per_s_new_vs_{args.reference_revision} "
                  f"{median['new'] / median['reference']:.2f}")
        short, long = args.memory_leads.split(",")
        for name, (batch_starts, overlap) in modes.items():
            memory = [run_child(store, init, lead, Path(tmp) / f"m{name}.zarr", batch_starts,
                                overlap, roots[name])["peak_kib"] / 1024
                      for lead in (short, long)]
            print(f"{name}: peak RSS {memory[0]:.0f} MiB at {short}, {memory[1]:.0f} MiB at "
                  f"{long}")
            print(f"RATIO forecast_peak_rss_{long}_vs_{short}_{name} "
                  f"{memory[1] / memory[0]:.3f}")


if __name__ == "__main__":
    main()

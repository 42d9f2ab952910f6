"""Cost of an ensemble member against a deterministic forecast step, measured in one run.

Issue 15 asks that a member cost no more than a deterministic forecast step (members batched).
With the same number of forecasts, this times ``forecast()`` of ``S x M`` start dates with one
member and of ``S`` start dates with ``--members M`` (each in a fresh process, so both pay the
same fixed costs once; interleaved, ``--repeats`` times) and prints the median seconds per
member-step (start dates x members x leads) of the ensemble against the seconds per step of the
deterministic forecast. Two models on the demo's store:

* ``perturbed``: the demo's checkpoint (``checkpoints/ncep_graph_2013``) with initial
  perturbations (member 0 the control, the others perturbed);
* ``stochastic``: the same network with ``model.ensemble`` noise inputs (a CRPS-trained model's
  architecture, untrained weights: cost does not depend on skill), its members sampling the
  model's noise at every step.

    .venv/bin/python benchmarks/bench_ensemble_members.py [--starts 4] [--members 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench_forecast_throughput import CHECKPOINT, PROJECT, demo_store, run_forecast_child

_CHILD = """
import json, sys, time
from weathermodel.inference.forecast import ForecastOptions, forecast
checkpoint, data, init, lead, out, members = sys.argv[1:7]
options = ForecastOptions(checkpoint=checkpoint, data=data, init=init, lead=lead, out=out,
                          members=int(members), progress=False)
begin = time.perf_counter()
forecast(options)
print(json.dumps({"seconds": time.perf_counter() - begin}))
"""


def stochastic_checkpoint(path: Path) -> Path:
    """The demo checkpoint's network with 8 smooth noise input channels (untrained)."""
    import dataclasses

    import torch

    from weathermodel.models.config import EnsembleConfig
    from weathermodel.models.forecaster import Forecaster
    from weathermodel.models.io import load_model, save_model

    deterministic = load_model(CHECKPOINT)
    config = dataclasses.replace(deterministic.config, ensemble=EnsembleConfig(
        noise_channels=8, noise_length_points=4, members=4))
    torch.manual_seed(0)
    # the statics' values do not matter for the cost (they are normalised again here)
    model = Forecaster(config, deterministic.metadata, deterministic.statics.numpy())
    return save_model(model, path)


def seconds(checkpoint: Path, store: Path, init: str, lead: str, out: Path,
            members: int) -> float:
    """Seconds of one ``forecast()`` call in a fresh process."""
    return run_forecast_child(_CHILD, [str(checkpoint), str(store), init, lead, str(out),
                                       str(members)], out)["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=4, help="12-hourly from 2013-10-01")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--lead", default="5d")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=str(PROJECT / "outputs" / "bench_forecast"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_dir = Path(args.out_dir)
    os.environ.setdefault("WEATHERMODEL_CACHE", str(out_dir / "cache"))
    store = demo_store(out_dir)
    import numpy as np

    from weathermodel.inference.forecast import lead_steps

    def init_range(starts: int) -> str:
        end = np.datetime64("2013-10-01T00") + np.timedelta64(12 * (starts - 1), "h")
        return f"2013-10-01T00/{str(end)[:13]}/12h"

    runs = {1: args.starts * args.members, args.members: args.starts}  # members: start dates
    leads = lead_steps(args.lead, 6 * 3600)
    print(f"{args.members} members x {args.starts} start dates vs 1 member x "
          f"{args.starts * args.members} start dates, {args.lead} each; OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        models = {"perturbed": CHECKPOINT,
                  "stochastic": stochastic_checkpoint(Path(tmp) / "stochastic.pt")}
        for name, checkpoint in models.items():
            seconds(checkpoint, store, "2013-10-01T00", "6h", Path(tmp) / "warm.zarr", 1)
            per_step: dict[int, list[float]] = {members: [] for members in runs}
            for repeat in range(args.repeats):
                for members, starts in runs.items():
                    elapsed = seconds(checkpoint, store, init_range(starts), args.lead,
                                      Path(tmp) / f"{name}.zarr", members)
                    per_step[members].append(elapsed / (starts * members * leads))
                    print(f"  {name} repeat {repeat + 1}, {members} member(s): {elapsed:.2f} s, "
                          f"{1e3 * per_step[members][-1]:.2f} ms per member-step")
            ratio = (statistics.median(per_step[args.members])
                     / statistics.median(per_step[1]))
            print(f"RATIO {name}_member_step_vs_deterministic_step {ratio:.3f}")


if __name__ == "__main__":
    main()

"""Peak memory and speed of `weathermodel forecast` for 4 and for 40 lead steps.

A training store is made from the NCEP sample (weathermodel/sample_data) and a small untrained
graph model is saved; each forecast (same start dates) runs in its own fresh process, which
prints its peak RSS (VmHWM from /proc/self/status) and the time the forecast took. Leads are
written as they are computed, so memory must not grow with the lead time: prints
`RATIO forecast_peak_rss_40_vs_4_leads <x>` (goal < 1.15, for 10x the leads).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "weathermodel" / "sample_data" / \
    "air_temperature_2013.nc"

# VmHWM, not getrusage: ru_maxrss survives fork+exec on Linux and would report the parent's
# peak (the parent has just prepared the store and built the model).
_CHILD = """
import json, sys, time
from weathermodel.inference.forecast import ForecastOptions, forecast
checkpoint, data, init, lead, out = sys.argv[1:6]
begin = time.perf_counter()
forecast(ForecastOptions(checkpoint=checkpoint, data=data, init=init, lead=lead, out=out,
                         progress=False))
seconds = time.perf_counter() - begin
with open("/proc/self/status") as status:
    peak_kib = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
print(json.dumps({"peak_kib": peak_kib, "seconds": seconds}))
"""


def make_inputs(root: Path, refinement: int, latent: int, layers: int) -> tuple[Path, Path]:
    import torch

    from weathermodel.configuration import from_dict
    from weathermodel.data.config import PrepareConfig
    from weathermodel.data.dataset import read_summary
    from weathermodel.data.prepare import prepare
    from weathermodel.models.config import GraphConfig, ModelConfig
    from weathermodel.models.forecaster import Forecaster, ModelMetadata
    from weathermodel.models.io import save_model

    store = prepare(from_dict(PrepareConfig, {"sources": [{"path": str(SAMPLE)}],
                                              "output": str(root / "ncep.zarr"),
                                              "start": "2013-09-01", "end": "2013-12-31T18"}),
                    progress=False)
    summary = read_summary(store)
    torch.manual_seed(0)
    config = ModelConfig(kind="graph", history=2, graph=GraphConfig(
        mesh_refinement=refinement, latent_size=latent, processor_layers=layers))
    model = Forecaster(config, ModelMetadata.from_summary(summary), summary.statics)
    return Path(store), save_model(model, root / "model.pt")


def run_child(checkpoint: Path, store: Path, init: str, lead: str, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), str(store), init,
                             lead, str(out)], capture_output=True, text=True, check=True,
                            env={**os.environ})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--init", default="2013-10-01/2013-10-02T18/6h",
                        help="start dates (START/END/STEP), the same for both runs")
    parser.add_argument("--refinement", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["WEATHERMODEL_CACHE"] = str(root / "cache")  # children inherit it
        store, checkpoint = make_inputs(root, args.refinement, args.latent, args.layers)
        from weathermodel.inference.forecast import parse_init_times

        n_inits = parse_init_times(args.init).size
        results = {}
        for steps in (4, 40):
            lead = f"{steps * 6}h"
            result = run_child(checkpoint, store, args.init, lead, root / f"leads{steps}.zarr")
            results[steps] = result
            rate = steps * n_inits / result["seconds"]
            print(f"{steps:3d} lead steps x {n_inits} start dates: peak RSS "
                  f"{result['peak_kib'] / 1024:7.1f} MiB, {result['seconds']:6.2f} s, "
                  f"{rate:6.1f} steps/s")
        ratio = results[40]["peak_kib"] / results[4]["peak_kib"]
        print(f"RATIO forecast_peak_rss_40_vs_4_leads {ratio:.3f} (leads grew 10x; goal < 1.15)")


if __name__ == "__main__":
    main()

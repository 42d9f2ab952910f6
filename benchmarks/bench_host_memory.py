"""Page faults and step time with and without kept freed host memory, measured in one run.

The demo's graph network (``checkpoints/ncep_graph_2013``) runs a forecast forward pass (no
gradients) and a CPU training step (forward, backward, AdamW) in fresh processes, with glibc's
default ``malloc`` settings ("default") and after
:func:`weathermodel.host_memory.keep_freed_memory` ("kept"), interleaved ``--repeats`` times.
Prints the median milliseconds per call, the page faults per call (``ru_minflt``) and the
ratio default / kept of each.

    .venv/bin/python benchmarks/bench_host_memory.py [--batch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CHECKPOINT = PROJECT / "checkpoints" / "ncep_graph_2013"

_CHILD = """
import json, resource, statistics, sys, time
import torch
from weathermodel.host_memory import keep_freed_memory
from weathermodel.models.io import load_model

checkpoint, kind, batch, kept = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
if kept:
    keep_freed_memory()
network = load_model(checkpoint).network
inputs = network.grid_embed[0].in_features - network.grid_node_features.shape[1]
x = torch.randn(batch, inputs, network.n_latitude, network.n_longitude)
optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)

def call():
    if kind == "forward":
        with torch.no_grad():
            network.eval()(x)
    else:
        optimizer.zero_grad(set_to_none=True)
        network.train()(x).square().mean().backward()
        optimizer.step()

for _ in range(3):
    call()
before, seconds = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
for _ in range(10):
    start = time.perf_counter()
    call()
    seconds.append(time.perf_counter() - start)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"ms": statistics.median(seconds) * 1e3, "faults": faults}))
"""


def run_child(kind: str, batch: int, kept: bool) -> dict:
    """One measurement in a fresh process (the ``malloc`` settings are process-wide)."""
    result = subprocess.run([sys.executable, "-P", "-c", _CHILD, str(CHECKPOINT), kind,
                             str(batch), "1" if kept else "0"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(PROJECT)))
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="samples per forward pass "
                        "(training steps use twice as many)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WEATHERMODEL_CACHE", str(PROJECT / "outputs" / "bench_cache"))
    for kind, batch in (("forward", args.batch), ("training", 2 * args.batch)):
        results: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            for kept in (False, True):
                results[kept].append(run_child(kind, batch, kept))
        median = {kept: {key: statistics.median(r[key] for r in runs)
                         for key in ("ms", "faults")} for kept, runs in results.items()}
        print(f"{kind} (batch {batch}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}): "
              f"default {median[False]['ms']:.1f} ms, {median[False]['faults']:.0f} page faults; "
              f"kept {median[True]['ms']:.1f} ms, {median[True]['faults']:.0f} page faults "
              f"per call")
        print(f"RATIO {kind}_time_default_vs_kept {median[False]['ms'] / median[True]['ms']:.2f}")


if __name__ == "__main__":
    main()

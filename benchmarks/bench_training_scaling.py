"""Training throughput on 1 and 2 processes (torchrun, gloo on CPU; NCCL on GPUs), same run.

Prepares two months of the NCEP sample, then trains the same small graph model with a global
batch of 8: one process with batch 8, then two processes with batch 4 each. Prints the samples
per second each run logged (after warm-up) and `RATIO training_2proc_vs_1proc_samples_per_s`.
On this 2-core CPU machine the ideal is 2.0 only if the two processes do not share cores.
"""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.prepare import prepare

SAMPLE = Path(__file__).resolve().parents[1] / "weathermodel" / "sample_data" / \
    "air_temperature_2013.nc"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(store: Path, root: Path, processes: int, steps: int) -> float:
    config = {"data": {"store": str(store), "history": 2, "rollout": 1,
                       "batch_size": 8 // processes,
                       "train": {"start": "2013-01-01", "end": "2013-02-28T18"}},
              "model": {"kind": "graph", "history": 2,
                        "graph": {"mesh_refinement": 3, "latent_size": 64,
                                  "processor_layers": 4}},
              "optim": {"max_steps": steps, "warmup_steps": 2},
              "run_dir": str(root / f"run{processes}"), "log_every": steps // 2,
              "checkpoint_every": steps, "val_every": steps}
    path = root / f"train{processes}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WEATHERMODEL_CACHE": str(root / "cache")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run",
                    f"--nproc_per_node={processes}", f"--master_port={free_port()}", "-m",
                    "weathermodel", "train", "--config", str(path), "--no-progress"],
                   check=True, env=env, capture_output=True)
    rows = list(csv.DictReader(open(next((root / f"run{processes}").glob(
        "logs/version_*/metrics.csv")))))
    rates = [float(r["train/samples_per_second"]) for r in rows
             if r.get("train/samples_per_second")]
    return rates[-1]  # the second half of the run: past warm-up


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = prepare(from_dict(PrepareConfig, {
            "sources": [{"path": str(SAMPLE)}], "output": str(root / "ncep.zarr"),
            "end": "2013-02-28T18"}), progress=False)
        one = run(store, root, 1, steps)
        two = run(store, root, 2, steps)
        print(f"1 process : {one:7.1f} samples/s (batch 8)")
        print(f"2 processes: {two:7.1f} samples/s (batch 4 each)")
        print(f"RATIO training_2proc_vs_1proc_samples_per_s {two / one:.2f} (ideal 2.0)")


if __name__ == "__main__":
    main()

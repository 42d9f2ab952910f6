"""Loader throughput: WindowDataset samples per second next to raw np.memmap reads of the same bytes.

Builds a 1.5-degree (121 x 240), 70-channel store with `weathermodel prepare` (5 pressure-level
variables on 13 levels + 5 surface variables, synthetic values in plausible ranges), then reads
the same random windows (history 2 + rollout 1, plus forcings) through the loader and through a
plain np.memmap of a raw float32 file holding the same bytes. Both are read once to warm the page
cache before timing. Prints `RATIO loader_vs_memmap <x>`; the goal is >= 0.5.

Then training samples/s on the same store, a small graph model, history 2, `data.rollout` 4 and
the schedule at its first stage (rollout 1, where most of a run's steps are), in one run:
"before" reads every window's `history + 4` states in the training process (the old loader:
`rollout_of_batch` fixed at the longest rollout, `num_workers: 0`); "after" reads `history + 1`
states, in the training process (`num_workers: 0`, the default) and in 2 persistent loader
workers. Prints `RATIO training_batches_<after>_vs_before` (the training loop's data path
alone: batches handed to the step per second) and `RATIO training_<after>_vs_before_samples_per_s`
(whole steps: on a CPU the model's step dominates and workers compete with it for the cores;
on a GPU the data path is what the step waits for).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.dataset import WindowDataset
from weathermodel.data.prepare import prepare
from weathermodel.training.config import TrainConfig
from weathermodel.training.loop import Trainer

from _synthetic import synthetic_source


class LongestRolloutTrainer(Trainer):
    """The loader before issue 14: every batch reads the states of the longest rollout."""

    def rollout_of_batch(self, batch: int) -> int:
        return self.config.data.rollout


#: (name, loader workers, trainer class): the old loader first
LOADERS = [("before", 0, LongestRolloutTrainer), ("after_0workers", 0, Trainer),
           ("after_2workers", 2, Trainer)]


def make_trainer(store: Path, root: Path, name: str, workers: int, segment: int,
                 trainer_class: type[Trainer]) -> Trainer:
    config = from_dict(TrainConfig, {
        "data": {"store": str(store), "history": 2, "rollout": 4, "batch_size": 2,
                 "num_workers": workers},
        "model": {"kind": "graph", "history": 2,
                  "graph": {"mesh_refinement": 2, "latent_size": 16, "processor_layers": 1}},
        "optim": {"max_steps": 100000, "warmup_steps": 2},
        "rollout_schedule": [{"from_step": 0, "rollout": 1}, {"from_step": 90000, "rollout": 4}],
        "run_dir": str(root / name), "log_every": segment, "checkpoint_every": 100000,
        "accelerator": "cpu"})
    return trainer_class(config, progress=False)


def compare_training(store: Path, root: Path, segment: int, rounds: int) -> None:
    """Samples/s of each loader: whole training steps, and the training loop's batches
    alone. The trainers are built once, then timed in short alternating segments (``segment``
    steps or batches each, ``rounds`` times), so that all of them share the machine's load;
    the median segment counts."""
    trainers = {name: make_trainer(store, root, name, workers, segment, trainer_class)
                for name, workers, trainer_class in LOADERS}
    streams = {name: trainer._batches() for name, trainer in trainers.items()}
    for name, trainer in trainers.items():  # warm-up: workers started, first batches read
        trainer.fit(stop_after=trainer.step + segment)
        for _ in range(segment):
            next(streams[name])
    steps = {name: [] for name in trainers}
    batches = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            steps[name].append(trainer.fit(stop_after=trainer.step + segment)[
                "train/samples_per_second"])
            begin = time.perf_counter()
            samples = sum(next(streams[name])["inputs"].shape[0] for _ in range(segment))
            batches[name].append(samples / (time.perf_counter() - begin))
    for what, label, rates in (
            ("training loop batches alone", "training_batches_{}_vs_before", batches),
            ("whole training steps", "training_{}_vs_before_samples_per_s", steps)):
        median = {name: float(np.median(values)) for name, values in rates.items()}
        print(f"{what}, rollout 1 of data.rollout 4: " + "; ".join(
            f"{name} {rate:.2f} samples/s" for name, rate in median.items()))
        for name in list(median)[1:]:
            print(f"RATIO {label.format(name)} {median[name] / median['before']:.2f}")


def time_it(read, starts: np.ndarray) -> float:
    begin = time.perf_counter()
    for start in starts:
        read(int(start))
    return len(starts) / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--times", type=int, default=40)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--segment", type=int, default=5,
                        help="training steps (and batches) per timed segment")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed segments per loader, alternating between loaders")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_source(args.times, root / "source.zarr")
        config = from_dict(PrepareConfig, {"sources": [{"path": str(root / "source.zarr")}],
                                           "output": str(root / "store.zarr")})
        prepare(config, progress=False)
        dataset = WindowDataset(root / "store.zarr", history=2, rollout=1)
        store = xr.open_zarr(root / "store.zarr", consolidated=False)
        state = store["state"].values[:, 0]
        forcings = store["forcings"].values
        state_raw = np.lib.format.open_memmap(root / "state.npy", "w+", "float32", state.shape)
        state_raw[:] = state
        forcing_raw = np.lib.format.open_memmap(root / "forcings.npy", "w+", "float32",
                                                forcings.shape)
        forcing_raw[:] = forcings
        del state, forcings, state_raw, forcing_raw
        state_map = np.load(root / "state.npy", mmap_mode="r")
        forcing_map = np.load(root / "forcings.npy", mmap_mode="r")

        def read_memmap(start: int) -> None:
            np.array(state_map[start:start + 3]), np.array(forcing_map[start:start + 3])

        def read_loader(start: int) -> None:
            dataset[start]

        rng = np.random.default_rng(1)
        starts = rng.integers(0, len(dataset), args.samples)
        n_channels = len(dataset.summary.channels)
        bytes_per_sample = 3 * (n_channels + 5) * 121 * 240 * 4
        time_it(read_memmap, np.arange(len(dataset)))  # warm the page cache for both
        time_it(read_loader, np.arange(len(dataset)))
        rates = {"memmap": [], "loader": []}
        for _ in range(3):  # interleave to share the machine's noise
            rates["memmap"].append(time_it(read_memmap, starts))
            rates["loader"].append(time_it(read_loader, starts))
        memmap, loader = max(rates["memmap"]), max(rates["loader"])
        print(f"store: {args.times} times x {n_channels} channels at 1.5 deg (121 x 240); "
              f"sample = 3 states + forcings = {bytes_per_sample / 2**20:.1f} MiB")
        print(f"memmap: {memmap:8.1f} samples/s ({memmap * bytes_per_sample / 2**30:.2f} GiB/s)")
        print(f"loader: {loader:8.1f} samples/s ({loader * bytes_per_sample / 2**30:.2f} GiB/s)")
        print(f"RATIO loader_vs_memmap {loader / memmap:.2f} (goal >= 0.5)")

        os.environ.setdefault("WEATHERMODEL_CACHE", str(root / "cache"))
        compare_training(root / "store.zarr", root, args.segment, args.rounds)


if __name__ == "__main__":
    main()

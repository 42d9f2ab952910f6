"""Loader throughput: WindowDataset samples per second next to raw np.memmap reads of the same bytes.

Builds a 1.5-degree (121 x 240), 70-channel store with `weathermodel prepare` (5 pressure-level
variables on 13 levels + 5 surface variables, synthetic values in plausible ranges), then reads
the same random windows (history 2 + rollout 1, plus forcings) through the loader and through a
plain np.memmap of a raw float32 file holding the same bytes. Both are read once to warm the page
cache before timing. Prints `RATIO loader_vs_memmap <x>`; the goal is >= 0.5.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.dataset import WindowDataset
from weathermodel.data.prepare import prepare

from _synthetic import synthetic_source

def time_it(read, starts: np.ndarray) -> float:
    begin = time.perf_counter()
    for start in starts:
        read(int(start))
    return len(starts) / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--times", type=int, default=40)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_source(args.times, root / "source.zarr")
        config = from_dict(PrepareConfig, {"sources": [{"path": str(root / "source.zarr")}],
                                           "output": str(root / "store.zarr")})
        prepare(config, progress=False)
        dataset = WindowDataset(root / "store.zarr", history=2, rollout=1, fill_missing=False)
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


if __name__ == "__main__":
    main()

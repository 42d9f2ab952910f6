"""Loading windows for training: values, date ranges, gaps, members, workers and ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from weathermodel.configuration import from_dict
from weathermodel.data.config import DataConfig, DateRange, PrepareConfig
from weathermodel.data.chunk_files import TimeSliceReader
from weathermodel.data.datamodule import WeatherDataModule
from weathermodel.data.dataset import WindowDataset
from weathermodel.data.prepare import prepare
from weathermodel.data.store import open_store
from weathermodel.errors import StoreError

from conftest import free_port


@pytest.fixture(scope="module")
def store(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loader") / "ncep.zarr"
    config = from_dict(PrepareConfig, {"sources": [{"path": str(ncep_file)}], "output": str(out),
                                       "start": "2013-01-01", "end": "2013-01-31T18"})
    return prepare(config, progress=False)


def test_window_holds_the_right_states(store: Path) -> None:
    dataset = WindowDataset(store, history=2, rollout=3)
    state = open_store(store)["state"].values
    assert len(dataset) == 31 * 4 - 4
    sample = dataset[10]
    start = int(sample["time_index"]) - 1
    np.testing.assert_array_equal(sample["inputs"].numpy(), state[start:start + 2, 0])
    np.testing.assert_array_equal(sample["targets"].numpy(), state[start + 2:start + 5, 0])
    assert sample["forcings"].shape == (5, 5, 25, 53)
    assert dataset.init_time(10) == open_store(store)["time"].values[start + 1]


def test_date_ranges_keep_every_time_inside(store: Path) -> None:
    first = DateRange("2013-01-01", "2013-01-20T18")
    second = DateRange("2013-01-21", "2013-01-31T18")
    times = open_store(store)["time"].values
    seen = []
    for date_range in (first, second):
        dataset = WindowDataset(store, history=2, rollout=2, date_range=date_range)
        window_times = {times[s + k] for s in dataset.window_starts for k in range(4)}
        assert min(window_times) >= np.datetime64(pd.Timestamp(date_range.start))
        assert max(window_times) <= np.datetime64(pd.Timestamp(date_range.end))
        seen.append(window_times)
    assert not seen[0] & seen[1]
    with pytest.raises(StoreError, match="no window"):
        WindowDataset(store, history=2, rollout=2, date_range=DateRange("2014-01-01",
                                                                        "2014-02-01"))


def test_windows_never_cross_a_gap(ncep_file: Path, tmp_path: Path) -> None:
    ds = xr.open_dataset(ncep_file).isel(time=slice(0, 40))
    holey = ds.isel(time=[i for i in range(40) if i not in (9, 10, 25)])
    holey.to_netcdf(tmp_path / "holey.nc")
    config = from_dict(PrepareConfig, {"sources": [{"path": str(tmp_path / "holey.nc")}],
                                       "output": str(tmp_path / "holey.zarr"),
                                       "on_gap": "skip", "time_step": "6h"})
    store = prepare(config, progress=False)
    times = open_store(store)["time"].values
    dataset = WindowDataset(store, history=2, rollout=2)
    for start in dataset.window_starts:
        steps = np.diff(times[start:start + 4])
        assert np.all(steps == np.timedelta64(6, "h"))
    # brute force: every 4 consecutive 6-hourly times that exist form one window
    expected = [i for i in range(len(times) - 3)
                if np.all(np.diff(times[i:i + 4]) == np.timedelta64(6, "h"))]
    assert list(dataset.window_starts) == expected


def test_ensemble_members_are_samples(data_dir: Path, tmp_path: Path) -> None:
    grib = data_dir / "cfgrib" / "era5-levels-members.grib"
    config = from_dict(PrepareConfig, {"sources": [{"path": str(grib)}],
                                       "output": str(tmp_path / "ens.zarr")})
    store = prepare(config, progress=False)
    dataset = WindowDataset(store, history=1, rollout=1)
    assert len(dataset) == 3 * 10
    state = open_store(store)["state"].values
    sample = dataset[7]
    assert int(sample["member"]) == 7
    np.testing.assert_array_equal(sample["inputs"][0].numpy(), state[0, 7])


def test_workers_read_each_sample_once(store: Path) -> None:
    config = DataConfig(store=str(store), history=1, rollout=1, batch_size=5, num_workers=2,
                        validation=DateRange("2013-01-01", "2013-01-31T18"))
    loader = WeatherDataModule(config).val_dataloader()
    seen = [int(i) for batch in loader for i in batch["time_index"]]
    assert sorted(seen) == list(range(0, 31 * 4 - 1))


_RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from weathermodel.data.config import DataConfig, DateRange
    from weathermodel.data.datamodule import WeatherDataModule
    dist.init_process_group("gloo")
    config = DataConfig(store=sys.argv[1], history=2, rollout=1, batch_size=4, num_workers=1,
                        train=DateRange("2013-01-01", "2013-01-31T18"))
    loader = WeatherDataModule(config, seed=3).train_dataloader()
    loader.sampler.set_epoch(0)
    seen = [int(i) for batch in loader for i in batch["time_index"]]
    with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
""")


def test_ranks_get_disjoint_shards_under_torchrun(store: Path, tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--nnodes=1", f"--master_port={free_port()}", str(script), str(store),
               str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["timeout", "240", *command], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) == len(shards[1]) > 0
    n_windows = 31 * 4 - 2
    assert len(shards[0]) + len(shards[1]) >= n_windows - 2 * 4 - 1  # drop_last per rank
    assert len(set(shards[0]) | set(shards[1])) == len(shards[0]) + len(shards[1])


def test_direct_chunk_reads_equal_zarr_reads(ncep_file: Path, tmp_path: Path) -> None:
    """The one-copy reader of plain stores and zarr's own decoding (zstd store) agree."""
    base = {"sources": [{"path": str(ncep_file)}], "start": "2013-03-01", "end": "2013-03-05"}
    plain = prepare(from_dict(PrepareConfig, {**base, "output": str(tmp_path / "plain.zarr")}),
                    progress=False)
    packed = prepare(from_dict(PrepareConfig, {**base, "output": str(tmp_path / "zstd.zarr"),
                                               "compressor": "zstd"}), progress=False)
    fast, slow = WindowDataset(plain, 2, 2), WindowDataset(packed, 2, 2)
    assert fast._open()[0].fast and not slow._open()[0].fast
    for index in (0, 5, len(fast) - 1):
        for key in ("inputs", "targets", "forcings"):
            np.testing.assert_array_equal(fast[index][key].numpy(), slow[index][key].numpy())
    # and both equal xarray's reading of the store
    state = xr.open_zarr(plain, consolidated=False)["state"].values
    np.testing.assert_array_equal(fast[3]["inputs"].numpy(), state[3:5, 0])


def test_missing_values_come_back_as_nan(ncep_file: Path, tmp_path: Path) -> None:
    """The loader returns the store's values as they are (NaN where missing): imputation is
    the model's job, and the loss masks missing targets."""
    ds = xr.open_dataset(ncep_file).isel(time=slice(0, 12)).load()
    ds["air"][:, :5, :5] = np.nan  # a masked corner, as outside a regional domain
    ds.to_netcdf(tmp_path / "corner.nc")
    store = prepare(from_dict(PrepareConfig, {
        "sources": [{"path": str(tmp_path / "corner.nc")}], "output": str(tmp_path / "c.zarr"),
        "max_missing_fraction": 0.05}), progress=False)
    summary = open_store(store)
    assert float(summary["missing_fraction"].values[0]) == pytest.approx(25 / (25 * 53))
    sample = WindowDataset(store, 1, 1)[0]
    for key in ("inputs", "targets"):
        values = sample[key].numpy()
        assert np.isnan(values).sum() == 25
        assert np.isnan(values[0, 0, -5:, :5]).all()  # latitude flipped: corner at the top
    np.testing.assert_array_equal(sample["inputs"].numpy()[0, 0],
                                  summary["state"].values[0, 0, 0])


class CountingReader(TimeSliceReader):
    """A real reader of the store that counts the time steps it reads."""

    def __init__(self, store: str | Path, name: str) -> None:
        super().__init__(store, name)
        self.states_read = 0

    def read_times(self, times, *index: int) -> np.ndarray:
        self.states_read += len(times)
        return super().read_times(times, *index)


class CountingWindowDataset(WindowDataset):
    def _open(self):
        if self._readers is None:
            self._readers = (CountingReader(self.store, "state"),
                             CountingReader(self.store, "forcings"))
        return self._readers


@pytest.mark.parametrize("time_step", [None, "12h"])
def test_dataset_reads_only_the_states_of_the_rollout_asked_for(store: Path,
                                                                time_step: str | None) -> None:
    """``dataset[(index, steps)]``: history + steps states and forcings come from the store,
    not history + the dataset's (longest) rollout; they equal the first ones of the full
    window. Also at a model step of two store steps (states read one by one)."""
    from weathermodel.data.dataset import training_summary

    summary = training_summary(DataConfig(store=str(store), time_step=time_step))
    dataset = CountingWindowDataset(store, history=2, rollout=4, summary=summary)
    state_reader, forcing_reader = dataset._open()
    read = {}
    for steps in (1, 2, 4):
        before = state_reader.states_read, forcing_reader.states_read
        read[steps] = dataset[(7, steps)]
        assert (state_reader.states_read - before[0],
                forcing_reader.states_read - before[1]) == (2 + steps, 2 + steps)
        assert read[steps]["targets"].shape[0] == steps
        assert read[steps]["forcings"].shape[0] == 2 + steps
    before = state_reader.states_read
    full = dataset[7]  # a plain index: the whole window
    assert state_reader.states_read - before == 6
    for steps, sample in read.items():
        np.testing.assert_array_equal(sample["inputs"].numpy(), full["inputs"].numpy())
        np.testing.assert_array_equal(sample["targets"].numpy(),
                                      full["targets"][:steps].numpy())
        np.testing.assert_array_equal(sample["forcings"].numpy(),
                                      full["forcings"][:2 + steps].numpy())
        assert int(sample["time_index"]) == int(full["time_index"])
    for bad in (0, 5):
        with pytest.raises(IndexError):
            dataset[(7, bad)]


def test_sampler_tags_each_batch_with_the_rollout_of_its_step(store: Path) -> None:
    """The training loader's batches hold the rollout of the step they are for, across an
    epoch boundary and from a position part-way through an epoch; workers give the same
    batches, bit for bit, as the main process."""
    from weathermodel.data.datamodule import WeatherDataModule

    def rollout_of_batch(batch: int) -> int:
        return 1 if batch < 20 else 3

    def batches(workers: int, epoch: int = 0, batch_in_epoch: int = 0, count: int = 30):
        config = DataConfig(store=str(store), history=2, rollout=3, batch_size=5,
                            num_workers=workers, train=DateRange("2013-01-01", "2013-01-31T18"))
        module = WeatherDataModule(config, seed=1, rollout_of_batch=rollout_of_batch)
        loader, out = module.train_dataloader(), []
        while len(out) < count:
            module.seek(epoch, batch_in_epoch)
            for batch in loader:
                out.append(batch)
                if len(out) == count:
                    break
            epoch, batch_in_epoch = epoch + 1, 0
        return module, out

    module, plain = batches(0)
    per_epoch = module.train_sampler.batches_per_epoch
    assert per_epoch == (31 * 4 - 4) // 5 == 24  # the 30 batches span two epochs
    assert [b["targets"].shape[1] for b in plain] == [1] * 20 + [3] * 10
    assert [b["forcings"].shape[1] for b in plain] == [3] * 20 + [5] * 10
    _, workers = batches(2)
    _, resumed = batches(2, epoch=0, batch_in_epoch=17, count=13)
    for ours, theirs in ((plain, workers), (plain[17:], resumed)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert set(a) == set(b)
            for key in a:
                assert torch.equal(a[key], b[key]), key

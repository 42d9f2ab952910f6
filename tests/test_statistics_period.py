"""Normalisation statistics from a chosen period, and models whose step is a multiple of the
store's step (e.g. an 18-hour model on a 6-hourly store), checked against brute-force numpy."""
from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from weathermodel.cli import main
from weathermodel.configuration import from_dict
from weathermodel.data.config import DataConfig, DateRange, PrepareConfig
from weathermodel.data.dataset import WindowDataset, read_summary, training_summary
from weathermodel.data.prepare import prepare
from weathermodel.data.store import STATISTICS_CACHE_ATTRIBUTE, read_metadata
from weathermodel.errors import ConfigError

START, END = "2013-01-01", "2013-02-28T18"
JANUARY = DateRange("2013-01-01", "2013-01-31T18")
FEBRUARY = DateRange("2013-02-01", "2013-02-28T18")
SIX_HOURS = np.timedelta64(6, "h")


@pytest.fixture(scope="module")
def whole_store(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """January-February 2013, statistics over the whole record (the default)."""
    out = tmp_path_factory.mktemp("whole") / "ncep.zarr"
    return prepare(from_dict(PrepareConfig, {"sources": [{"path": str(ncep_file)}],
                                             "output": str(out), "start": START, "end": END}),
                   progress=False)


def _store_values(store: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times, state of member 0 (time, channel, lat, lon), forcings), float64, as stored."""
    ds = xr.open_zarr(store, consolidated=False)
    return (ds["time"].values, ds["state"].values[:, 0].astype("float64"),
            ds["forcings"].values.astype("float64"))


def _lagged_differences(times: np.ndarray, values: np.ndarray, inside: np.ndarray,
                        lag_steps: int) -> np.ndarray:
    """``x(t) - x(t - lag_steps * 6 h)`` for every stored ``t`` inside whose earlier time is
    inside too, and every 6-hourly time between them is stored (no gap crossed)."""
    position = {t: i for i, t in enumerate(times)}
    pairs = [(position[t - lag_steps * SIX_HOURS], i) for i, t in enumerate(times)
             if inside[i] and all(t - k * SIX_HOURS in position for k in range(lag_steps + 1))
             and inside[position[t - lag_steps * SIX_HOURS]]]
    earlier, later = np.array(pairs).T
    return values[later] - values[earlier]


def _brute_force(store: Path, period: DateRange, lag_steps: int = 1) -> dict[str, np.ndarray]:
    times, state, forcings = _store_values(store)
    inside = ((times >= np.datetime64(pd.Timestamp(period.start)))
              & (times <= np.datetime64(pd.Timestamp(period.end))))
    values = state[inside]
    tendency = _lagged_differences(times, state, inside, lag_steps)
    axes = (0, 2, 3)
    return {"mean": np.nanmean(values, axis=axes), "std": np.nanstd(values, axis=axes),
            "min": np.nanmin(values, axis=axes), "max": np.nanmax(values, axis=axes),
            "tendency_std": np.nanstd(tendency, axis=axes),
            "missing_fraction": np.isnan(values).mean(axis=axes),
            "forcing_mean": forcings[inside].mean(axis=axes),
            "forcing_std": forcings[inside].std(axis=axes)}


def _assert_summary_equals(summary, expected: dict[str, np.ndarray]) -> None:
    for name in ("mean", "std", "tendency_std", "missing_fraction", "forcing_mean",
                 "forcing_std"):
        np.testing.assert_allclose(getattr(summary, name), expected[name], rtol=2e-5,
                                   atol=1e-9, err_msg=name)


def test_prepare_computes_statistics_over_the_period_only(ncep_file: Path, whole_store: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "period.zarr"
    code = main(["prepare", str(ncep_file), "--out", str(out), "--start", START, "--end", END,
                 "--statistics-period", "2013-01-10/2013-01-31T23", "--no-progress"])
    assert code == 0
    period = DateRange("2013-01-10", "2013-01-31T18")  # the times the store holds
    expected = _brute_force(out, period)
    ds = xr.open_zarr(out, consolidated=False)
    for name in ("mean", "std", "min", "max", "tendency_std", "missing_fraction"):
        np.testing.assert_allclose(ds[name].values, expected[name], rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(ds["forcing_mean"].values, expected["forcing_mean"], rtol=2e-5)
    np.testing.assert_allclose(ds["forcing_std"].values, expected["forcing_std"], rtol=2e-5)
    # ... which are not the statistics of the whole record
    whole = xr.open_zarr(whole_store, consolidated=False)
    assert abs(float(ds["mean"][0] - whole["mean"][0])) > 0.1
    assert abs(float(ds["forcing_mean"][0] - whole["forcing_mean"][0])) > 1.0
    # the period used is recorded in the store and in every summary
    recorded = ["2013-01-10T00:00:00", "2013-01-31T18:00:00"]
    assert read_metadata(out)["statistics_period"] == recorded
    summary = read_summary(out)
    assert list(summary.statistics_period) == recorded
    assert summary.metadata["statistics_period"] == recorded
    _assert_summary_equals(summary, expected)
    whole_period = read_metadata(whole_store)["statistics_period"]
    assert whole_period == ["2013-01-01T00:00:00", "2013-02-28T18:00:00"]


def test_malformed_or_empty_statistics_period_is_refused(ncep_file: Path, tmp_path: Path,
                                                         capsys) -> None:
    assert main(["prepare", str(ncep_file), "--out", str(tmp_path / "a.zarr"),
                 "--statistics-period", "2013-01-10", "--no-progress"]) == 2
    assert "START/END" in capsys.readouterr().err
    config = from_dict(PrepareConfig, {"sources": [{"path": str(ncep_file)}],
                                       "output": str(tmp_path / "b.zarr"), "start": START,
                                       "end": END, "statistics": {"start": "2014-01-01",
                                                                  "end": "2014-02-01"}})
    with pytest.raises(ConfigError, match="holds no time of the store"):
        prepare(config, progress=False)
    assert not (tmp_path / "b.zarr").exists()  # refused before anything was written


def test_training_range_statistics_are_brute_force_and_cached(whole_store: Path, caplog,
                                                              tmp_path: Path) -> None:
    store = tmp_path / "copy.zarr"
    shutil.copytree(whole_store, store)
    config = DataConfig(store=str(store), train=JANUARY, validation=FEBRUARY)
    with caplog.at_level(logging.WARNING):
        summary = training_summary(config)
    assert not [r for r in caplog.records if "overlaps" in r.getMessage()]
    _assert_summary_equals(summary, _brute_force(store, JANUARY))
    assert summary.statistics_period == ("2013-01-01T00:00:00", "2013-01-31T18:00:00")
    assert summary.metadata["time_step_seconds"] == 6 * 3600
    assert "statistics" not in summary.metadata  # the store's own (whole record) are dropped
    # whole-record statistics differ: the default never uses them when a training range is set
    whole = read_summary(store)
    assert abs(float(summary.mean[0] - whole.mean[0])) > 0.03  # brute force agrees to 0.005
    assert abs(float(summary.forcing_mean[0] - whole.forcing_mean[0])) > 1.0

    group = zarr.open_group(str(store), mode="r+")
    cache = dict(group.attrs[STATISTICS_CACHE_ATTRIBUTE])
    key = "2013-01-01T00:00:00/2013-01-31T18:00:00/21600s"
    assert list(cache) == [key]
    np.testing.assert_array_equal(cache[key]["values"]["mean"], summary.mean)
    # the next run reads the cache instead of computing: mark the cached mean, make the
    # store read-only, and ask again; nothing is written
    cache[key]["values"]["mean"] = [123.0]
    group.attrs[STATISTICS_CACHE_ATTRIBUTE] = cache
    group_file = store / "zarr.json"
    before = group_file.read_bytes()
    modes = {path: path.stat().st_mode for path in [store, *store.rglob("*")]}
    try:
        for path, mode in modes.items():
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        again = training_summary(config)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    np.testing.assert_array_equal(again.mean, [123.0])
    np.testing.assert_array_equal(again.std, summary.std)
    assert group_file.read_bytes() == before

    # a statistics period overlapping the validation range is used, with a warning
    caplog.clear()
    overlapping = DataConfig(store=str(store), train=JANUARY, validation=FEBRUARY,
                             statistics=DateRange("2013-01-15", "2013-02-10"))
    with caplog.at_level(logging.WARNING):
        leaky = training_summary(overlapping)
    assert leaky.statistics_period == ("2013-01-15T00:00:00", "2013-02-10T00:00:00")
    warnings = [r.getMessage() for r in caplog.records if "overlaps" in r.getMessage()]
    assert len(warnings) == 1 and "validation range 2013-02-01..2013-02-28T18" in warnings[0]


def test_model_step_three_store_steps(whole_store: Path, tmp_path: Path) -> None:
    """An 18-hour model on the 6-hourly store: windows of states 3 store steps apart, tendency
    std of 18-hour differences, the model step in the summary's metadata."""
    config = DataConfig(store=str(whole_store), history=2, rollout=2, train=JANUARY,
                        time_step="18h")
    summary = training_summary(config)
    assert summary.stride == 3
    assert summary.metadata["time_step_seconds"] == 18 * 3600
    assert summary.metadata["store_time_step_seconds"] == 6 * 3600
    expected = _brute_force(whole_store, JANUARY, lag_steps=3)
    _assert_summary_equals(summary, expected)
    one_step = _brute_force(whole_store, JANUARY, lag_steps=1)["tendency_std"]
    assert float(summary.tendency_std[0]) > 1.3 * float(one_step[0])

    dataset = WindowDataset(whole_store, 2, 2, JANUARY, summary=summary)
    times, state, forcings = _store_values(whole_store)
    # brute force: every start whose 4 states 18 h apart all lie in January
    last = np.datetime64(pd.Timestamp(JANUARY.end))
    expected_starts = [i for i in range(len(times) - 9) if times[i + 9] <= last]
    assert list(dataset.window_starts) == expected_starts
    for index in (0, 7, len(dataset) - 1):
        sample = dataset[index]
        start = int(sample["time_index"]) - 3
        picked = [start, start + 3, start + 6, start + 9]
        assert np.all(np.diff(times[picked]) == np.timedelta64(18, "h"))
        np.testing.assert_array_equal(sample["inputs"].numpy(), state[picked[:2]])
        np.testing.assert_array_equal(sample["targets"].numpy(), state[picked[2:]])
        np.testing.assert_array_equal(sample["forcings"].numpy(), forcings[picked])
        assert dataset.init_time(index) == times[start + 3]

    # only the window's states are read: a broken chunk between them does not matter
    broken = tmp_path / "broken.zarr"
    shutil.copytree(whole_store, broken)
    for between in (1, 2, 4):
        (broken / "state" / "c" / str(between) / "0" / "0" / "0" / "0").write_bytes(b"x")
    sample = WindowDataset(broken, 2, 2, JANUARY, summary=summary)[0]
    np.testing.assert_array_equal(sample["inputs"].numpy(), state[[0, 3]])


def test_model_step_windows_and_tendencies_never_cross_a_gap(ncep_file: Path,
                                                             tmp_path: Path) -> None:
    """A 12-hour model on a 6-hourly store with missing times (zstd: zarr's own reads)."""
    ds = xr.open_dataset(ncep_file).isel(time=slice(0, 48))
    ds.isel(time=[i for i in range(48) if i not in (9, 25, 26)]).to_netcdf(tmp_path / "holey.nc")
    store = prepare(from_dict(PrepareConfig, {
        "sources": [{"path": str(tmp_path / "holey.nc")}], "output": str(tmp_path / "h.zarr"),
        "on_gap": "skip", "time_step": "6h", "compressor": "zstd"}), progress=False)
    times, state, forcings = _store_values(store)
    everything = DateRange(str(times[0]), str(times[-1]))
    summary = training_summary(DataConfig(store=str(store), train=everything, time_step="12h"))
    expected = _brute_force(store, everything, lag_steps=2)
    _assert_summary_equals(summary, expected)
    dataset = WindowDataset(store, 1, 2, summary=summary)
    existing = set(times)
    # brute force: a window needs every 6-hourly time from its first to its last state
    expected_starts = [i for i in range(len(times))
                       if all(times[i] + k * SIX_HOURS in existing for k in range(5))]
    assert list(dataset.window_starts) == expected_starts
    for index in range(len(dataset)):
        sample = dataset[index]
        start = int(sample["time_index"])
        np.testing.assert_array_equal(sample["targets"].numpy(), state[[start + 2, start + 4]])
        np.testing.assert_array_equal(sample["forcings"].numpy(),
                                      forcings[[start, start + 2, start + 4]])


@pytest.mark.parametrize("step", ["9h", "3h", "1d2h"])
def test_model_step_not_a_multiple_of_the_store_step_is_refused(whole_store: Path,
                                                                step: str) -> None:
    with pytest.raises(ConfigError, match=r"not a positive multiple of the store's time step "
                                          r"\(6h\)") as error:
        training_summary(DataConfig(store=str(whole_store), train=JANUARY, time_step=step))
    assert step in str(error.value)
    with pytest.raises(ConfigError, match="not a positive duration"):
        from_dict(DataConfig, {"store": str(whole_store), "time_step": "-6h"})


def test_datamodule_uses_the_training_range_at_the_model_step(whole_store: Path) -> None:
    from weathermodel.data.datamodule import WeatherDataModule

    config = from_dict(DataConfig, {"store": str(whole_store), "history": 1, "rollout": 1,
                                    "train": {"start": JANUARY.start, "end": JANUARY.end},
                                    "time_step": "12h", "batch_size": 2})
    module = WeatherDataModule(config)
    assert module.summary.stride == 2
    assert module.summary.statistics_period[1] == "2013-01-31T18:00:00"
    assert module.dataset(JANUARY).stride == 2
    batch = next(iter(module.train_dataloader()))
    assert batch["inputs"].shape == (2, 1, 1, 25, 53)

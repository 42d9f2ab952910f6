"""Torch access to a training store: windows of (history, rollout targets, forcings).

A model's step may be a multiple of the store's step (a 6-hour model on an hourly store): a
window is then ``history + rollout`` states ``stride`` store steps apart, all of them inside one
run of consecutive store steps (no gap crossed), and only those states are read, one chunk each
(the store is chunked one time step per chunk). Values are returned in physical units, with NaN
where the store has missing values (the model imputes them); models normalise with the
statistics of the :class:`StoreSummary`, computed over a chosen period at the model's step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from torch.utils.data import Dataset

from weathermodel.data import store as store_layout
from weathermodel.data.chunk_files import TimeSliceReader, open_readers
from weathermodel.data.config import DataConfig, DateRange, parse_time, parse_timedelta
from weathermodel.data.statistics import period_indices, period_label, store_statistics
from weathermodel.data.store import open_store
from weathermodel.data.timeaxis import window_starts
from weathermodel.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

#: statistics a summary carries, per channel (states) and per forcing
_SUMMARY_STATISTICS = ("mean", "std", "tendency_std", "missing_fraction", "forcing_mean",
                       "forcing_std")


@dataclass(frozen=True)
class StoreSummary:
    """What every consumer of a store needs, read once from its metadata.

    ``times`` and ``consecutive`` are the store's own (at the store's step). The statistics
    (``mean std tendency_std missing_fraction`` per channel, ``forcing_mean forcing_std`` per
    forcing, physical units) cover the times of ``statistics_period`` (first and last time
    used, ISO), with ``tendency_std`` that of differences over one *model* step, which is
    ``stride`` store steps. ``metadata`` is the store's metadata with ``time_step_seconds`` set
    to the model's step, ``store_time_step_seconds`` to the store's and ``statistics_period``
    to the period used.
    """

    path: str
    times: np.ndarray
    consecutive: np.ndarray
    channels: list[str]
    channel_variables: list[str]
    channel_levels: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray
    n_members: int
    mean: np.ndarray
    std: np.ndarray
    tendency_std: np.ndarray
    missing_fraction: np.ndarray
    forcing_mean: np.ndarray
    forcing_std: np.ndarray
    statics: np.ndarray
    metadata: dict
    statistics_period: tuple[str, str]
    stride: int


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g}h"


def model_stride(time_step: str | None, store_step_seconds: int, where: str = "") -> int:
    """Store steps per model step: 1 when ``time_step`` is None (the store's step).

    Raises
    ------
    ConfigError : ``time_step`` is not a positive multiple of the store's step (both named).
    """
    if time_step is None:
        return 1
    seconds = parse_timedelta(time_step, "time_step").total_seconds()
    ratio = seconds / store_step_seconds
    if seconds <= 0 or ratio < 1 or ratio != round(ratio):
        raise ConfigError(
            f"the model time step {time_step} ({_hours(seconds)}) is not a positive multiple of "
            f"the store's time step ({_hours(store_step_seconds)})",
            f"set data.time_step to a multiple of {_hours(store_step_seconds)} (e.g. "
            f"{_hours(store_step_seconds * max(1, round(ratio)))}), or prepare a store at a "
            "step that divides the model's", path=where or None)
    return int(round(ratio))


def read_summary(path: str | Path, statistics_period: DateRange | None = None,
                 stride: int = 1) -> StoreSummary:
    """Open a complete store and read its coordinates and statistics (small arrays only).

    Parameters
    ----------
    path : the training store.
    statistics_period : the times whose statistics normalise the model (inclusive); None: the
        period the store's statistics were prepared over (``statistics_period`` in its
        metadata; the whole record for stores that predate it).
    stride : store steps per model step (see :func:`model_stride`); ``tendency_std`` is that
        of differences over ``stride`` store steps.

    Statistics other than the store's own (another period, or ``stride > 1``) are computed
    once by the same streaming pass as ``prepare`` (memory bounded by a block) and cached in
    the store (group attribute ``weathermodel_statistics``, keyed by the first and last time
    used and the step); later calls, other runs and other ranks read them from there. The
    computation is deterministic, so ranks that cannot read a cache entry (read-only store)
    compute the identical values.

    Raises
    ------
    ConfigError : the period holds no time of the store, or no pair of states ``stride``
        steps apart without a gap.
    """
    ds = open_store(path)
    metadata = dict(ds.attrs["weathermodel"])
    times = ds["time"].values
    store_step = int(metadata["time_step_seconds"])
    if stride < 1:
        raise ConfigError(f"stride {stride} is not a positive number of store steps",
                          "give 1 or more", path=str(path))
    recorded = list(metadata.get("statistics_period") or period_label(times, 0, times.size))
    first, stop = period_indices(times, statistics_period or DateRange(*recorded), str(path))
    period = period_label(times, first, stop)
    if period == recorded and stride == 1:
        stats = {name: ds[name].values.astype("float64") for name in _SUMMARY_STATISTICS}
    else:
        stats = _derived_statistics(path, period, first, stop, stride, store_step)
        metadata.pop("statistics", None)  # the store's own, of another period or step
        metadata.pop("variable_statistics", None)
    metadata.update(time_step_seconds=store_step * stride, store_time_step_seconds=store_step,
                    statistics_period=period)
    return StoreSummary(
        path=str(path), times=times, consecutive=ds["consecutive"].values.astype(bool),
        channels=[str(c) for c in ds["channel"].values],
        channel_variables=[str(v) for v in ds["channel_variable"].values],
        channel_levels=ds["channel_level"].values.astype("float64"),
        latitude=ds["latitude"].values, longitude=ds["longitude"].values,
        n_members=int(ds.sizes["number"]),
        **{name: stats[name] for name in _SUMMARY_STATISTICS},
        statics=ds["statics"].values, metadata=metadata,
        statistics_period=(period[0], period[1]), stride=stride)


def _derived_statistics(path: str | Path, period: list[str], first: int, stop: int, stride: int,
                        store_step: int) -> dict[str, np.ndarray]:
    """Statistics of ``first..stop-1`` at ``stride`` store steps: cached, or computed and
    cached."""
    key = store_layout.statistics_cache_key(period, store_step * stride)
    cached = store_layout.read_cached_statistics(path, key)
    if cached is not None and all(name in cached for name in _SUMMARY_STATISTICS):
        return cached
    log.info("%s: computing statistics of %s..%s at a %s step", path, period[0], period[1],
             _hours(store_step * stride))
    computed = store_statistics(zarr.open_group(str(path), mode="r"), first, stop, stride)
    if np.all(np.isnan(computed["tendency_std"])):
        raise ConfigError(
            f"the statistics period {period[0]}..{period[1]} holds no two states "
            f"{_hours(store_step * stride)} apart without a gap between them, so the tendency "
            "statistics cannot be computed", "widen the statistics (or training) period",
            path=str(path))
    store_layout.write_cached_statistics(path, key, computed)
    return computed


def _overlaps(period: tuple[str, str], other: DateRange) -> bool:
    return (parse_time(period[0]) <= parse_time(other.end)
            and parse_time(other.start) <= parse_time(period[1]))


def training_summary(config: DataConfig) -> StoreSummary:
    """The summary a model trained with ``config`` is built from.

    Statistics cover ``config.statistics``, or else the training range (so validation and test
    months never leak into the normalisation), or else the store's own period; the model step
    is ``config.time_step`` (checked to be a multiple of the store's step). A statistics period
    that overlaps the validation or test range is used but logged as a warning.
    """
    metadata = open_store(config.store).attrs["weathermodel"]
    stride = model_stride(config.time_step, int(metadata["time_step_seconds"]), config.store)
    summary = read_summary(config.store, config.statistics or config.train, stride)
    for name, other in (("validation", config.validation), ("test", config.test)):
        if other is not None and _overlaps(summary.statistics_period, other):
            log.warning("%s: the normalisation statistics period %s..%s overlaps the %s range "
                        "%s..%s, so those times leak into the statistics; set data.statistics "
                        "(or data.train) to a period outside it", config.store,
                        *summary.statistics_period, name, other.start, other.end)
    return summary


class WindowDataset(Dataset):
    """Windows of states one model step apart whose every time lies in a date range.

    Parameters
    ----------
    store : path of a complete training store.
    history : input states per sample (the last one is the initialisation time).
    rollout : target states after the initialisation time.
    date_range : only windows whose every time lies in this range; None for all.
    summary : the store's summary; its ``stride`` (store steps per model step) spaces the
        states of a window. Default: :func:`read_summary` of the store (the store's step).

    Each item is a dict of tensors: ``inputs`` (history, channel, lat, lon), ``targets``
    (rollout, channel, lat, lon), ``forcings`` (history + rollout, forcing, lat, lon) at the
    same times, and the int64 scalars ``time_index`` (store index of the initialisation time)
    and ``member``. Values are raw, NaN where the store has missing values. Samples cover
    every window start and every ensemble member; a window never spans a gap of the store.

    ``dataset[(index, steps)]`` reads only the first ``steps`` targets of sample ``index``
    (``history + steps`` states and forcings, ``1 <= steps <= rollout``): the training
    sampler asks for the rollout of the current stage of the schedule this way, so a run at
    rollout 1 of a schedule reaching 4 does not read the 3 states it would throw away. The
    windows (and so the sample numbering) are those of the full ``rollout`` whatever is read.
    """

    def __init__(self, store: str | Path, history: int = 1, rollout: int = 1,
                 date_range: DateRange | None = None,
                 summary: StoreSummary | None = None) -> None:
        self.summary = summary or read_summary(store)
        self.store = str(store)
        self.history, self.rollout = history, rollout
        self.stride = self.summary.stride
        length = history + rollout
        #: store index offsets of the states of a window from its first state
        self.offsets = np.arange(length) * self.stride
        span = int(self.offsets[-1]) + 1  # store steps a window covers
        starts = window_starts(self.summary.consecutive, span)
        if date_range is not None:
            times = pd.DatetimeIndex(self.summary.times)
            first, last = parse_time(date_range.start), parse_time(date_range.end)
            inside = (times[starts] >= first) & (times[starts + span - 1] <= last)
            starts = starts[np.asarray(inside)]
        if starts.size == 0:
            step = _hours(self.summary.metadata["time_step_seconds"])
            raise StoreError(
                f"no window of {length} states {step} apart without a gap"
                + (f" within {date_range.start}..{date_range.end}" if date_range else ""),
                "widen the date range or shorten history/rollout", path=self.store)
        self.window_starts = starts
        self._readers: tuple[TimeSliceReader, TimeSliceReader] | None = None

    def __len__(self) -> int:
        return int(self.window_starts.size * self.summary.n_members)

    def _open(self) -> tuple[TimeSliceReader, TimeSliceReader]:
        # opened lazily in each worker process: handles are not shared across forks
        if self._readers is None:
            self._readers = open_readers(self.store, "state", "forcings")
        return self._readers

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = None
        return state

    def init_time(self, index: int) -> np.datetime64:
        """Initialisation time (last input state) of sample ``index``."""
        start = self.window_starts[index // self.summary.n_members]
        return self.summary.times[start + self.offsets[self.history - 1]]

    def _read(self, reader: TimeSliceReader, start: int, states: int, *index: int
              ) -> np.ndarray:
        """The first ``states`` states of the window starting at store index ``start``."""
        if self.stride == 1:  # one contiguous slice
            return reader.read(start, start + states, *index)
        return reader.read_times(start + self.offsets[:states], *index)  # only those states

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, steps = index if isinstance(index, tuple) else (index, self.rollout)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if not 1 <= steps <= self.rollout:
            raise IndexError(f"rollout {steps} of a dataset of windows of rollout "
                             f"{self.rollout}")
        state_reader, forcing_reader = self._open()
        start = int(self.window_starts[index // self.summary.n_members])
        member = index % self.summary.n_members
        states = self.history + steps
        window = torch.from_numpy(self._read(state_reader, start, states, member))
        forcings = torch.from_numpy(self._read(forcing_reader, start, states))
        return {
            "inputs": window[:self.history],
            "targets": window[self.history:],
            "forcings": forcings,
            "time_index": torch.tensor(start + int(self.offsets[self.history - 1]),
                                       dtype=torch.int64),
            "member": torch.tensor(member, dtype=torch.int64),
        }

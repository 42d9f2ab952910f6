"""Torch access to a training store: windows of (history, rollout targets, forcings).

A sample is read as one contiguous slice along time, one chunk per state (the store is chunked
one time step per chunk), so a window of ``history + rollout`` states costs that many reads.
Values are returned in physical units; models normalise with the statistics of the store.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from weathermodel.data.chunkread import TimeSliceReader, open_readers
from weathermodel.data.config import DateRange, parse_time
from weathermodel.data.store import open_store
from weathermodel.data.timeaxis import window_starts
from weathermodel.errors import StoreError


@dataclass(frozen=True)
class StoreSummary:
    """What every consumer of a store needs, read once from its metadata."""

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


def read_summary(path: str | Path) -> StoreSummary:
    """Open a complete store and read its coordinates and statistics (small arrays only)."""
    ds = open_store(path)
    return StoreSummary(
        path=str(path), times=ds["time"].values, consecutive=ds["consecutive"].values.astype(bool),
        channels=[str(c) for c in ds["channel"].values],
        channel_variables=[str(v) for v in ds["channel_variable"].values],
        channel_levels=ds["channel_level"].values.astype("float64"),
        latitude=ds["latitude"].values, longitude=ds["longitude"].values,
        n_members=int(ds.sizes["number"]),
        mean=ds["mean"].values, std=ds["std"].values, tendency_std=ds["tendency_std"].values,
        missing_fraction=ds["missing_fraction"].values,
        forcing_mean=ds["forcing_mean"].values, forcing_std=ds["forcing_std"].values,
        statics=ds["statics"].values, metadata=dict(ds.attrs["weathermodel"]))


class WindowDataset(Dataset):
    """Windows of consecutive states whose initialisation time lies in a date range.

    Parameters
    ----------
    store : path of a complete training store.
    history : input states per sample (the last one is the initialisation time).
    rollout : target states after the initialisation time.
    date_range : only windows whose every time lies in this range; None for all.
    fill_missing : replace NaN by the channel mean (missing values outside a regional domain).

    Each item is a dict of tensors: ``inputs`` (history, channel, lat, lon), ``targets``
    (rollout, channel, lat, lon), ``forcings`` (history + rollout, forcing, lat, lon), and the
    int64 scalars ``time_index`` (index of the initialisation time) and ``member``. Samples
    cover every window start and every ensemble member.
    """

    def __init__(self, store: str | Path, history: int = 1, rollout: int = 1,
                 date_range: DateRange | None = None, fill_missing: bool = True,
                 summary: StoreSummary | None = None) -> None:
        self.summary = summary or read_summary(store)
        self.store = str(store)
        self.history, self.rollout = history, rollout
        # only pay for the NaN scan when the store has missing values
        self.fill_missing = fill_missing and bool(np.any(self.summary.missing_fraction > 0))
        length = history + rollout
        starts = window_starts(self.summary.consecutive, length)
        if date_range is not None:
            times = pd.DatetimeIndex(self.summary.times)
            first, last = parse_time(date_range.start), parse_time(date_range.end)
            inside = (times[starts] >= first) & (times[starts + length - 1] <= last)
            starts = starts[np.asarray(inside)]
        if starts.size == 0:
            raise StoreError(
                f"no window of {length} consecutive states"
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
        return self.summary.times[start + self.history - 1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        state_reader, forcing_reader = self._open()
        start = int(self.window_starts[index // self.summary.n_members])
        member = index % self.summary.n_members
        stop = start + self.history + self.rollout
        window = state_reader.read(start, stop, member)
        if self.fill_missing:
            missing = np.isnan(window)
            window[missing] = np.broadcast_to(self.summary.mean[None, :, None, None],
                                              window.shape)[missing]
        window = torch.from_numpy(window)
        forcings = torch.from_numpy(forcing_reader.read(start, stop))
        return {
            "inputs": window[:self.history],
            "targets": window[self.history:],
            "forcings": forcings,
            "time_index": torch.tensor(start + self.history - 1, dtype=torch.int64),
            "member": torch.tensor(member, dtype=torch.int64),
        }

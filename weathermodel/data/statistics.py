"""Per-channel statistics of a store in one streaming pass, with memory bounded by one block.

Each block of time steps is reduced (by a dask task, on a cluster when one is active) to
partial moments per channel: count, mean, sum of squared deviations, min, max and NaN count,
for the values and for their tendencies over ``lag`` store steps. Partials are merged with Chan
et al.'s parallel update, a batch at a time, so memory does not depend on the length of the
record and each state is read once (tendencies at a block boundary read ``lag`` extra states).

Statistics can be restricted to a period (the times ``first..stop-1`` of the store, e.g. the
training months, so that validation and test months do not leak into the normalisation); a
tendency ``x[t] - x[t - lag]`` is only taken when both times lie in the period and the store
has no gap between them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import dask
import numpy as np
import pandas as pd
import zarr

from weathermodel.data.config import DateRange, parse_time
from weathermodel.errors import ConfigError

STAT_NAMES = ("mean", "std", "min", "max", "tendency_std", "missing_fraction")


@dataclass
class Moments:
    """Partial moments per channel (arrays of shape (channel,), float64)."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    missing: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray, axes: tuple[int, ...]) -> "Moments":
        """Moments of ``values`` reduced over ``axes`` (NaN ignored, counted as missing)."""
        finite = ~np.isnan(values)
        count = finite.sum(axis=axes).astype("float64")
        total = np.where(finite, values, 0.0).sum(axis=axes, dtype="float64")
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        shape = [1] * values.ndim
        shape[2] = -1
        deviation = np.where(finite, values - mean.reshape(shape), 0.0)
        m2 = (deviation.astype("float64") ** 2).sum(axis=axes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channels
            minimum = np.where(count > 0, np.nanmin(values, axis=axes), np.inf)
            maximum = np.where(count > 0, np.nanmax(values, axis=axes), -np.inf)
        missing = (~finite).sum(axis=axes).astype("float64")
        return cls(count, mean, m2, minimum.astype("float64"), maximum.astype("float64"),
                   missing)

    def merge(self, other: "Moments") -> "Moments":
        """Chan et al. (1979) pairwise combination of two partial moments."""
        count = self.count + other.count
        delta = other.mean - self.mean
        safe = np.where(count > 0, count, 1.0)
        mean = self.mean + delta * other.count / safe
        m2 = self.m2 + other.m2 + delta ** 2 * self.count * other.count / safe
        return Moments(count, mean, m2, np.minimum(self.minimum, other.minimum),
                       np.maximum(self.maximum, other.maximum), self.missing + other.missing)


def lagged_consecutive(consecutive: np.ndarray, lag: int) -> np.ndarray:
    """bool per time: True where times ``t - lag .. t`` are consecutive steps of the store.

    Parameters
    ----------
    consecutive : bool per time, True where the previous time is exactly one step earlier.
    lag : number of store steps (>= 1).
    """
    consecutive = np.asarray(consecutive, dtype=bool)
    segment = np.cumsum(~consecutive)  # the run of consecutive steps each time belongs to
    valid = np.zeros(consecutive.size, dtype=bool)
    valid[lag:] = segment[lag:] == segment[:-lag] if lag < consecutive.size else False
    return valid


def _block_moments(array: zarr.Array, start: int, stop: int, first_allowed: int, lag: int,
                   valid: np.ndarray) -> tuple[Moments, Moments | None]:
    """Moments of states ``start..stop-1`` and of the lag-``lag`` tendencies ending in them
    whose earlier state is not before ``first_allowed``."""
    first = max(start - lag, first_allowed)
    values = np.asarray(array[first:stop], dtype="float32")
    if values.ndim == 4:  # (time, channel, lat, lon) arrays such as forcings
        values = values[:, None]
    states = values[start - first:]
    axes = (0, 1, 3, 4)
    ends = np.arange(max(start, first_allowed + lag), stop)
    ends = ends[valid[ends]]
    tendency_moments = None
    if ends.size:
        tendency = values[ends - first] - values[ends - lag - first]
        tendency_moments = Moments.of(tendency, axes)
    return Moments.of(states, axes), tendency_moments


def channel_statistics(array: zarr.Array, consecutive: np.ndarray, steps_per_task: int,
                       tasks_per_batch: int = 64, times: tuple[int, int] | None = None,
                       lag: int = 1) -> dict[str, np.ndarray]:
    """Mean, std, min, max, tendency std and missing fraction of every channel.

    Parameters
    ----------
    array : the store's ``state`` array (time, number, channel, latitude, longitude), or an
        array without the member dimension (``forcings``).
    consecutive : bool per time, True where the previous time is exactly one step earlier;
        tendencies are only taken across consecutive steps, so gaps do not pollute them.
    steps_per_task : time steps read by one task (bounds memory per task).
    tasks_per_batch : tasks computed together before their partials are merged.
    times : ``(first, stop)``: only the times ``first..stop-1`` count; None for all.
    lag : tendencies are ``x[t] - x[t - lag]`` (``lag`` store steps, the model's step).

    Returns
    -------
    dict of float64 arrays of shape (channel,); std is the population standard deviation,
    in the array's units (tendency std per ``lag`` store steps). Deterministic: the same
    inputs give bit-identical results (blocks are merged in time order).
    """
    first, stop = times if times is not None else (0, array.shape[0])
    valid = lagged_consecutive(consecutive, lag)
    starts = list(range(first, stop, steps_per_task))
    total: Moments | None = None
    tendency_total: Moments | None = None
    block = dask.delayed(_block_moments, pure=True)
    for batch_start in range(0, len(starts), tasks_per_batch):
        tasks = [block(array, s, min(s + steps_per_task, stop), first, lag, valid)
                 for s in starts[batch_start:batch_start + tasks_per_batch]]
        for moments, tendency in dask.compute(*tasks):
            total = moments if total is None else total.merge(moments)
            if tendency is not None:
                tendency_total = tendency if tendency_total is None else tendency_total.merge(
                    tendency)
    assert total is not None
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(total.m2 / total.count)
        tendency_std = (np.sqrt(tendency_total.m2 / tendency_total.count)
                        if tendency_total is not None else np.full_like(std, np.nan))
    mean = np.where(total.count > 0, total.mean, np.nan)
    return {"mean": mean, "std": std, "min": total.minimum, "max": total.maximum,
            "tendency_std": tendency_std,
            "missing_fraction": total.missing / (total.count + total.missing)}


def period_indices(times: np.ndarray, period: DateRange | None, where: str = "") -> tuple[int, int]:
    """``(first, stop)``: the store times ``first..stop-1`` that lie in ``period`` (inclusive).

    Raises
    ------
    ConfigError : the period holds no time of the store.
    """
    if period is None:
        return 0, len(times)
    index = pd.DatetimeIndex(times)
    start, end = parse_time(period.start, "start"), parse_time(period.end, "end")
    first = int(index.searchsorted(start, side="left"))
    stop = int(index.searchsorted(end, side="right"))
    if stop <= first:
        raise ConfigError(
            f"the statistics period {period.start}..{period.end} holds no time of the store "
            f"(which covers {index[0]}..{index[-1]})",
            "choose a statistics period inside the record", path=where or None)
    return first, stop


def period_label(times: np.ndarray, first: int, stop: int) -> list[str]:
    """The first and last time actually used, as ISO strings (how periods are recorded)."""
    return [pd.Timestamp(times[first]).isoformat(), pd.Timestamp(times[stop - 1]).isoformat()]


def store_statistics(group: zarr.Group, first: int, stop: int, lag: int = 1,
                     block_bytes: int = 16 << 20) -> dict[str, np.ndarray]:
    """Statistics of a store's states and forcings over the times ``first..stop-1``.

    Parameters
    ----------
    group : the open store.
    first, stop : the period, as store time indices (see :func:`period_indices`).
    lag : store steps per model step: tendency std is that of ``x[t] - x[t - lag]``.
    block_bytes : about how many bytes one task reads (memory bound per task).

    Returns
    -------
    ``mean std min max tendency_std missing_fraction`` per channel and ``forcing_mean
    forcing_std`` per forcing (float64, physical units).
    """
    consecutive = group["consecutive"][:].astype(bool)
    state = group["state"]
    bytes_per_time = int(np.prod(state.shape[1:])) * 4
    # at least ``lag`` steps per task, so that the ``lag`` extra states read per task for the
    # tendencies at most double the reads
    steps_per_task = max(1, lag, min(stop - first, block_bytes // bytes_per_time))
    stats = channel_statistics(state, consecutive, steps_per_task, times=(first, stop), lag=lag)
    forcing = channel_statistics(group["forcings"], consecutive, steps_per_task,
                                 times=(first, stop), lag=lag)
    return {**stats, "forcing_mean": forcing["mean"], "forcing_std": forcing["std"]}


def pooled_statistics(stats: dict[str, np.ndarray], groups: dict[str, list[int]]
                      ) -> dict[str, dict[str, float]]:
    """Combine channel statistics into one set per variable (all its levels pooled).

    Every channel has the same number of values, so pooled moments are plain averages:
    ``var = mean(std_c**2 + mean_c**2) - mean**2``; tendency means are taken as zero.
    """
    pooled = {}
    for name, channels in groups.items():
        mean = stats["mean"][channels]
        std = stats["std"][channels]
        tendency = stats["tendency_std"][channels]
        overall = float(mean.mean())
        pooled[name] = {
            "mean": overall,
            "std": float(np.sqrt(max(np.mean(std ** 2 + mean ** 2) - overall ** 2, 0.0))),
            "min": float(stats["min"][channels].min()),
            "max": float(stats["max"][channels].max()),
            "tendency_std": float(np.sqrt(np.mean(tendency ** 2))),
        }
    return pooled

"""Per-channel statistics of a store in one streaming dask pass (memory bounded by chunks)."""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np

STAT_NAMES = ("mean", "std", "min", "max", "tendency_std", "missing_fraction")


def channel_statistics(state: da.Array, consecutive: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, std, min, max, tendency std and missing (NaN) fraction of every channel.

    Parameters
    ----------
    state : dask array (time, number, channel, latitude, longitude).
    consecutive : bool per time, True where the previous time is exactly one step earlier;
        tendencies (``x[t] - x[t-1]``) are only taken there, so gaps do not pollute them.

    Returns
    -------
    dict of float64 arrays of shape (channel,). Every reduction is built on the same graph and
    computed together, so each chunk of the store is read once; dask combines per-chunk
    partial moments, so memory does not grow with the length of the record.
    """
    axes = (0, 1, 3, 4)
    values = state.astype("float64")
    tendency = values[1:] - values[:-1]
    keep = da.from_array(consecutive[1:], chunks=(tendency.chunks[0],))[:, None, None, None, None]
    tendency = da.where(keep, tendency, np.nan)
    results = dask.compute(da.nanmean(values, axis=axes), da.nanstd(values, axis=axes),
                           da.nanmin(values, axis=axes), da.nanmax(values, axis=axes),
                           da.nanstd(tendency, axis=axes),
                           da.isnan(state).mean(axis=axes))
    return dict(zip(STAT_NAMES, (np.asarray(r, dtype="float64") for r in results)))


def pooled_statistics(stats: dict[str, np.ndarray], groups: dict[str, list[int]]
                      ) -> dict[str, dict[str, float]]:
    """Combine channel statistics into one set per variable (all its levels pooled).

    Every channel has the same number of values, so pooled moments are plain averages:
    ``var = mean(std_c**2 + mean_c**2) - mean**2``.
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

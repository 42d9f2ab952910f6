"""Time-axis checks: step, gaps, duplicates; which windows of consecutive states exist."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from weathermodel.errors import DataError


@dataclass
class TimeAxisReport:
    """What :func:`inspect_time_axis` found.

    Attributes
    ----------
    step : the time step of the record (declared, or the most common difference).
    gaps : ``(before, after, difference)`` for every pair of neighbours not one step apart.
    consecutive : bool per time, True when the previous time is exactly one step earlier
        (False for the first time).
    """

    step: pd.Timedelta
    gaps: list[tuple[str, str, str]] = field(default_factory=list)
    consecutive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def describe(self, limit: int = 5) -> str:
        shown = ", ".join(f"{a} -> {b} ({d})" for a, b, d in self.gaps[:limit])
        more = f" and {len(self.gaps) - limit} more" if len(self.gaps) > limit else ""
        return f"{len(self.gaps)} irregular or missing step(s): {shown}{more}"


def inspect_time_axis(times: np.ndarray, declared_step: pd.Timedelta | None,
                      where: str) -> TimeAxisReport:
    """Check a time axis is sorted and unique, and find every step that is not ``step``.

    Raises
    ------
    DataError : times are duplicated or out of order, or the step cannot be determined.
    """
    index = pd.DatetimeIndex(times)
    if index.has_duplicates:
        dupes = index[index.duplicated()].unique()[:5]
        raise DataError(f"duplicated times {[str(t) for t in dupes]}",
                        "remove duplicated time steps (or overlapping files) from the input",
                        path=where)
    if not index.is_monotonic_increasing:
        raise DataError("times are not in increasing order",
                        "sort the input by time (e.g. check the order of the files)", path=where)
    differences = index[1:] - index[:-1]
    if declared_step is None:
        if len(differences) == 0:
            raise DataError("a single time: the time step cannot be inferred",
                            "set time_step (e.g. 6h) in the prepare config", path=where)
        declared_step = pd.Series(differences).mode().iloc[0]
    consecutive = np.zeros(len(index), dtype=bool)
    consecutive[1:] = np.asarray(differences == declared_step)
    gaps = [(str(index[i]), str(index[i + 1]), str(differences[i]))
            for i in np.flatnonzero(~consecutive[1:])]
    return TimeAxisReport(step=declared_step, gaps=gaps, consecutive=consecutive)


def window_starts(consecutive: np.ndarray, length: int) -> np.ndarray:
    """Indices ``i`` such that times ``i .. i+length-1`` are consecutive steps."""
    n = consecutive.size
    if n < length:
        return np.zeros(0, dtype=np.int64)
    breaks = np.concatenate([[0], np.cumsum(~consecutive[1:])])  # segment id of each time
    starts = np.arange(n - length + 1)
    return starts[breaks[starts] == breaks[starts + length - 1]]

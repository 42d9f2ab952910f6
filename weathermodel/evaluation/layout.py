"""The layout of the datasets an evaluation writes, shared by the scoring and the plots.

Scores (:func:`weathermodel.evaluation.evaluate.evaluate`) have dims (``system``, ``metric``,
[``region``,] ``prediction_timedelta``, [``level``]) and one variable per weather variable.
A rank histogram, which has one more dimension (its M + 1 bins), is stored in the same layout
as one metric per bin, ``rank_histogram_00`` .. ``rank_histogram_<M>`` (the frequency of that
rank; NaN for systems without members or with fewer bins): :func:`rank_histogram_metric`
names a bin and :func:`rank_histograms` gathers them back along a ``rank`` dimension.
Spectra (:func:`weathermodel.evaluation.evaluate.energy_spectra`) have dims (``system``,
``prediction_timedelta``, [``level``], ``zonal_wavenumber``), the truth as the system
:data:`TRUTH_SYSTEM`.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

SYSTEM = "system"
METRIC = "metric"
#: the system name of the truth in the spectra
TRUTH_SYSTEM = "truth"
#: the prefix of the metrics holding the bins of a rank histogram
RANK_HISTOGRAM = "rank_histogram"
#: the dimension of the bins when rank histograms are gathered from the scores
RANK = "rank"


def rank_histogram_metric(rank: int) -> str:
    """The metric name of one bin: ``rank_histogram_07`` (at least two digits, so that the
    names sort in bin order up to 99 members)."""
    return f"{RANK_HISTOGRAM}_{rank:02d}"


def _rank_of_metric(metric: str) -> int | None:
    prefix = f"{RANK_HISTOGRAM}_"
    tail = metric[len(prefix):]
    return int(tail) if metric.startswith(prefix) and tail.isdigit() else None


def rank_histograms(scores: xr.Dataset) -> xr.Dataset | None:
    """The rank histograms held in ``scores``, with the bins along ``rank`` (0..M) instead of
    ``metric``: dims (system, [region,] prediction_timedelta, [level], rank); None when the
    scores hold none. Systems without members, or with fewer bins, hold NaN."""
    metrics = [str(m) for m in scores[METRIC].values]
    bins = {rank: metric for metric in metrics
            if (rank := _rank_of_metric(metric)) is not None}
    if not bins:
        return None
    ranks = sorted(bins)
    selected = scores.sel({METRIC: [bins[rank] for rank in ranks]})
    selected = selected.rename({METRIC: RANK}).assign_coords({RANK: np.array(ranks)})
    return selected.transpose(SYSTEM, ..., RANK)


def is_rank_histogram_metric(metric: str) -> bool:
    """Whether ``metric`` names a bin of a rank histogram."""
    return _rank_of_metric(metric) is not None

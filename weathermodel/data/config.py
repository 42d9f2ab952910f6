"""Configuration of the data path: what ``prepare`` ingests and how the loader reads it."""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from weathermodel.conventions import VARIABLES
from weathermodel.errors import ConfigError


@dataclass
class VariableSpec:
    """How to read one variable of one source.

    Attributes
    ----------
    name : canonical variable name (see :mod:`weathermodel.conventions`).
    units : units of the values in the file; overrides (and is checked against) the file's
        ``units`` attribute. Required when the file has none.
    level : pressure level (hPa) to assign to a field that has no level dimension
        (e.g. a file holding only 500 hPa wind).
    """

    name: str
    units: str | None = None
    level: float | None = None

    def validate(self) -> None:
        if self.name not in VARIABLES:
            raise ConfigError(f"unknown canonical variable '{self.name}'",
                              f"use one of {sorted(VARIABLES)}")


@dataclass
class SourceSpec:
    """One input: a file, a glob of files, a zarr store or a URL.

    Attributes
    ----------
    path : path, glob pattern (``data/*.nc``) or URL (``https://...``, ``gs://...``) of a zarr.
    variables : mapping of names in the source to canonical variables; when empty, every
        variable whose name or alias is known is taken.
    select : values to pick along non-canonical dimensions, e.g. ``{month: 1}``.
    assume_time : ISO time to give a source that has no time axis (one state, a climatology).
    forecast_step : for forecast-style sources (start time x step), the single step to keep
        (e.g. ``0h``); when unset, all (start, step) pairs are flattened to valid times,
        which must then be unique.
    time_units : units of a numeric time axis the file does not state: ``hours`` (the
        reference is then the file's ``reftime`` variable) or ``hours since 1996-01-05``.
    """

    path: str
    variables: dict[str, VariableSpec] = field(default_factory=dict)
    select: dict[str, float | int | str] = field(default_factory=dict)
    assume_time: str | None = None
    forecast_step: str | None = None
    time_units: str | None = None


@dataclass
class PrepareConfig:
    """Options of ``weathermodel prepare``.

    Attributes
    ----------
    sources : inputs; all must be on one grid.
    output : path of the training store (zarr v3) to write.
    variables : canonical variables to keep (empty: all recognised).
    levels : pressure levels in hPa to keep (empty: all).
    start, end : ISO times bounding the record (inclusive); empty: all.
    time_step : expected step (``6h``); empty: the most common step in the data.
    on_gap : ``error`` refuses irregular or missing time steps; ``skip`` keeps the record and
        marks the windows that would cross a gap as unusable.
    max_missing_fraction : largest fraction of missing (NaN) values allowed per variable and
        time block; missing values are kept as NaN and excluded from statistics. A forcing's
        NaNs at points missing at the first and the last time of the record (a land mask, e.g.
        sea surface temperature) are a mask, recorded in the notes, and do not count.
    time_block : time steps computed and written per task (bounds memory).
    compressor : ``none`` (fastest reads) or ``zstd`` (smaller store).
    dask_scheduler : address of a dask distributed scheduler; empty: local threads.
    statistics : period (inclusive) of the normalisation statistics written into the store
        (e.g. the training months, so that validation and test months do not leak into them);
        empty: the whole record. The times actually used are recorded in the store metadata
        as ``statistics_period``. Training computes (and caches in the store) statistics of
        its own training range when it differs.
    """

    sources: list[SourceSpec]
    output: str
    variables: list[str] = field(default_factory=list)
    levels: list[float] = field(default_factory=list)
    start: str | None = None
    end: str | None = None
    time_step: str | None = None
    on_gap: Literal["error", "skip"] = "error"
    max_missing_fraction: float = 0.0
    time_block: int = 32
    compressor: Literal["none", "zstd"] = "none"
    dask_scheduler: str | None = None
    statistics: DateRange | None = None

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("no sources given", "name at least one input file or store")
        for name in self.variables:
            if name not in VARIABLES:
                raise ConfigError(f"unknown canonical variable '{name}' in 'variables'",
                                  f"use one of {sorted(VARIABLES)}")
        if not 0.0 <= self.max_missing_fraction <= 1.0:
            raise ConfigError("'max_missing_fraction' must lie in [0, 1]", "give a fraction")
        if self.time_block < 1:
            raise ConfigError("'time_block' must be at least 1", "give a positive integer")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:
                parse_time(value, name)
        if self.time_step is not None:
            parse_timedelta(self.time_step, "time_step")
        if self.statistics is not None:
            self.statistics.validate()


@dataclass
class DateRange:
    """An inclusive range of initialisation times (ISO strings)."""

    start: str
    end: str

    def validate(self) -> None:
        if parse_time(self.start, "start") > parse_time(self.end, "end"):
            raise ConfigError(f"date range starts ({self.start}) after it ends ({self.end})",
                              "swap start and end")


@dataclass
class DataConfig:
    """Options of the training loader.

    Attributes
    ----------
    store : path of a training store written by ``weathermodel prepare``.
    history : number of input states (1 = current state only, 2 = GraphCast style).
    rollout : number of target states after the last input.
    train, validation, test : ranges of initialisation times (the last input state's time).
        Every time of a window must lie in the range, so that ranges do not leak into
        each other.
    time_step : the model's time step (``6h``), a positive multiple of the store's step;
        empty: the store's step. Windows are then states that many store steps apart.
    statistics : period of the normalisation statistics; empty: the training range (or the
        store's own statistics when ``train`` is empty). A period overlapping the validation or
        test range is allowed but logged as a warning (it leaks them into the normalisation).
    batch_size : samples per batch on each process.
    num_workers : loader worker processes per training process.
    prefetch_factor : batches loaded in advance by each worker.

    Missing values (NaN in the store) are returned as NaN; the model imputes them.
    """

    store: str
    history: int = 1
    rollout: int = 1
    train: DateRange | None = None
    validation: DateRange | None = None
    test: DateRange | None = None
    time_step: str | None = None
    statistics: DateRange | None = None
    batch_size: int = 4
    num_workers: int = 0
    prefetch_factor: int = 2

    def validate(self) -> None:
        if self.history < 1 or self.rollout < 1:
            raise ConfigError("'history' and 'rollout' must be at least 1",
                              "give positive integers")
        if self.time_step is not None and parse_timedelta(self.time_step, "time_step") <= \
                pd.Timedelta(0):
            raise ConfigError(f"'time_step' = {self.time_step!r} is not a positive duration",
                              "give the model's step, e.g. 6h, or leave it empty for the "
                              "store's step")
        for period in (self.train, self.validation, self.test, self.statistics):
            if period is not None:
                period.validate()
        if self.batch_size < 1:
            raise ConfigError("'batch_size' must be at least 1", "give a positive integer")


def _parse(parser, value: str, what: str, example: str):
    try:
        parsed = parser(value)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"'{what}' = {value!r} is not valid", f"write {example}") from error
    if pd.isna(parsed):
        raise ConfigError(f"'{what}' = {value!r} is not valid", f"write {example}")
    return parsed


def parse_time(value: str, what: str = "time") -> pd.Timestamp:
    """Parse an ISO time; naive times are UTC. Raises ConfigError naming ``what``."""
    stamp = _parse(pd.Timestamp, value, what, "an ISO time such as 2013-01-01 or 2013-01-01T06")
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp


_LOWERCASE_DAY = re.compile(r"(?<=\d)\s*d(?![a-z])")


def parse_timedelta(value: str, what: str = "duration") -> pd.Timedelta:
    """Parse a duration such as ``6h``, ``1d`` or ``30min`` (``d`` is read as pandas' ``D``,
    whose lowercase spelling pandas deprecates)."""
    if isinstance(value, str):
        value = _LOWERCASE_DAY.sub("D", value)
    return _parse(pd.Timedelta, value, what, "a duration such as 6h, 1d or 30min")

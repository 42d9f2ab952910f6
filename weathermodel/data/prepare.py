"""``weathermodel prepare``: sources in, a complete training store out, resumable.

The workflow: open and normalise every source (lazily), combine them into channels, check the
time axis, create or resume the store, write it block by block (each block recorded in a
progress file only after it is written), then compute statistics in one streaming pass and only
then mark the store complete. A new store is refused before anything is written when its
estimated size exceeds the free space of the output's file system; a run stopped by a full
disk, a killed process or bad input resumes with the same command.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from tqdm.auto import tqdm

import weathermodel
from weathermodel import conventions
from weathermodel.configuration import config_to_dict
from weathermodel.data import store
from weathermodel.data.config import DateRange, PrepareConfig, parse_time, parse_timedelta
from weathermodel.data.forcings import compute_forcings, grid_static_fields
from weathermodel.data.grid import describe_grid
from weathermodel.data.normalize import CanonicalSource, to_canonical
from weathermodel.data.sources import OpenedSource, open_sources
from weathermodel.data.statistics import (period_indices, period_label, pooled_statistics,
                                          store_statistics)
from weathermodel.data.timeaxis import TimeAxisReport, inspect_time_axis
from weathermodel.errors import DataError, StoreError

log = logging.getLogger(__name__)


@dataclass
class CombinedSources:
    """All sources as channels: ``state`` (time, number, channel, lat, lon), lazily."""

    state: xr.DataArray
    statics: xr.DataArray | None
    channel_variables: list[str]
    channel_levels: list[float]
    notes: list[str]
    #: the input file(s) each channel comes from, to name them in errors found while writing
    channel_sources: list[str] = field(default_factory=list)
    #: fixed masks of forcing channels: channel index -> (number, latitude, longitude) bool,
    #: True where the forcing is NaN at the first and the last time of the record (e.g. sea
    #: surface temperature over land); those NaNs are not missing data (see _check_missing)
    forcing_masks: dict[int, np.ndarray] = field(default_factory=dict)


_NO_LEVEL = float("nan")  # the level key of single-level variables


def _check_same_grid(reference: CanonicalSource, other: CanonicalSource) -> None:
    first, second = reference.any_field(), other.any_field()
    if first is None or second is None:
        _refuse_empty_source(other if second is None else reference)
    for name in (conventions.LATITUDE, conventions.LONGITUDE):
        a, b = first[name].values, second[name].values
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-5):
            raise DataError(
                f"mixed grids: its {name} ({b.size} points, {b[0]:g}..{b[-1]:g}) differs from "
                f"that of '{reference.path}' ({a.size} points, {a[0]:g}..{a[-1]:g})",
                "regrid all sources to one grid before prepare, or prepare them separately",
                path=other.path)


def _concat_time(pieces: list[xr.DataArray], name: str) -> xr.DataArray:
    if len(pieces) == 1:
        return pieces[0]
    combined = xr.concat(pieces, dim=conventions.TIME, join="exact")
    return combined.sortby(conventions.TIME)


def _refuse_empty_source(source: CanonicalSource) -> None:
    found = f" (its variables: {source.skipped})" if source.skipped else ""
    raise DataError(f"no known variable in this source{found}",
                    "map its variables to canonical names under sources[].variables "
                    "(e.g. variables: {NAME: {name: 2m_temperature}}), or remove the source",
                    path=source.path)


def _fixed_forcing_masks(state: xr.DataArray, variables: list[str]) -> dict[int, np.ndarray]:
    """NaN masks of the forcing channels: NaN at both the first and the last time."""
    indices = [i for i, name in enumerate(variables) if conventions.VARIABLES[name].kind == "forcing"]
    if not indices:
        return {}
    ends = state.isel({conventions.TIME: [0, -1], conventions.CHANNEL: indices}).values  # (2, member, c, y, x)
    masks = np.isnan(ends).all(axis=0)
    return {index: masks[:, k] for k, index in enumerate(indices) if masks[:, k].any()}


def combine_sources(sources: list[CanonicalSource], config: PrepareConfig) -> CombinedSources:
    """Stack canonical variables into channels, on one grid and one time axis.

    Time-varying variables (whatever their role: state, forcing or diagnostic) become the
    channels of ``state``; static fields (land-sea mask, surface geopotential) are taken from
    the first source that has them.
    """
    if not sources:
        raise DataError("no source given", "name at least one input file or store")
    for source in sources:
        if source.any_field() is None:
            _refuse_empty_source(source)
    for other in sources[1:]:
        _check_same_grid(sources[0], other)
    pieces: dict[str, list[xr.DataArray]] = {}
    origins: dict[str, list[str]] = {}
    statics_found: dict[str, xr.DataArray] = {}
    for source in sources:
        for name, array in source.variables.items():
            index = pd.DatetimeIndex(array[conventions.TIME].values)
            if index.has_duplicates or not index.is_monotonic_increasing:
                # refuse here: selecting start..end on such an axis fails with a bare pandas error
                inspect_time_axis(array[conventions.TIME].values, None, source.path)
            pieces.setdefault(name, []).append(array)
            origins.setdefault(name, []).append(source.path)
        for name, array in source.statics.items():
            statics_found.setdefault(name, array)
    computed = [name for name in config.variables if conventions.VARIABLES[name].kind == "computed"]
    if computed:
        raise DataError(f"{computed} are computed by weathermodel as forcings (in the store's "
                        "'forcings'), never read from sources", "remove them from 'variables'",
                        path=sources[0].path, variable=computed[0])
    wanted = list(config.variables) or [v for v in conventions.VARIABLES
                                        if v in pieces or v in statics_found]
    missing = [name for name in wanted if name not in pieces and name not in statics_found]
    if missing:
        raise DataError(f"variable(s) {missing} are in none of the sources (found: "
                        f"{sorted(pieces)})", "add a source that has them, or remove them from "
                        "'variables'", path=sources[0].path, variable=missing[0])
    start = parse_time(config.start, "start") if config.start else None
    end = parse_time(config.end, "end") if config.end else None
    state_arrays, channel_variables, channel_levels = [], [], []
    statics = [statics_found[name].rename(name) for name in wanted if name in statics_found]
    channel_sources = []
    for name in wanted:
        info = conventions.VARIABLES[name]
        if name not in pieces:  # a static field, taken above
            continue
        paths = list(dict.fromkeys(origins[name]))
        where = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} other files)"
        by_level: dict[float, list[xr.DataArray]] = {}
        for array in pieces[name]:
            if info.has_levels:
                for level in array[conventions.LEVEL].values:
                    by_level.setdefault(float(level), []).append(
                        array.sel({conventions.LEVEL: level}).drop_vars(conventions.LEVEL))
            else:
                # one shared NaN object: float("nan") != float("nan"), so a fresh one per
                # source would make a separate channel of every file of a single-level variable
                by_level.setdefault(_NO_LEVEL, []).append(array)
        levels = sorted(by_level)
        if info.has_levels and config.levels:
            absent = [lv for lv in config.levels if lv not in by_level]
            if absent:
                raise DataError(f"level(s) {absent} hPa not in the sources (found {levels})",
                                "remove them from 'levels'", variable=name,
                                path=sources[0].path)
            levels = [lv for lv in levels if lv in config.levels]
        for level in levels:
            array = _concat_time(by_level[level], name)
            if len(by_level[level]) > 1:  # overlapping files: name the duplicated times
                inspect_time_axis(array[conventions.TIME].values, None, where)
            array = array.sel({conventions.TIME: slice(start, end)})
            state_arrays.append(array)
            channel_variables.append(name)
            channel_levels.append(level)
            channel_sources.append(where)
    if not state_arrays:
        raise DataError("only static fields found; nothing to train on",
                        "add time-varying variables", path=sources[0].path)
    try:
        state = xr.concat(state_arrays, dim=conventions.CHANNEL, join="exact", coords="minimal",
                          compat="override")
    except ValueError as error:
        raise DataError(f"the sources cover different times or members ({error})",
                        "set start/end so that every source covers the same times",
                        path=sources[0].path) from error
    channels = [conventions.channel_name(v, None if np.isnan(lv) else lv)
                for v, lv in zip(channel_variables, channel_levels)]
    state = state.assign_coords({conventions.CHANNEL: channels}).transpose(
        conventions.TIME, conventions.MEMBER, conventions.CHANNEL, conventions.LATITUDE, conventions.LONGITUDE)
    # statics on the grid of the state (the grids were checked equal to within 1e-5 degrees)
    static = xr.concat(statics, dim="static", join="override").assign_coords(
        {"static": [s.name for s in statics], conventions.LATITUDE: state[conventions.LATITUDE].values,
         conventions.LONGITUDE: state[conventions.LONGITUDE].values}) if statics else None
    notes = [note for source in sources for note in source.notes]
    masks = _fixed_forcing_masks(state, channel_variables) if state.sizes[conventions.TIME] else {}
    for index, mask in masks.items():
        notes.append(f"{channels[index]}: NaN at {mask.mean():.1%} of the grid at the first "
                     "and the last time: a fixed mask (e.g. land), not missing data")
    return CombinedSources(state, static, channel_variables, channel_levels, notes, channel_sources,
                    masks)


def _fingerprint(config: PrepareConfig, opened: list[OpenedSource]) -> str:
    relevant = config_to_dict(config)
    # options that change neither the values nor the layout of the store: changing them
    # resumes the same store
    for key in ("output", "dask_scheduler", "max_missing_fraction"):
        relevant.pop(key, None)
    if relevant.get("statistics") is None:  # the default: stores made before the option match
        relevant.pop("statistics", None)
    relevant["checksums"] = [source.checksum for source in opened]
    relevant["format_version"] = store.FORMAT_VERSION
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def dask_context(scheduler: str | None) -> Iterator[None]:
    """Run on a distributed cluster when given its address; local threads otherwise."""
    if not scheduler:
        yield
        return
    from distributed import Client

    with Client(scheduler) as client:
        log.info("using dask cluster %s (%d workers)", scheduler,
                 len(client.scheduler_info()["workers"]))
        yield


def _check_missing(block: np.ndarray, combined: CombinedSources, limit: float, t0: int,
                   times: np.ndarray, path: str) -> None:
    """Refuse a block (time, number, channel, lat, lon) with more missing values (NaN) per
    channel than ``limit`` (``max_missing_fraction``).

    The NaNs of a forcing (registry kind ``forcing``, e.g. sea surface temperature) at the
    points of its fixed mask (NaN at the record's first and last times, e.g. land) are not
    missing data and are not counted; any other NaN of a forcing is. NaNs of every other
    variable always count.
    """
    missing = np.isnan(block)
    for channel, mask in combined.forcing_masks.items():
        missing[:, :, channel] &= ~mask
    fractions = missing.mean(axis=(0, 1, 3, 4))
    for channel in np.flatnonzero(fractions > limit):
        variable = combined.channel_variables[channel]
        raise DataError(
            f"{fractions[channel]:.1%} of the values of channel "
            f"'{combined.state[conventions.CHANNEL].values[channel]}' are missing (NaN) in the block from "
            f"{pd.Timestamp(times[t0])}; the limit max_missing_fraction is {limit:.1%}",
            "fill or mask the missing values, or raise max_missing_fraction if they are "
            "expected (e.g. outside a regional domain); the same command with the new limit "
            "resumes the partly written store",
            path=combined.channel_sources[channel] if combined.channel_sources else path,
            variable=variable)


def _metadata(config: PrepareConfig, combined: CombinedSources, report: TimeAxisReport,
              opened: list[OpenedSource], fingerprint: str) -> dict:
    state = combined.state
    variables = []
    for name in dict.fromkeys(combined.channel_variables):
        info = conventions.VARIABLES[name]
        levels = [lv for v, lv in zip(combined.channel_variables, combined.channel_levels)
                  if v == name and not np.isnan(lv)]
        variables.append({"name": name, "units": info.units, "standard_name": info.standard_name,
                          "levels": levels})
    return {
        "format_version": store.FORMAT_VERSION,
        "package_version": weathermodel.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "fingerprint": fingerprint,
        "variables": variables,
        "channels": [str(c) for c in state[conventions.CHANNEL].values],
        "levels": sorted({lv for lv in combined.channel_levels if not np.isnan(lv)}),
        "forcings": list(conventions.FORCING_NAMES),
        "statics": list(conventions.GRID_STATIC_NAMES) + (
            [str(s) for s in combined.statics["static"].values]
            if combined.statics is not None else []),
        "grid": describe_grid(state[conventions.LATITUDE].values, state[conventions.LONGITUDE].values).to_dict(),
        "time_step_seconds": int(report.step.total_seconds()),
        "time_range": [str(pd.Timestamp(state[conventions.TIME].values[0])),
                       str(pd.Timestamp(state[conventions.TIME].values[-1]))],
        "n_times": int(state.sizes[conventions.TIME]),
        "n_members": int(state.sizes[conventions.MEMBER]),
        "gaps": [list(g) for g in report.gaps],
        "sources": [{"path": str(Path(s.path).resolve()) if not s.path.startswith(
            ("http", "gs:", "s3:")) else s.path, "checksum": s.checksum,
            "size_bytes": s.size_bytes} for s in opened],
        "notes": combined.notes,
        "config": config_to_dict(config),
    }


def _open_all(config: PrepareConfig) -> tuple[list[OpenedSource], list[CanonicalSource]]:
    opened, canonical = [], []
    for spec in config.sources:
        for source in open_sources(spec.path):
            opened.append(source)
            canonical.append(to_canonical(source.dataset, spec, source.path))
    return opened, canonical


def _partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _prepare_target(output: Path, fingerprint: str, overwrite: bool) -> tuple[str, Path]:
    """Decide what to do and where: ('create' | 'resume' | 'done', path to write).

    A store being replaced (``--overwrite``) is rebuilt beside it, in ``<output>.partial``,
    and swapped in only when complete, so a failure never costs the existing store.
    """
    if not output.exists():
        return "create", output
    metadata = store.read_metadata(output) if output.is_dir() else None
    if metadata is not None and metadata.get("fingerprint") == fingerprint and not overwrite:
        return ("done" if metadata.get("complete") else "resume"), output
    if metadata is None and (not output.is_dir() or any(output.iterdir())):
        # --overwrite replaces weathermodel stores only, never a file or a folder of other things
        raise StoreError("the output path already holds something that is not a weathermodel "
                         "store; it is left untouched (--overwrite replaces only stores)",
                         "choose another output path, or move what is there out of the way",
                         path=str(output))
    if not overwrite:
        what = ("a store made from other inputs or options" if metadata is not None
                else "an empty folder")
        raise StoreError(f"the output path already holds {what}; it is left untouched",
                         "choose another output path, or pass --overwrite to replace it",
                         path=str(output))
    if metadata is None:  # an empty folder
        output.rmdir()
        return "create", output
    partial = _partial_path(output)
    partial_metadata = store.read_metadata(partial) if partial.is_dir() else None
    if partial_metadata is not None and partial_metadata.get("fingerprint") == fingerprint:
        return "resume", partial
    return "create", partial


def _swap_into_place(partial: Path, output: Path) -> None:
    """Replace ``output`` by the complete store at ``partial`` (directory renames)."""
    retired = output.with_name(output.name + ".replaced")
    store.remove_store(retired)
    output.rename(retired)
    partial.rename(output)
    store.remove_store(retired)


def prepare(config: PrepareConfig, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the whole prepare workflow; returns the path of the complete store."""
    output = Path(config.output)
    opened, canonical = _open_all(config)
    combined = combine_sources(canonical, config)
    times = combined.state[conventions.TIME].values
    declared = parse_timedelta(config.time_step, "time_step") if config.time_step else None
    report = inspect_time_axis(times, declared, opened[0].path)
    if report.gaps and config.on_gap == "error":
        raise DataError(report.describe(), "fix the input, or pass --on-gap skip to keep the "
                        "record and skip the training windows that cross a gap",
                        path=opened[0].path)
    period_indices(times, config.statistics, str(output))  # refuse an empty period up front
    for note in combined.notes:
        log.info(note)
    fingerprint = _fingerprint(config, opened)
    action, work = _prepare_target(output, fingerprint, overwrite)
    if action == "done":
        log.info("%s is already complete; nothing to do", output)
        return output
    if action == "create":
        store.remove_store(work)  # only ever a stale <output>.partial
        metadata = _metadata(config, combined, report, opened, fingerprint)
        state = combined.state
        layout = store.StoreLayout(
            times=times, members=state[conventions.MEMBER].values, channels=metadata["channels"],
            channel_variables=combined.channel_variables, channel_levels=combined.channel_levels,
            latitude=state[conventions.LATITUDE].values, longitude=state[conventions.LONGITUDE].values,
            static_names=metadata["statics"], compressor=config.compressor)
        store.require_free_space(work, store.estimated_store_bytes(layout), "the training store")
        store.create_store(work, layout, metadata)
        store.save_progress(work, {"fingerprint": fingerprint, "blocks_done": []})
    else:  # resume: drop the half-written temporary chunk files of a killed run
        removed = store.remove_partial_writes(work)
        if removed:
            log.info("%s: removed %d temporary file(s) of an interrupted run", work, removed)
    with dask_context(config.dask_scheduler):
        _write_blocks(work, combined, report, config, progress)
        _finalise(work, combined, config.statistics)
    if work != output:
        _swap_into_place(work, output)
    return output


def _write_blocks(output: Path, combined: CombinedSources, report: TimeAxisReport,
                  config: PrepareConfig, progress: bool) -> None:
    state = combined.state
    times = state[conventions.TIME].values
    lat, lon = state[conventions.LATITUDE].values, state[conventions.LONGITUDE].values
    done_payload = store.load_progress(output)
    done = set(done_payload.get("blocks_done", []))
    if "static" not in done:
        grid_static = grid_static_fields(lat, lon)
        source_static = (combined.statics.values.astype("float32")
                         if combined.statics is not None else np.zeros((0, *grid_static.shape[1:]),
                                                                      "float32"))
        store.write_array(output, "statics", np.concatenate([grid_static, source_static]),
                       ("static", conventions.LATITUDE, conventions.LONGITUDE), (slice(None),) * 3)
        store.write_array(output, "consecutive", report.consecutive, (conventions.TIME,), (slice(None),))
        done.add("static")
    n_blocks = -(-times.size // config.time_block)
    todo = [b for b in range(n_blocks) if b not in done]
    for block in tqdm(todo, desc="prepare: writing", unit="block", disable=not progress):
        t0, t1 = block * config.time_block, min((block + 1) * config.time_block, times.size)
        values = state.isel({conventions.TIME: slice(t0, t1)}).data
        values = np.asarray(values.compute() if isinstance(values, da.Array) else values,
                            dtype="float32")
        _check_missing(values, combined, config.max_missing_fraction, t0, times, str(output))
        store.write_array(output, "state", values, (), (slice(t0, t1),))
        store.write_array(output, "forcings", compute_forcings(times[t0:t1], lat, lon), (),
                       (slice(t0, t1),))
        done.add(block)
        store.save_progress(output, {**done_payload, "blocks_done": sorted(done, key=str)})


def _finalise(output: Path, combined: CombinedSources, period: DateRange | None = None) -> None:
    """Statistics in one streaming pass over ``period`` (None: the whole record), then mark
    the store complete."""
    group = zarr.open_group(str(output), mode="r")
    times = combined.state[conventions.TIME].values
    first, stop = period_indices(times, period, str(output))
    stats = store_statistics(group, first, stop)
    forcing_mean, forcing_std = stats.pop("forcing_mean"), stats.pop("forcing_std")
    for name, values in stats.items():
        store.write_array(output, name, values, (conventions.CHANNEL,))
    store.write_array(output, "forcing_mean", forcing_mean, ("forcing",))
    store.write_array(output, "forcing_std", forcing_std, ("forcing",))
    static = group["statics"][:].astype("float64")
    store.write_array(output, "static_mean", static.mean(axis=(1, 2)), ("static",))
    store.write_array(output, "static_std", static.std(axis=(1, 2)), ("static",))
    groups: dict[str, list[int]] = {}
    for index, variable in enumerate(combined.channel_variables):
        groups.setdefault(variable, []).append(index)
    channel_stats = {str(channel): {k: float(stats[k][i]) for k in stats}
                     for i, channel in enumerate(combined.state[conventions.CHANNEL].values)}
    store.update_metadata(output, statistics=channel_stats,
                       variable_statistics=pooled_statistics(stats, groups),
                       statistics_period=period_label(times, first, stop), complete=True)
    log.info("%s complete", output)

"""The training store: one zarr v3 group that a model reads without looking anything else up.

Layout (all float32, chunked one time step per chunk so that one state is one read)::

    state     (time, number, channel, latitude, longitude)
    forcings  (time, forcing, latitude, longitude)   computed from solar geometry and time
    static    (static, latitude, longitude)          grid fields + static fields of the source
    consecutive (time)  bool, True when the previous time is exactly one step earlier
    mean, std, min, max, tendency_std, missing_fraction (channel)   statistics, written last,
        over ``statistics_period`` with tendencies at the store's step
    forcing_mean, forcing_std (forcing); static_mean, static_std (static)

The group attribute ``weathermodel`` holds the metadata (format version, variables, levels,
units, grid, time step, sources with checksums, package version, configuration, conversion
notes, per-variable statistics, ``statistics_period``: the first and last time the statistics
arrays are computed from) and ``complete``, set only once the statistics are final.
The attribute ``weathermodel_statistics`` caches statistics computed later for other periods or
time steps (e.g. a training range at a 6-hour model step on an hourly store), keyed by period
and step, so that later runs and other ranks reuse them.
The attribute ``weathermodel_progress`` records the blocks written so far, so that an interrupted
``prepare`` resumes. zarr's local store writes every chunk and ``zarr.json`` through a temporary
file and a rename, so a reader never sees half a chunk. The store opens in xarray as it is
(``xr.open_zarr(path)``).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from weathermodel import conventions
from weathermodel.errors import OutputError, StoreError

FORMAT_VERSION = 1
PROGRESS_ATTRIBUTE = "weathermodel_progress"
STATISTICS_CACHE_ATTRIBUTE = "weathermodel_statistics"
#: bumped when the way cached statistics are computed changes: older entries are then ignored
STATISTICS_CACHE_VERSION = 1

log = logging.getLogger(__name__)
#: allocation unit assumed per chunk file when estimating the size of a store on disk
_BLOCK_BYTES = 4096


@dataclass
class StoreLayout:
    """Everything needed to create an empty store."""

    times: np.ndarray
    members: np.ndarray
    channels: list[str]
    channel_variables: list[str]
    channel_levels: list[float]
    latitude: np.ndarray
    longitude: np.ndarray
    static_names: list[str]
    compressor: str


def _encoding(layout: StoreLayout) -> dict[str, dict]:
    compressors = None if layout.compressor == "none" else [
        {"name": "zstd", "configuration": {"level": 3, "checksum": False}}]
    n_channel, n_forcing = len(layout.channels), len(conventions.FORCING_NAMES)
    shape = (layout.latitude.size, layout.longitude.size)
    return {
        "state": {"chunks": (1, 1, n_channel, *shape), "compressors": compressors},
        "forcings": {"chunks": (1, n_forcing, *shape), "compressors": compressors},
        "statics": {"chunks": (len(layout.static_names), *shape), "compressors": compressors},
        "time": {"units": "seconds since 1970-01-01 00:00:00", "calendar": "proleptic_gregorian",
                 "dtype": "int64"},
    }


def chunk_files_bytes(n_chunks: int, chunk_bytes: int) -> int:
    """Disk space of ``n_chunks`` uncompressed chunk files of ``chunk_bytes`` each (rounded up
    to whole file-system blocks)."""
    return int(n_chunks) * -(-int(chunk_bytes) // _BLOCK_BYTES) * _BLOCK_BYTES


def estimated_store_bytes(layout: StoreLayout) -> int:
    """Upper bound of the disk space of a complete store (uncompressed chunks): one state
    chunk per (time, member), one forcing chunk per time, the statics."""
    grid = layout.latitude.size * layout.longitude.size * 4
    n_time, n_member = layout.times.size, layout.members.size
    return (chunk_files_bytes(n_time * n_member, len(layout.channels) * grid)
            + chunk_files_bytes(n_time, len(conventions.FORCING_NAMES) * grid)
            + chunk_files_bytes(1, len(layout.static_names) * grid))


def _human(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n_bytes) < 1000 or unit == "TB":
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.3g} TB"  # pragma: no cover


def require_free_space(path: str | Path, needed_bytes: int, what: str) -> None:
    """Refuse to start an output that cannot fit on its file system.

    Parameters
    ----------
    path : the output about to be created (it need not exist yet).
    needed_bytes : estimated size of the complete output.
    what : the output in words, e.g. "the training store".

    Raises
    ------
    OutputError : naming the path, the space needed and free, and what to do.
    """
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # no way to tell: let the writes report it
        return
    if needed_bytes > free:
        raise OutputError(
            f"{what} needs about {_human(needed_bytes)}, but only {_human(free)} are free on the "
            f"file system of '{folder}'; nothing was written",
            "free some space, choose another output path (--out) on a larger disk, or ask for "
            "less (a shorter period, fewer variables, start dates, leads or members)",
            path=str(path))


def remove_partial_writes(path: str | Path) -> int:
    """Delete the temporary files a killed writer leaves inside a store (zarr writes every
    chunk to ``<chunk>.<hex>.partial`` and renames it); returns how many were removed."""
    removed = 0
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    return removed


def create_store(path: Path, layout: StoreLayout, metadata: dict[str, Any]) -> None:
    """Write the empty store (metadata, coordinates, unfilled arrays) with ``complete=False``."""
    import dask.array as da

    n_time, n_member = layout.times.size, layout.members.size
    shape = (layout.latitude.size, layout.longitude.size)
    dims_state = (conventions.TIME, conventions.MEMBER, conventions.CHANNEL, conventions.LATITUDE, conventions.LONGITUDE)
    template = xr.Dataset(
        {
            "state": (dims_state, da.zeros((n_time, n_member, len(layout.channels), *shape),
                                           dtype="float32", chunks=-1)),
            "forcings": ((conventions.TIME, "forcing", conventions.LATITUDE, conventions.LONGITUDE),
                         da.zeros((n_time, len(conventions.FORCING_NAMES), *shape), dtype="float32",
                                  chunks=-1)),
            "statics": (("static", conventions.LATITUDE, conventions.LONGITUDE),
                       da.zeros((len(layout.static_names), *shape), dtype="float32", chunks=-1)),
        },
        coords={
            conventions.TIME: layout.times,
            conventions.MEMBER: layout.members,
            conventions.CHANNEL: np.asarray(layout.channels, dtype=object),
            "channel_variable": (conventions.CHANNEL, np.asarray(layout.channel_variables, dtype=object)),
            "channel_level": (conventions.CHANNEL, np.asarray(layout.channel_levels, dtype="float64")),
            "forcing": np.asarray(conventions.FORCING_NAMES, dtype=object),
            "static": np.asarray(layout.static_names, dtype=object),
            conventions.LATITUDE: (conventions.LATITUDE, layout.latitude, {"units": "degrees_north",
                                                         "standard_name": "latitude"}),
            conventions.LONGITUDE: (conventions.LONGITUDE, layout.longitude, {"units": "degrees_east",
                                                            "standard_name": "longitude"}),
        },
        attrs={"weathermodel": {**metadata, "complete": False},
               "Conventions": "CF-1.8"},
    )
    template.to_zarr(path, mode="w", compute=False, zarr_format=3, consolidated=False,
                     encoding=_encoding(layout))


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The ``weathermodel`` metadata of a store, or None when the path is not such a store."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        return None
    return dict(group.attrs.get("weathermodel", {})) or None


def update_metadata(path: str | Path, **changes: Any) -> None:
    group = zarr.open_group(str(path), mode="r+")
    metadata = dict(group.attrs["weathermodel"])
    metadata.update(changes)
    group.attrs["weathermodel"] = metadata


def write_array(path: str | Path, name: str, values: np.ndarray, dims: tuple[str, ...],
                index: tuple[slice, ...] | None = None) -> None:
    """Write values into an existing array, or create a small uncompressed one."""
    group = zarr.open_group(str(path), mode="r+")
    if name in group and index is not None:
        group[name][index] = values
        return
    array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                               dimension_names=dims, overwrite=True, compressors=None)
    array[...] = values


def load_progress(path: Path) -> dict[str, Any]:
    """Which blocks of an interrupted ``prepare`` are already written (group attribute)."""
    group = zarr.open_group(str(path), mode="r")
    return dict(group.attrs.get(PROGRESS_ATTRIBUTE, {}))


def save_progress(path: Path, payload: dict[str, Any]) -> None:
    """Record progress; zarr's local store replaces ``zarr.json`` atomically."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs[PROGRESS_ATTRIBUTE] = payload


def statistics_cache_key(period: list[str], time_step_seconds: int) -> str:
    """Key of cached statistics: the first and last time used and the tendency step."""
    return f"{period[0]}/{period[1]}/{int(time_step_seconds)}s"


def read_cached_statistics(path: str | Path, key: str) -> dict[str, np.ndarray] | None:
    """Statistics cached under ``key`` (float64 arrays by name), or None when absent or made
    by another version of the computation."""
    group = zarr.open_group(str(path), mode="r")
    entry = dict(group.attrs.get(STATISTICS_CACHE_ATTRIBUTE, {})).get(key)
    if not entry or entry.get("version") != STATISTICS_CACHE_VERSION:
        return None
    return {name: np.asarray(values, dtype="float64")
            for name, values in entry["values"].items()}


def write_cached_statistics(path: str | Path, key: str, stats: dict[str, np.ndarray]) -> bool:
    """Add statistics to the store's cache; returns False (and logs why) when the store cannot
    be written, e.g. a read-only copy: the caller then just uses what it computed.

    The whole group ``zarr.json`` is replaced in one rename, so a reader sees the old cache or
    the new one, never half. Writers of the same key write identical values (the computation is
    deterministic), so concurrent writers are harmless; two writers adding *different* keys at
    once may lose one of them, which is then computed again by its next user.
    """
    payload = {"version": STATISTICS_CACHE_VERSION,
               "values": {name: [float(v) for v in np.asarray(values, dtype="float64")]
                          for name, values in stats.items()}}
    try:
        group = zarr.open_group(str(path), mode="r+")
        cache = dict(group.attrs.get(STATISTICS_CACHE_ATTRIBUTE, {}))
        cache[key] = payload
        group.attrs[STATISTICS_CACHE_ATTRIBUTE] = cache
    except (OSError, ValueError, NotImplementedError) as error:
        log.warning("%s: statistics for %s computed but not cached (%s); every run computes "
                    "them again", path, key, error)
        return False
    return True


def remove_store(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def open_store(path: str | Path, require_complete: bool = True) -> xr.Dataset:
    """Open a training store as an xarray Dataset, refusing incomplete or foreign stores."""
    metadata = read_metadata(path)
    if metadata is None:
        raise StoreError("not a weathermodel training store (no 'weathermodel' metadata)",
                         "create it with 'weathermodel prepare'", path=str(path))
    if metadata.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"store format version {metadata.get('format_version')} is not the "
                         f"supported version {FORMAT_VERSION}",
                         "re-create the store with this version of 'weathermodel prepare'",
                         path=str(path))
    if require_complete and not metadata.get("complete"):
        raise StoreError("the store is incomplete (prepare was interrupted or failed)",
                         "run the same 'weathermodel prepare' command again to finish it",
                         path=str(path))
    return xr.open_zarr(str(path), consolidated=False, chunks={})

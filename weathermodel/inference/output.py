"""The forecast store: WeatherBench 2 layout, CF attributes, written one lead at a time.

Layout (zarr v3): one array per variable, dims ``time`` (initialisation), [``number``],
``prediction_timedelta``, [``level``], ``latitude``, ``longitude``, chunked one (init, member,
lead) per chunk, so each lead is written as soon as it is computed and one lead of one start
date is one read. ``valid_time = time + prediction_timedelta`` is a coordinate.

Restart bookkeeping lives beside the store (``<out>.progress/``): an empty marker per finished
start date, created only after all its leads are written. The store is marked complete and its
metadata consolidated only when every start date has finished. A store whose estimated size
exceeds the free space of its file system is refused before anything is written.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from weathermodel import conventions as cv
from weathermodel.data.store import chunk_files_bytes, require_free_space
from weathermodel.models.forecaster import ModelMetadata


def variable_layout(metadata: ModelMetadata) -> dict[str, list[tuple[int, float]]]:
    """For each predicted variable (prognostic and diagnostic; forcings are inputs only and
    not written), its (channel index, level) pairs in level order."""
    layout: dict[str, list[tuple[int, float]]] = {}
    for index in metadata.role_index(cv.PROGNOSTIC, cv.DIAGNOSTIC):
        variable, level = metadata.channel_variables[index], metadata.channel_levels[index]
        layout.setdefault(variable, []).append((index, level))
    return {name: sorted(pairs, key=lambda p: p[1]) for name, pairs in layout.items()}


def all_levels(metadata: ModelMetadata) -> list[float]:
    """The pressure levels (hPa) of the forecast store."""
    return sorted({level for pairs in variable_layout(metadata).values()
                   for _, level in pairs if not np.isnan(level)})


def estimated_forecast_bytes(metadata: ModelMetadata, n_inits: int, n_leads: int,
                             n_members: int) -> int:
    """Disk space of a complete forecast store: per variable, one uncompressed chunk of
    ([levels,] latitude, longitude) float32 per (start date, member, lead)."""
    grid = len(metadata.latitude) * len(metadata.longitude) * 4
    n_levels = len(all_levels(metadata))
    return sum(chunk_files_bytes(n_inits * n_members * n_leads,
                                 (1 if np.isnan(pairs[0][1]) else n_levels) * grid)
               for pairs in variable_layout(metadata).values())


def create_forecast_store(path: Path, metadata: ModelMetadata, init_times: np.ndarray,
                          n_leads: int, n_members: int, attrs: dict[str, Any]) -> None:
    """Write the empty store (metadata and coordinates only), after checking that the
    complete store fits in the free space of its file system."""
    require_free_space(path, estimated_forecast_bytes(metadata, init_times.size, n_leads,
                                                      n_members), "the forecast store")
    step = np.timedelta64(metadata.time_step_seconds, "s")
    leads = (np.arange(1, n_leads + 1) * step).astype("timedelta64[ns]")
    levels = all_levels(metadata)
    lat, lon = np.asarray(metadata.latitude), np.asarray(metadata.longitude)
    units = {v["name"]: v["units"] for v in metadata.variables}
    lead_dims = ["time"] + (["number"] if n_members > 1 else []) + ["prediction_timedelta"]
    data_vars, encoding = {}, {}
    for name, pairs in variable_layout(metadata).items():
        has_levels = not np.isnan(pairs[0][1])
        dims = lead_dims + (["level"] if has_levels else []) + ["latitude", "longitude"]
        shape = [init_times.size] + ([n_members] if n_members > 1 else []) + [n_leads] + (
            [len(levels)] if has_levels else []) + [lat.size, lon.size]
        chunks = [1] * len(lead_dims) + shape[len(lead_dims):]
        info = cv.VARIABLES.get(name)
        data_vars[name] = (dims, da.full(shape, np.nan, dtype="float32", chunks=-1),
                           {"units": units.get(name, ""), "long_name": name.replace("_", " "),
                            **({"standard_name": info.standard_name}
                               if info and info.standard_name else {})})
        encoding[name] = {"chunks": tuple(chunks), "compressors": None}
    coords: dict[str, Any] = {
        "time": ("time", init_times, {"standard_name": "forecast_reference_time",
                                      "long_name": "initialisation time"}),
        "prediction_timedelta": ("prediction_timedelta", leads,
                                 {"standard_name": "forecast_period", "long_name": "lead time"}),
        "valid_time": (("time", "prediction_timedelta"),
                       init_times[:, None] + leads[None, :], {"standard_name": "time"}),
        "latitude": ("latitude", lat, {"units": "degrees_north", "standard_name": "latitude"}),
        "longitude": ("longitude", lon, {"units": "degrees_east", "standard_name": "longitude"}),
    }
    if levels:
        coords["level"] = ("level", np.asarray(levels), {"units": "hPa",
                                                         "standard_name": "air_pressure",
                                                         "positive": "down"})
    if n_members > 1:
        coords["number"] = ("number", np.arange(n_members), {"long_name": "ensemble member"})
    dataset = xr.Dataset(data_vars, coords=coords,
                         attrs={"Conventions": "CF-1.8", "weathermodel_forecast": attrs})
    for name in ("valid_time",):
        encoding[name] = {"units": "hours since 1970-01-01", "dtype": "int64"}
    dataset.to_zarr(path, mode="w", compute=False, zarr_format=3, consolidated=False,
                    encoding=encoding)


class LeadWriter:
    """Writes one lead (all channels, all members) of one start date into the store."""

    def __init__(self, path: Path, metadata: ModelMetadata, n_members: int) -> None:
        group = zarr.open_group(str(path), mode="r+")
        self.layout = variable_layout(metadata)
        self.levels = all_levels(metadata)
        self.arrays = {name: group[name] for name in self.layout}
        self.n_members = n_members

    def write(self, time_index: int, lead_index: int, state: np.ndarray) -> None:
        """state: (members, channel, lat, lon) float32."""
        for name, pairs in self.layout.items():
            channels = [index for index, _ in pairs]
            values = state[:, channels]
            if not np.isnan(pairs[0][1]):
                full = np.full((state.shape[0], len(self.levels), *state.shape[2:]), np.nan,
                               dtype=np.float32)
                full[:, [self.levels.index(level) for _, level in pairs]] = values
                values = full
            else:
                values = values[:, 0]
            if self.n_members > 1:
                self.arrays[name][time_index, :, lead_index] = values
            else:
                self.arrays[name][time_index, lead_index] = values[0]


def progress_dir(path: Path) -> Path:
    return path.with_name(path.name + ".progress")


def mark_done(path: Path, time_index: int) -> None:
    folder = progress_dir(path)
    folder.mkdir(exist_ok=True)
    (folder / f"init-{time_index:06d}.done").touch()


def done_indices(path: Path) -> set[int]:
    folder = progress_dir(path)
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("-")[1].split(".")[0]) for p in folder.glob("init-*.done")}


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a forecast store marked complete (every start date finished)."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        return False
    return bool(dict(group.attrs.get("weathermodel_forecast", {})).get("complete"))


def finalise(path: Path, health: list[dict[str, Any]]) -> None:
    """Mark complete, record the health report, consolidate metadata, drop progress."""
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs["weathermodel_forecast"])
    attrs.update(complete=True, health=health)
    group.attrs["weathermodel_forecast"] = attrs
    with warnings.catch_warnings():  # consolidated metadata is a zarr v3 extension
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
    shutil.rmtree(progress_dir(path), ignore_errors=True)

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

import base64
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from xarray.coding.times import encode_cf_datetime, encode_cf_timedelta

from weathermodel import conventions
from weathermodel.data.chunk_files import array_metadata, plain_chunk_shape, write_chunk
from weathermodel.data.store import chunk_files_bytes, require_free_space
from weathermodel.models.forecaster import ModelMetadata


#: NaN as xarray records a float ``_FillValue`` in zarr v3 attributes (base64 of its float64)
_NAN_FILL_VALUE = base64.standard_b64encode(np.float64(np.nan).tobytes()).decode()


def variable_layout(metadata: ModelMetadata) -> dict[str, list[tuple[int, float]]]:
    """For each predicted variable (prognostic and diagnostic; forcings are inputs only and
    not written), its (channel index, level) pairs in level order."""
    layout: dict[str, list[tuple[int, float]]] = {}
    for index in metadata.role_index(conventions.PROGNOSTIC, conventions.DIAGNOSTIC):
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


def _variable_attrs(metadata: ModelMetadata, name: str) -> dict[str, str]:
    """CF attributes of a predicted variable (units, long name, standard name)."""
    units = {v["name"]: v["units"] for v in metadata.variables}
    info = conventions.VARIABLES.get(name)
    return {"units": units.get(name, ""), "long_name": name.replace("_", " "),
            **({"standard_name": info.standard_name} if info and info.standard_name else {})}


def forecast_coords(metadata: ModelMetadata, init_times: np.ndarray, leads: np.ndarray,
                    n_members: int) -> dict[str, Any]:
    """The coordinates of the WB2 forecast layout: ``time`` (initialisation),
    ``prediction_timedelta`` (lead), ``valid_time = time + prediction_timedelta``, [``level``
    (hPa)], ``latitude``, ``longitude`` and, for ensembles, ``number``; with CF attributes."""
    init_times = np.asarray(init_times, dtype="datetime64[ns]")
    leads = np.asarray(leads, dtype="timedelta64[ns]")
    levels = all_levels(metadata)
    coords: dict[str, Any] = {
        "time": ("time", init_times, {"standard_name": "forecast_reference_time",
                                      "long_name": "initialisation time"}),
        "prediction_timedelta": ("prediction_timedelta", leads,
                                 {"standard_name": "forecast_period", "long_name": "lead time"}),
        "valid_time": (("time", "prediction_timedelta"),
                       init_times[:, None] + leads[None, :], {"standard_name": "time"}),
        "latitude": ("latitude", np.asarray(metadata.latitude),
                     {"units": "degrees_north", "standard_name": "latitude"}),
        "longitude": ("longitude", np.asarray(metadata.longitude),
                      {"units": "degrees_east", "standard_name": "longitude"}),
    }
    if levels:
        coords["level"] = ("level", np.asarray(levels), {"units": "hPa",
                                                         "standard_name": "air_pressure",
                                                         "positive": "down"})
    if n_members > 1:
        coords["number"] = ("number", np.arange(n_members), {"long_name": "ensemble member"})
    return coords


def _lead_chunks(shape: list[int] | tuple[int, ...], n_members: int) -> tuple[int, ...]:
    """The chunk shape of a variable of ``shape``: one (start date, [member,] lead) per chunk,
    whole along [level,] latitude and longitude."""
    lead_dims = 3 if n_members > 1 else 2  # time, [number,] prediction_timedelta
    return (1,) * lead_dims + tuple(shape[lead_dims:])


def _variable_dims(has_levels: bool, n_members: int) -> list[str]:
    return (["time"] + (["number"] if n_members > 1 else []) + ["prediction_timedelta"]
            + (["level"] if has_levels else []) + ["latitude", "longitude"])


def _write_coordinates(group: zarr.Group, coords: dict[str, Any],
                       time_units: dict[str, str]) -> None:
    """Write ``coords`` (name: (dims, values, attrs)) as xarray's ``to_zarr`` does (zarr v3):
    times and time deltas CF-encoded as int64 (units inferred as xarray does, or from
    ``time_units``), floats with xarray's NaN ``_FillValue``, one chunk each."""
    for name, (dims, values, attrs) in coords.items():
        values, attrs, fill_value = np.asarray(values), dict(attrs), None
        if values.dtype.kind == "M":
            values, units, calendar = encode_cf_datetime(values, time_units.get(name),
                                                         dtype=np.dtype("int64"))
            attrs.update(units=units, calendar=calendar)
        elif values.dtype.kind == "m":
            dtype = str(values.dtype)
            values, units = encode_cf_timedelta(values, time_units.get(name),
                                                dtype=np.dtype("int64"))
            attrs.update(units=units, dtype=dtype)
        elif values.dtype.kind == "f":
            attrs["_FillValue"], fill_value = _NAN_FILL_VALUE, np.nan
        group.create_array(name, data=values, chunks=values.shape, fill_value=fill_value,
                           dimension_names=[dims] if isinstance(dims, str) else list(dims),
                           attributes=attrs)


def create_forecast_store(path: Path, metadata: ModelMetadata, init_times: np.ndarray,
                          n_leads: int, n_members: int, attrs: dict[str, Any]) -> None:
    """Write the empty store (metadata and coordinates only), after checking that the
    complete store fits in the free space of its file system."""
    require_free_space(path, estimated_forecast_bytes(metadata, init_times.size, n_leads,
                                                      n_members), "the forecast store")
    step = np.timedelta64(metadata.time_step_seconds, "s")
    leads = (np.arange(1, n_leads + 1) * step).astype("timedelta64[ns]")
    n_levels = len(all_levels(metadata))
    # straight through zarr, as xarray's to_zarr writes them: through xarray, the empty
    # variables (dask arrays) made it import dask.distributed (0.45 s) and the coordinates
    # dask.array (0.3 s; xarray checks every new variable's type against dask's)
    group = zarr.open_group(str(path), mode="w", zarr_format=3,
                            attributes={"Conventions": "CF-1.8", "coordinates": "valid_time",
                                        "weathermodel_forecast": attrs})
    _write_coordinates(group, forecast_coords(metadata, init_times, leads, n_members),
                       {"valid_time": "hours since 1970-01-01"})
    for name, pairs in variable_layout(metadata).items():
        has_levels = not np.isnan(pairs[0][1])
        shape = [init_times.size] + ([n_members] if n_members > 1 else []) + [n_leads] + (
            [n_levels] if has_levels else []) + [len(metadata.latitude), len(metadata.longitude)]
        group.create_array(name, shape=shape, chunks=_lead_chunks(shape, n_members),
                           dtype="float32", fill_value=np.nan, compressors=None,
                           dimension_names=_variable_dims(has_levels, n_members),
                           attributes={**_variable_attrs(metadata, name),
                                       "coordinates": "valid_time",
                                       "_FillValue": _NAN_FILL_VALUE})


def split_variables(metadata: ModelMetadata, state: np.ndarray) -> dict[str, np.ndarray]:
    """The predicted variables of ``state`` (..., channel, lat, lon): for each, an array
    (..., [level,] lat, lon) with the store's level order (NaN at levels a variable lacks)."""
    levels = all_levels(metadata)
    values_of = {}
    for name, pairs in variable_layout(metadata).items():
        values = state[..., [index for index, _ in pairs], :, :]
        if not np.isnan(pairs[0][1]):
            full = np.full((*state.shape[:-3], len(levels), *state.shape[-2:]), np.nan,
                           dtype=np.float32)
            full[..., [levels.index(level) for _, level in pairs], :, :] = values
            values = full
        else:
            values = values[..., 0, :, :]
        values_of[name] = values
    return values_of


def lead_dataset(metadata: ModelMetadata, state: np.ndarray, init_times: np.ndarray,
                 lead: np.timedelta64) -> xr.Dataset:
    """One lead of several start dates as an in-memory dataset in the store's layout.

    state : (start, member, channel, lat, lon) float32; the ``number`` dim is kept only for
        more than one member, as in the store.
    """
    n_members = state.shape[1]
    values = state if n_members > 1 else state[:, 0]
    data_vars = {}
    for name, array in split_variables(metadata, values).items():
        array = np.expand_dims(array, 2 if n_members > 1 else 1)  # prediction_timedelta
        has_levels = array.ndim == (6 if n_members > 1 else 5)
        data_vars[name] = (_variable_dims(has_levels, n_members), array,
                           _variable_attrs(metadata, name))
    return xr.Dataset(data_vars, coords=forecast_coords(metadata, init_times,
                                                        np.asarray([lead]), n_members),
                      attrs={"Conventions": "CF-1.8"})


class LeadWriter:
    """Writes one lead (all channels, all members) of start dates into the store.

    Each (start date, member, lead) of a variable is one chunk; in the plain layout that
    :func:`create_forecast_store` makes, chunks are written as files directly
    (:func:`~weathermodel.data.chunk_files.write_chunk`, atomic), otherwise through zarr.
    """

    def __init__(self, path: Path, metadata: ModelMetadata, n_members: int) -> None:
        group = zarr.open_group(str(path), mode="r+")
        self.metadata = metadata
        self.arrays = {name: group[name] for name in variable_layout(metadata)}
        self.n_members = n_members
        folders = {name: Path(path) / name for name in self.arrays}
        plain = all(plain_chunk_shape(array_metadata(folders[name]))
                    == _lead_chunks(array.shape, n_members)
                    for name, array in self.arrays.items())
        # not plain, or not one chunk per lead: zarr writes
        self.chunk_dirs: dict[str, Path] | None = folders if plain else None

    def write(self, time_index: int, lead_index: int, state: np.ndarray) -> None:
        """state: (members, channel, lat, lon) float32."""
        self.write_starts([time_index], lead_index, state[None])

    def write_starts(self, time_indices: list[int], lead_index: int, state: np.ndarray) -> None:
        """state: (start, members, channel, lat, lon) float32, for the start dates at
        ``time_indices`` of the store."""
        values_of = split_variables(self.metadata, state)
        if self.chunk_dirs is not None:
            for name, values in values_of.items():  # (start, member, [level,] lat, lon)
                tail = (0,) * (values.ndim - 2)  # [level,] lat, lon: whole in the chunk
                for position, time_index in enumerate(time_indices):
                    for member in range(self.n_members):
                        members = (member,) if self.n_members > 1 else ()
                        write_chunk(self.chunk_dirs[name],
                                    (time_index, *members, lead_index, *tail),
                                    values[position, member])
            return
        runs = np.split(np.arange(len(time_indices)),
                        np.flatnonzero(np.diff(time_indices) != 1) + 1)
        for name, values in values_of.items():
            if self.n_members == 1:
                values = values[:, 0]
            for run in runs:
                first = time_indices[run[0]]
                where = slice(first, first + len(run))
                if self.n_members > 1:
                    self.arrays[name][where, :, lead_index] = values[run]
                else:
                    self.arrays[name][where, lead_index] = values[run]


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

"""Open any supported source lazily: netCDF3/4, GRIB1/2, zarr v2/v3, globs and URLs.

Nothing here renames or converts; :mod:`weathermodel.data.normalize` does that.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from weathermodel.errors import DataError

log = logging.getLogger(__name__)

GRIB_SUFFIXES = (".grib", ".grb", ".grib1", ".grib2", ".grb2")
_URL_PREFIXES = ("http://", "https://", "gs://", "gcs://", "s3://", "file://", "memory://", "az://")


@dataclass(frozen=True)
class OpenedSource:
    """One opened input with its provenance."""

    path: str
    dataset: xr.Dataset
    checksum: str
    size_bytes: int


def is_url(path: str) -> bool:
    return path.startswith(_URL_PREFIXES)


def expand_paths(pattern: str) -> list[str]:
    """Expand a glob into sorted paths; a URL or an existing path is returned as it is."""
    if is_url(pattern):
        return [pattern]
    if any(ch in pattern for ch in "*?["):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise DataError("the glob matches no file", "check the pattern and the folder",
                            path=pattern)
        return matches
    if not os.path.exists(pattern):
        raise DataError("no such file or folder", "check the path (relative paths start at the "
                        "current directory)", path=pattern)
    return [pattern]


def file_checksum(path: str) -> tuple[str, int]:
    """sha256 of a file, or for a zarr folder of its metadata files and chunk sizes.

    Returns ``("sha256:<hex>", size_in_bytes)``; for URLs ``("remote", 0)``.
    """
    if is_url(path):
        return "remote", 0
    digest = hashlib.sha256()
    size = 0
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                stat = os.stat(full)
                size += stat.st_size
                rel = os.path.relpath(full, path)
                digest.update(f"{rel}:{stat.st_size}\n".encode())
                if name in ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"):
                    digest.update(Path(full).read_bytes())
        return "sha256-metadata:" + digest.hexdigest(), size
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return "sha256:" + digest.hexdigest(), size


def check_grib_integrity(path: str) -> int:
    """Walk the GRIB messages of a file and check each is complete.

    A truncated GRIB file otherwise loses its last fields silently. Returns the number of
    messages; raises :class:`DataError` when a message is cut short or bytes are left over.
    """
    data = Path(path).read_bytes()
    offset, count = 0, 0
    while offset < len(data):
        start = data.find(b"GRIB", offset)
        if start < 0:
            if data[offset:].strip(b"\x00\n\r "):
                raise DataError(f"{len(data) - offset} bytes after the last GRIB message are "
                                "not GRIB", "re-download or re-export the file", path=path)
            break
        if len(data) < start + 16:
            raise DataError(f"GRIB message {count + 1} starts at byte {start} but the file ends "
                            "before its header: the file is truncated", "re-download the file",
                            path=path)
        edition = data[start + 7]
        if edition == 1:
            length = int.from_bytes(data[start + 4:start + 7], "big")
            if length & 0x800000:  # large GRIB1 messages (ECMWF extension): length in 120 units
                length = (length & 0x7FFFFF) * 120
        elif edition == 2:
            length = int.from_bytes(data[start + 8:start + 16], "big")
        else:
            raise DataError(f"unknown GRIB edition {edition} at byte {start}",
                            "check that this is a GRIB1 or GRIB2 file", path=path)
        end = start + length
        if end > len(data):
            raise DataError(f"GRIB message {count + 1} needs {length} bytes from byte {start} "
                            f"but the file has only {len(data) - start}: the file is truncated",
                            "re-download the file", path=path)
        if edition == 2 and data[end - 4:end] != b"7777":
            raise DataError(f"GRIB message {count + 1} does not end with '7777': the file is "
                            "corrupt", "re-download the file", path=path)
        offset, count = end, count + 1
        if edition == 1 and data[end - 4:end] != b"7777":
            # some GRIB1 encoders pad; search for the end marker close by
            marker = data.find(b"7777", end - 4, end + 256)
            if marker < 0:
                raise DataError(f"GRIB message {count} does not end with '7777': the file is "
                                "corrupt or truncated", "re-download the file", path=path)
            offset = marker + 4
    if count == 0:
        raise DataError("the file holds no GRIB message", "check the file type", path=path)
    return count


def grib_scan_longitudes(ds: xr.Dataset, path: str) -> xr.Dataset:
    """Label the longitude columns of a regular latitude-longitude GRIB in scanning order.

    cfgrib labels the columns with ecCodes' ``distinctLongitudes``, which are sorted, while
    the values stay in scanning order. The two differ when a regional grid crosses the prime
    meridian with unsigned longitudes (GRIB2, or GRIB1 written 350..2): the columns 350..357.5,
    0..2 would be labelled 0..2, 350..357.5, i.e. wrong. The columns are then relabelled from
    the grid definition (first and last longitude, scanning direction), in degrees east in
    [0, 360); :mod:`weathermodel.data.normalize` puts them in canonical order.
    """
    if "longitude" not in ds.dims or ds.sizes["longitude"] < 2:
        return ds
    attrs = next((v.attrs for v in ds.data_vars.values()
                  if v.attrs.get("GRIB_gridType") == "regular_ll"), None)
    keys = ("GRIB_longitudeOfFirstGridPointInDegrees", "GRIB_longitudeOfLastGridPointInDegrees")
    if attrs is None or any(key not in attrs for key in keys):
        return ds
    first, last = (float(attrs[key]) for key in keys)
    direction = -1.0 if int(attrs.get("GRIB_iScansNegatively", 0)) else 1.0
    count = ds.sizes["longitude"]
    span = np.mod(direction * (last - first), 360.0)
    scan = np.mod(first + direction * np.arange(count) * span / (count - 1), 360.0)
    labels = np.mod(ds["longitude"].values.astype("float64"), 360.0)
    if np.allclose(scan, labels, atol=1e-6) or not np.allclose(np.sort(scan), np.sort(labels),
                                                                 atol=1e-6):
        return ds  # already in scanning order, or another grid definition: left as it is
    log.info("%s: longitude columns relabelled in GRIB scanning order (%g to %g)", path,
             scan[0], scan[-1])
    return ds.assign_coords(longitude=("longitude", scan, ds["longitude"].attrs))


def _open_grib(path: str) -> xr.Dataset:
    check_grib_integrity(path)
    try:
        import cfgrib  # noqa: F401
    except ImportError as error:
        raise DataError("reading GRIB needs cfgrib and ecCodes",
                        "pip install 'weathermodel[grib]'", path=path) from error
    kwargs = {"indexpath": ""}  # never write .idx files beside the input
    try:
        return chunk_by_time(grib_scan_longitudes(
            xr.open_dataset(path, engine="cfgrib", backend_kwargs=kwargs), path))
    except Exception as error:  # cfgrib raises DatasetBuildError for heterogeneous files
        if type(error).__name__ != "DatasetBuildError":
            raise
        parts = [chunk_by_time(grib_scan_longitudes(p, path))
                 for p in cfgrib.open_datasets(path, backend_kwargs=kwargs)]
        log.info("%s: GRIB file holds %d hypercubes; merging them", path, len(parts))
        return xr.merge(parts, compat="override", join="outer")


def _open_zarr(path: str, chunked: bool = True) -> xr.Dataset:
    chunks = {} if chunked else None
    try:
        return xr.open_zarr(path, consolidated=True, chunks=chunks, decode_times=True)
    except (KeyError, FileNotFoundError, ValueError):
        return xr.open_zarr(path, consolidated=False, chunks=chunks, decode_times=True)


def chunk_by_time(ds: xr.Dataset, steps: int = 8) -> xr.Dataset:
    """Give a lazily opened (not yet dask) dataset dask chunks of a few time steps.

    Files without internal chunking (netCDF3, GRIB) would otherwise become one dask chunk, and
    every block of the ingest would read the whole file.
    """
    time_like = {"time", "valid_time", "time_index", "timestep", "step", "date", "t"}
    return ds.chunk({dim: (steps if dim in time_like else -1) for dim in ds.dims})


def check_netcdf3_integrity(path: str) -> None:
    """Refuse a classic netCDF (CDF-1/CDF-2) file shorter than its header says.

    The netCDF-C library reads the missing bytes of a truncated classic file as zeros, so the
    damage would surface later as nonsense values. scipy's reader maps every variable at the
    offset the header gives and fails when the file ends too early.
    """
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic not in (b"CDF\x01", b"CDF\x02"):
        return
    from scipy.io import netcdf_file

    try:
        nc = netcdf_file(path, "r", mmap=True, maskandscale=False)  # maps, reads nothing
        nc.variables.clear()  # drop the mapped arrays so the file closes cleanly
        nc.close()
    except (ValueError, TypeError, OSError, IndexError) as error:
        size = os.path.getsize(path)
        raise DataError(f"the file is truncated or corrupt: its header describes more data than "
                        f"its {size} bytes hold ({error})", "re-download or re-export the file",
                        path=path) from error


def _open_netcdf(path: str) -> xr.Dataset:
    check_netcdf3_integrity(path)
    try:
        ds = xr.open_dataset(path, decode_times=True, mask_and_scale=True)
    except ValueError as error:
        if "decode" not in str(error) and "time" not in str(error):
            raise
        log.info("%s: time units are not CF; decoding them later", path)
        ds = xr.open_dataset(path, decode_times=False)
    return chunk_by_time(ds)


def read_here(array: xr.DataArray) -> np.ndarray:
    """The values of a small lazy selection (a few time steps), read in the calling thread:
    dask-backed by dask's synchronous scheduler (no thread pool to start per read and no
    ``dask.distributed`` import, half a second once per process, when dask looks for a
    distributed client); opened without dask (``open_path(chunked=False)``) straight through
    the backend."""
    return array.compute(scheduler=dask.get).values


def open_path(path: str, chunked: bool = True) -> xr.Dataset:
    """Open one path lazily (dask-backed) with the engine its type needs.

    ``chunked=False`` opens a zarr store lazily without dask: selections read only the
    chunks they need, through zarr in the calling thread. That suits a few small reads (a
    forecast's initial states) and skips importing ``dask.array`` (0.3 s) and building a
    graph per read; operations that combine variables (``xr.concat``) would load them whole.

    Raises
    ------
    DataError : the file is truncated, corrupt or of an unknown type.
    """
    lower = path.lower().rstrip("/")
    try:
        if lower.endswith(GRIB_SUFFIXES):
            return _open_grib(path)
        if lower.endswith((".zarr", ".zarr.zip")) or is_url(path) or os.path.isdir(path):
            return _open_zarr(path, chunked)
        return _open_netcdf(path)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"cannot be opened ({type(error).__name__}: {error}); the file may be "
                        "truncated, corrupt or of an unsupported type",
                        "re-download the file, or check it with ncdump -h / grib_ls",
                        path=path) from error


def open_sources(pattern: str) -> list[OpenedSource]:
    """Open every path a pattern names, with checksums for provenance."""
    opened = []
    for path in expand_paths(pattern):
        dataset = open_path(path)
        checksum, size = file_checksum(path)
        opened.append(OpenedSource(path=path, dataset=dataset, checksum=checksum,
                                   size_bytes=size))
    return opened

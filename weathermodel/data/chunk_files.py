"""Whole chunks of a local, uncompressed zarr store, read and written as plain files.

For the layout that ``prepare`` and ``forecast`` write (zarr v3, float32, the plain ``bytes``
codec, little-endian, ``/`` chunk keys), a chunk file is exactly the chunk's bytes: a window of
states is read with one ``readinto`` per state into a preallocated array (one copy, as with
``np.memmap``), and a forecast lead is written with one file write per chunk, without zarr's
per-call machinery (7 ms per call for the demo's leads, holding the interpreter lock that the
forecast's main thread needs). Any other layout (compressed, remote, different chunking)
goes through zarr.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

_PLAIN_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]


def array_metadata(array: str | Path) -> dict:
    """The ``zarr.json`` of the zarr v3 array at ``array`` ({} when there is none)."""
    meta_file = Path(array) / "zarr.json"
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def plain_chunk_shape(meta: dict) -> tuple[int, ...] | None:
    """The chunk shape of an array (its :func:`array_metadata`) whose chunks are plain files
    (float32, plain little-endian bytes, ``/`` keys); None for any other array."""
    plain = (meta.get("data_type") == "float32" and meta.get("codecs") == _PLAIN_CODECS
             and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator")
             == "/")
    chunks = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    return tuple(chunks) if plain and chunks else None


def write_chunk(array: Path, index: Sequence[int], values: np.ndarray) -> None:
    """Write the whole chunk ``index`` of a plain array (:func:`plain_chunk_shape`)
    atomically, as zarr's local store does: to ``<chunk>.<hex>.partial``, then renamed (a
    killed writer leaves only such files, which ``remove_partial_writes`` deletes)."""
    path = array.joinpath("c", *map(str, index))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    data = np.ascontiguousarray(values, dtype="<f4")
    with open(partial, "wb") as handle:
        handle.write(memoryview(data).cast("B"))
    os.replace(partial, path)


class TimeSliceReader:
    """Reads ``array[start:stop, i, j, ...]`` (or chosen time indices) of one array of a store.

    Parameters
    ----------
    store : path of the zarr v3 group.
    name : array name; its first dimension is time.
    """

    def __init__(self, store: str | Path, name: str) -> None:
        self.path = Path(store) / name
        self._zarr: zarr.Array | None = None
        meta = array_metadata(self.path)
        self.shape = tuple(meta.get("shape", ()))
        chunks = plain_chunk_shape(meta) or ()
        self.fast = (len(chunks) == len(self.shape) > 0 and chunks[0] == 1
                     and all(c in (1, s) for c, s in zip(chunks, self.shape)))
        self.chunks = chunks
        if not self.fast:
            self._zarr = zarr.open_array(str(self.path), mode="r")

    def read(self, start: int, stop: int, *index: int) -> np.ndarray:
        """Values of times ``start..stop-1`` at integer ``index`` along the next dimensions
        (each of which must be chunked by 1), whole along the rest. float32."""
        if not self.fast:
            return np.asarray(self._zarr[(slice(start, stop), *index)], dtype=np.float32)
        return self.read_times(range(start, stop), *index)

    def read_times(self, times: Sequence[int], *index: int) -> np.ndarray:
        """Values of the given time indices (any order, e.g. every 6th hourly state), and
        only those: one read per time. float32, shape (len(times), ...)."""
        times = [int(t) for t in times]
        if not self.fast:
            selection = np.asarray(times, dtype=np.int64)
            return np.asarray(self._zarr.get_orthogonal_selection((selection, *index)),
                              dtype=np.float32)
        rest = self.shape[1 + len(index):]
        if any(self.chunks[1 + k] != 1 for k in range(len(index))):
            raise ValueError("indexed dimensions must be chunked by one")
        out = np.empty((len(times), *rest), dtype=np.float32)
        tail = "/".join("0" for _ in rest)
        prefix = "/".join(str(i) for i in index)
        for row, time in enumerate(times):
            key = "/".join(part for part in (str(time), prefix, tail) if part)
            target = memoryview(out[row]).cast("B")
            try:
                with open(self.path / "c" / key, "rb", buffering=0) as handle:
                    if handle.readinto(target) != target.nbytes:
                        raise OSError(f"chunk {self.path / 'c' / key} is shorter than expected")
            except FileNotFoundError:  # never written: zarr's fill value
                out[row] = np.nan
        return out


def open_readers(store: str | Path, *names: str) -> tuple[TimeSliceReader, ...]:
    return tuple(TimeSliceReader(store, name) for name in names)


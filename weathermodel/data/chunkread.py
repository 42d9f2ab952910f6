"""Read whole time steps of a local, uncompressed store straight into one buffer.

For the store layout that ``prepare`` writes by default (one chunk per time step, zarr's plain
``bytes`` codec, little-endian), a chunk file is exactly the array's bytes, so a window of states
can be read with one ``readinto`` per state into a preallocated array: one copy, as with
``np.memmap``. Any other layout (compressed, remote, different chunking) goes through zarr.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

_PLAIN_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]


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
        meta_file = self.path / "zarr.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.shape = tuple(meta.get("shape", ()))
        chunks = tuple(meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", ()))
        self.fast = (
            meta.get("data_type") == "float32" and meta.get("codecs") == _PLAIN_CODECS
            and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator") == "/"
            and len(chunks) == len(self.shape) and chunks[0] == 1
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


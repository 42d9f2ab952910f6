"""Regions of the globe and the area weights of every grid point for spatial means of scores.

A region is a box ``(lat_min, lat_max, lon_min, lon_max)`` in degrees, bounds included, or a
tuple of boxes (their union). Longitude bounds may be given in either convention
(-180..180 or 0..360; ``lon_min > lon_max`` after reduction modulo 360 means the box crosses
the prime meridian), and so may the grid. :data:`REGIONS` holds WB2's predefined regions.

Area weights (``weighting``)
----------------------------
The latitude weights come from :func:`weathermodel.data.weights.latitude_weights` (the
training's validation uses the same): ``"auto"`` (default) is ``"wb2_edges"`` on grids that
reach the poles (within a spacing) and ``"edges"`` on regional grids; ``"wb2_edges"`` replicates
WB2's ``get_lat_weights`` exactly (on a regional grid the end rows absorb the polar caps beyond
them, e.g. 64 % of the weight on the 15 N row of the NCEP grid; a warning is issued);
``"edges"`` gives end cells half a spacing wide; ``"cos"`` is cos(latitude). Weights are
computed on the whole grid of the data, normalised to mean 1; a region only masks points out
(as WB2's ``SliceRegion``).
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence, Union

import numpy as np
import xarray as xr

from weathermodel import conventions
from weathermodel.data.weights import DEFAULT_WEIGHTING, latitude_weights
from weathermodel.errors import ConfigError

log = logging.getLogger(__name__)

REGION = "region"

Box = tuple[float, float, float, float]
RegionSpec = Union[Box, Sequence[Box]]
Regions = Union[None, Sequence[str], Mapping[str, RegionSpec]]

#: WB2's predefined regions (``scripts/evaluate.py``): (lat_min, lat_max, lon_min, lon_max).
REGIONS: dict[str, RegionSpec] = {
    "global": (-90.0, 90.0, 0.0, 360.0),
    "tropics": (-20.0, 20.0, 0.0, 360.0),
    "extra_tropics": ((-90.0, -20.0, 0.0, 360.0), (20.0, 90.0, 0.0, 360.0)),
    "extra_tropics_nh": (20.0, 90.0, 0.0, 360.0),
    "extra_tropics_sh": (-90.0, -20.0, 0.0, 360.0),
    "europe": (35.0, 75.0, -12.5, 42.5),
    "north_america": (25.0, 60.0, -120.0, -75.0),
    "north_atlantic": (25.0, 65.0, -70.0, -10.0),
    "north_pacific": (25.0, 60.0, 145.0, 230.0),
    "east_asia": (25.0, 60.0, 102.5, 150.0),
    "ausnz": (-45.0, -12.5, 120.0, 175.0),
    "arctic": (60.0, 90.0, 0.0, 360.0),
    "antarctic": (-90.0, -60.0, 0.0, 360.0),
}


def _boxes(spec: RegionSpec | str) -> list[Box]:
    if isinstance(spec, str):
        if spec not in REGIONS:
            raise ConfigError(f"unknown region {spec!r}", f"use one of {sorted(REGIONS)} or give "
                              "a box (lat_min, lat_max, lon_min, lon_max)")
        spec = REGIONS[spec]
    if len(spec) == 4 and all(np.isscalar(v) for v in spec):
        return [tuple(float(v) for v in spec)]  # type: ignore[list-item]
    return [tuple(float(v) for v in box) for box in spec]  # type: ignore[union-attr]


def _longitude_in_range(longitude: np.ndarray, low: float, high: float) -> np.ndarray:
    """Longitudes within [low, high] degrees east, whatever the convention of either."""
    if high - low >= 360.0 - 1e-9:
        return np.ones(longitude.shape, dtype=bool)
    lon, low, high = np.mod(longitude, 360.0), low % 360.0, high % 360.0
    tol = 1e-6
    if low <= high:
        return (lon >= low - tol) & (lon <= high + tol)
    return (lon >= low - tol) | (lon <= high + tol)  # across the prime meridian


def region_mask(latitude: np.ndarray, longitude: np.ndarray,
                spec: RegionSpec | str) -> np.ndarray:
    """(n_lat, n_lon) bool: grid points inside a region (a name of :data:`REGIONS`, a box or
    a tuple of boxes; bounds included)."""
    lat = np.asarray(latitude, dtype=np.float64)[:, None]
    lon = np.asarray(longitude, dtype=np.float64)
    mask = np.zeros((lat.size, lon.size), dtype=bool)
    for lat_min, lat_max, lon_min, lon_max in _boxes(spec):
        inside_lat = (lat >= lat_min - 1e-6) & (lat <= lat_max + 1e-6)
        mask |= inside_lat & _longitude_in_range(lon, lon_min, lon_max)[None, :]
    return mask


def _region_specs(regions: Regions) -> dict[str, RegionSpec | str] | None:
    if regions is None:
        return None
    if isinstance(regions, Mapping):
        return dict(regions)
    if isinstance(regions, str):
        regions = [regions]
    return {name: name for name in regions}


def area_weights(latitude: np.ndarray, longitude: np.ndarray, regions: Regions = None,
                 weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    """Weights of every grid point for spatial means.

    Returns
    -------
    DataArray (latitude, longitude), or (region, latitude, longitude) when ``regions`` is
    given: latitude weights of the whole grid (mean 1) times each region's 0/1 mask.
    """
    space = (conventions.LATITUDE, conventions.LONGITUDE)
    rows = latitude_weights(latitude, weighting)
    coords = {conventions.LATITUDE: np.asarray(latitude),
              conventions.LONGITUDE: np.asarray(longitude)}
    full = np.broadcast_to(rows[:, None], (rows.size, np.size(longitude)))
    specs = _region_specs(regions)
    if specs is None:
        return xr.DataArray(np.array(full), dims=space, coords=coords)
    stacked = np.stack([full * region_mask(latitude, longitude, spec)
                        for spec in specs.values()])
    empty = [name for name, w in zip(specs, stacked) if not w.any()]
    if empty:
        log.warning("region(s) %s hold no grid point of this grid: their scores are NaN", empty)
    return xr.DataArray(stacked, dims=(REGION, *space),
                        coords={REGION: list(specs), **coords})

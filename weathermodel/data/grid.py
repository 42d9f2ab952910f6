"""Describe a latitude-longitude grid: regular, Gaussian or irregular; global or regional."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GridInfo:
    """What a model needs to know about the grid of a store.

    Attributes
    ----------
    kind : ``regular`` (equispaced latitudes), ``gaussian`` (Gauss-Legendre latitudes) or
        ``irregular``.
    is_global : True when longitudes wrap around the sphere.
    n_latitude, n_longitude : grid size.
    latitude_spacing, longitude_spacing : degrees (median spacing for non-regular latitudes).
    latitude_range, longitude_range : (first, last) in degrees, canonical order.
    """

    kind: str
    is_global: bool
    n_latitude: int
    n_longitude: int
    latitude_spacing: float
    longitude_spacing: float
    latitude_range: tuple[float, float]
    longitude_range: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def gaussian_latitudes(n: int) -> np.ndarray:
    """Gauss-Legendre latitudes (degrees, ascending) of a Gaussian grid with ``n`` latitudes."""
    nodes, _ = np.polynomial.legendre.leggauss(n)
    return np.degrees(np.arcsin(nodes))


def describe_grid(latitude: np.ndarray, longitude: np.ndarray) -> GridInfo:
    """Classify a canonical (ascending) grid."""
    lat = np.asarray(latitude, dtype="float64")
    lon = np.asarray(longitude, dtype="float64")
    lat_steps = np.diff(lat) if lat.size > 1 else np.array([0.0])
    lon_steps = np.diff(lon) if lon.size > 1 else np.array([360.0])
    lon_spacing = float(np.median(lon_steps))
    if lat.size > 1 and np.allclose(lat_steps, lat_steps[0], rtol=1e-4, atol=1e-6):
        kind = "regular"
    elif lat.size > 2 and np.allclose(lat, gaussian_latitudes(lat.size), atol=1e-3):
        kind = "gaussian"
    else:
        kind = "irregular"
    is_global = bool(abs(lon.size * lon_spacing - 360.0) < 1e-3 * 360.0)
    return GridInfo(kind=kind, is_global=is_global, n_latitude=int(lat.size),
                    n_longitude=int(lon.size), latitude_spacing=float(np.median(lat_steps)),
                    longitude_spacing=lon_spacing,
                    latitude_range=(float(lat[0]), float(lat[-1])),
                    longitude_range=(float(lon[0]), float(lon[-1])))

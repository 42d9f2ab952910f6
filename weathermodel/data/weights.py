"""Area weights of latitude rows, for spatial means of scores and losses.

Every function returns one weight per latitude row, in the order of the latitudes given,
normalised to mean 1 (a spatial mean is then ``mean(weights[:, None] * field)``). The weightings
are:

``wb2_edges``
    WeatherBench 2's ``get_lat_weights``, replicated exactly: cell edges halfway between
    neighbouring latitudes and, whatever the grid, the outermost edges at -90 and +90 degrees;
    the weight of a row is sin(upper edge) - sin(lower edge). On a global grid this is the
    exact cell area; on a regional grid the end rows absorb the polar caps beyond them (a
    warning is issued).
``edges``
    sin(upper edge) - sin(lower edge) with the edges of :func:`latitude_cell_edges` (end cells
    half a spacing wide, snapped to a pole only when it is within 0.9 spacing): the exact cell
    area on global grids, and the right choice for regional grids.
``cos``
    cos(latitude), 0 at the poles.
``auto``
    ``wb2_edges`` on grids that reach the poles (within a spacing), ``edges`` otherwise.

Evaluation (:mod:`weathermodel.evaluation.regions`) and the validation of training
(:mod:`weathermodel.training.loop`) take their weights from here, so both score alike.
"""
from __future__ import annotations

import warnings

import numpy as np

from weathermodel.errors import ConfigError, DataError

DEFAULT_WEIGHTING = "auto"
WEIGHTINGS = ("auto", "wb2_edges", "edges", "cos")
#: an end latitude edge snaps to the pole when the pole is nearer than this * spacing
POLE_SNAP_FRACTION = 0.9


def latitude_cell_edges(latitude: np.ndarray) -> np.ndarray:
    """(n + 1,) latitude edges (degrees) of the cells centred on ``latitude``, in its order.

    Inner edges lie halfway between neighbouring latitudes. An end edge lies half a spacing
    beyond the end latitude, clipped to +-90, and at the pole itself when the pole is less
    than 0.9 spacing beyond the end latitude: regular grids with or without the poles and
    Gaussian grids (pole ~0.77 spacing away) then cover the sphere exactly (WeatherBench 2
    convention), while regional grids keep cells of their own size.

    Raises
    ------
    DataError : fewer than 2 latitudes, or latitudes not strictly monotonic.
    """
    lat = np.asarray(latitude, dtype=np.float64)
    if lat.ndim != 1 or lat.size < 2:
        raise DataError("cell edges need at least 2 latitudes", "pass the grid's latitudes")
    steps = np.diff(lat)
    if not ((steps > 0).all() or (steps < 0).all()):
        raise DataError("latitudes must be strictly monotonic", "sort the latitudes")
    descending = steps[0] < 0
    ascending = lat[::-1] if descending else lat
    edges = np.empty(lat.size + 1)
    edges[1:-1] = 0.5 * (ascending[:-1] + ascending[1:])
    first_step, last_step = ascending[1] - ascending[0], ascending[-1] - ascending[-2]
    edges[0] = (-90.0 if ascending[0] + 90.0 < POLE_SNAP_FRACTION * first_step
                else ascending[0] - 0.5 * first_step)
    edges[-1] = (90.0 if 90.0 - ascending[-1] < POLE_SNAP_FRACTION * last_step
                 else ascending[-1] + 0.5 * last_step)
    edges = np.clip(edges, -90.0, 90.0)
    return edges[::-1] if descending else edges


def cell_area_weights(latitude: np.ndarray, method: str = "edges") -> np.ndarray:
    """Area weight of each latitude row, normalised to mean 1.

    Parameters
    ----------
    latitude : 1-D degrees.
    method : ``edges`` (default: sin(upper edge) - sin(lower edge) with the edges of
        :func:`latitude_cell_edges`, WeatherBench 2) or ``cos`` (cos(lat), 0 at the poles).
        On a regular grid away from the poles both are equal (sin(x + h) - sin(x - h) =
        2 sin(h) cos(x)); a pole row gets, with ``edges``, its polar cap from 90 - h to 90
        degrees (h half the spacing: 1 - cos(h) = 2 sin(h/2)**2), exactly GraphCast's
        ``losses.normalized_latitude_weights`` for grids with and without poles, and with
        ``cos`` no weight at all. They also differ on irregular (e.g. Gaussian) grids.

    Returns
    -------
    (n_lat,) float64 weights with mean 1.
    """
    lat = np.asarray(latitude, dtype=np.float64)
    if method == "cos":
        weights = np.clip(np.cos(np.radians(lat)), 0.0, None)
    elif method == "edges":
        if lat.size == 1:
            return np.ones(1)
        edges = np.radians(latitude_cell_edges(lat))
        weights = np.abs(np.diff(np.sin(edges)))
    else:
        raise ConfigError(f"unknown area weighting {method!r}", "use 'cos' or 'edges'")
    if lat.ndim != 1 or lat.size == 0 or not weights.sum() > 0:
        raise DataError("latitudes give no area (empty, or only poles)",
                        "pass the grid's latitudes in degrees")
    return weights / weights.mean()


def _wb2_edge_weights(ascending: np.ndarray) -> np.ndarray:
    """sin(upper) - sin(lower) with edges [-90, midpoints..., 90] (WB2 ``get_lat_weights``)."""
    radians = np.deg2rad(ascending)
    edges = np.concatenate([[-np.pi / 2], (radians[:-1] + radians[1:]) / 2, [np.pi / 2]])
    return np.sin(edges[1:]) - np.sin(edges[:-1])


def reaches_poles(latitude: np.ndarray) -> bool:
    """True when the first and last rows lie within one grid spacing of the poles."""
    ascending = np.sort(np.asarray(latitude, dtype=np.float64))
    if ascending.size < 2:
        return False
    spacing = np.abs(np.diff(ascending))
    return bool(ascending[0] - spacing[0] <= -90.0 + 1e-6
                and ascending[-1] + spacing[-1] >= 90.0 - 1e-6)


def resolve_weighting(weighting: str, latitude: np.ndarray) -> str:
    """``"auto"`` -> ``"wb2_edges"`` on a grid reaching the poles, else ``"edges"``; any other
    choice is returned as it is (after checking it is known)."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}", f"use one of {WEIGHTINGS}")
    if weighting != "auto":
        return weighting
    return "wb2_edges" if reaches_poles(latitude) else "edges"


def _warn_if_regional(ascending: np.ndarray) -> None:
    if not reaches_poles(ascending):
        warnings.warn(
            f"weighting='wb2_edges' on a grid that does not reach the poles "
            f"({ascending[0]:g}..{ascending[-1]:g}): as in WeatherBench 2 the end rows carry the "
            "area of the polar caps beyond them; use weighting='edges' for regional grids",
            stacklevel=4)


def latitude_weights(latitude: np.ndarray, weighting: str = DEFAULT_WEIGHTING) -> np.ndarray:
    """Area weight of each latitude row, normalised to mean 1.

    Parameters
    ----------
    latitude : 1-D latitudes in degrees north, strictly monotonic (either order).
    weighting : ``"auto"`` (see :func:`resolve_weighting`), ``"wb2_edges"`` (WB2
        ``get_lat_weights``: outer edges at the poles), ``"edges"`` (end cells half a spacing
        wide) or ``"cos"``; see the module docstring.

    Returns
    -------
    (n_lat,) float64 weights in the order of ``latitude``, mean 1.
    """
    lat = np.asarray(latitude, dtype=np.float64)
    weighting = resolve_weighting(weighting, lat)
    if lat.size == 1:
        return np.ones(1)
    if weighting != "wb2_edges":
        return cell_area_weights(lat, method=weighting)
    order = np.argsort(lat)
    ascending = lat[order]
    if not (np.diff(ascending) > 0).all():
        raise DataError("latitudes are not strictly monotonic", "sort the latitudes")
    _warn_if_regional(ascending)
    weights = np.empty_like(lat)
    weights[order] = _wb2_edge_weights(ascending)
    return weights / weights.mean()

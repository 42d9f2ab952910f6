"""Icosahedral multi-mesh and the grid <-> mesh graphs of a GraphCast-style model.

Conventions
-----------
* Positions are unit vectors (x, y, z) on the sphere: x towards (lat 0, lon 0), y towards
  (lat 0, lon 90 E), z towards the north pole. Distances are chord lengths on the unit sphere
  unless stated otherwise (great-circle angles are named ``arc``).
* Latitudes and longitudes are in degrees; any longitude convention works (-180..180,
  0..360, or a region written across the meridian of its convention, e.g. 340..30).
* A grid point's index is ``i_lat * n_lon + i_lon`` (latitude-major, in the order given).
* The icosahedron has vertices at both poles and one at (lat 0 ... 26.57 N, lon 0), so the mesh
  is mapped onto itself by rotations of 72 degrees about the polar axis. Edge features are
  expressed in the receiver's local frame (receiver rotated to lat 0, lon 0; at a pole, the
  frame of the meridian through the sender), so rotating the grid by a multiple of 72 degrees
  of longitude leaves every edge feature unchanged: a global grid whose longitude step divides
  72 degrees gives a graph mapped onto itself by that rotation, features included.
* Edge features are divided by the longest edge of their own edge set (grid-to-mesh, mesh,
  mesh-to-grid), as GraphCast does (``model_utils.get_graph_spatial_features`` and
  ``get_bipartite_graph_spatial_features`` with ``edge_normalization_factor=None``): lengths then
  span (0, 1] and displacement components [-1, 1] in every set, whatever the refinement.

Only numpy and scipy are used; graphs are cached as ``.npz`` files (never pickles).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from weathermodel.data.weights import cell_area_weights, latitude_cell_edges  # noqa: F401
from weathermodel.errors import ConfigError, DataError

if TYPE_CHECKING:
    from scipy.spatial import cKDTree

MESH_FORMAT_VERSION = 2
"""Bump whenever the construction of a graph changes: cached files then get new names.

1: edge features divided by the longest multi-mesh edge; 2: the edge normalisation is an
option (``per_edge_set`` by default) and part of the cache key."""

_TOLERANCE = 1e-9          # barycentric weights within this of 0 count as "on the boundary"
_CHUNK = 65_536            # grid points per chunk of the vectorised triangle search
MESH_TO_GRID_METHODS = ("triangle", "knn")
EDGE_NORMALIZATIONS = ("per_edge_set", "icosahedron_edge")
"""``per_edge_set``: each edge set divided by its own longest edge (GraphCast).
``icosahedron_edge``: every set divided by the longest edge of the full multi-mesh (an
icosahedron edge, ~1.05), the features of models trained before mesh format 2 (grid <-> mesh
features ~0.02 at refinement 5)."""


# ----------------------------------------------------------------------------------------------
# Icosahedral multi-mesh
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MultiMesh:
    """Icosahedral multi-mesh: the nodes of the finest level and the edges of every level.

    Attributes
    ----------
    vertices : (M, 3) float64 unit vectors of the finest mesh; vertices of coarser levels keep
        their indices (level l holds vertices ``0 .. 10 * 4**l + 1``).
    senders, receivers : (E,) int64 directed edges: both directions of every undirected edge
        of every level 0..r, merged and deduplicated, sorted by (receiver, sender).
    faces : (T, 3) int64 triangles of the finest level, counter-clockwise seen from outside
        (``cross(b - a, c - a)`` points away from the centre).
    """

    vertices: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    faces: np.ndarray


def _icosahedron() -> tuple[np.ndarray, np.ndarray]:
    """Regular icosahedron with vertices at both poles and one at longitude 0.

    Returns
    -------
    vertices : (12, 3) unit vectors: north pole, upper ring (lat atan(1/2), lon 0, 72, ...),
        lower ring (lat -atan(1/2), lon 36, 108, ...), south pole.
    faces : (20, 3) counter-clockwise seen from outside.
    """
    ring_lat = np.arctan(0.5)
    upper_lon = np.radians(72.0 * np.arange(5))
    lower_lon = upper_lon + np.radians(36.0)

    def ring(lat: float, lon: np.ndarray) -> np.ndarray:
        return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon),
                         np.full_like(lon, np.sin(lat))], axis=1)

    vertices = np.concatenate([[[0.0, 0.0, 1.0]], ring(ring_lat, upper_lon),
                               ring(-ring_lat, lower_lon), [[0.0, 0.0, -1.0]]])
    north, south = 0, 11
    faces = []
    for i in range(5):
        j = (i + 1) % 5
        upper_i, upper_j, lower_i, lower_j = 1 + i, 1 + j, 6 + i, 6 + j
        faces += [(north, upper_i, upper_j), (upper_i, lower_i, upper_j),
                  (upper_j, lower_i, lower_j), (lower_i, south, lower_j)]
    faces = np.asarray(faces, dtype=np.int64)
    return vertices, _orient_outward(vertices, faces)


def _orient_outward(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Swap the last two vertices of every face whose normal points inwards."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    inward = np.einsum("ij,ij->i", np.cross(b - a, c - a), a + b + c) < 0
    faces = faces.copy()
    faces[inward] = faces[inward][:, [0, 2, 1]]
    return faces


def _undirected_edges(faces: np.ndarray, n_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected edges of a triangle mesh.

    Returns
    -------
    edges : (K, 2) int64 vertex pairs with ``edges[:, 0] < edges[:, 1]``, sorted.
    inverse : (T, 3) index into ``edges`` of the sides (a-b, b-c, c-a) of every face.
    """
    sides = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    low, high = sides.min(axis=1), sides.max(axis=1)
    keys, inverse = np.unique(low * n_vertices + high, return_inverse=True)
    edges = np.stack([keys // n_vertices, keys % n_vertices], axis=1)
    return edges, inverse.reshape(-1, 3)


def _subdivide(vertices: np.ndarray, faces: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split every triangle into 4; new (midpoint) vertices are projected onto the sphere.

    Returns
    -------
    vertices : old vertices (same indices) followed by one midpoint per edge.
    faces : (4T, 3) new faces, same orientation as the old ones.
    edges : (K, 2) undirected edges of the *old* level.
    """
    edges, sides = _undirected_edges(faces, len(vertices))
    midpoints = vertices[edges[:, 0]] + vertices[edges[:, 1]]
    midpoints /= np.linalg.norm(midpoints, axis=1, keepdims=True)
    a, b, c = faces.T
    ab, bc, ca = (len(vertices) + sides).T
    new_faces = np.concatenate([np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1),
                                np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1)])
    return np.concatenate([vertices, midpoints]), new_faces, edges


@lru_cache(maxsize=8)
def _multimesh(refinement: int) -> MultiMesh:
    vertices, faces = _icosahedron()
    level_edges = []
    for _ in range(refinement):
        vertices, faces, edges = _subdivide(vertices, faces)
        level_edges.append(edges)
    level_edges.append(_undirected_edges(faces, len(vertices))[0])
    undirected = np.concatenate(level_edges)
    keys = np.unique(undirected[:, 0] * len(vertices) + undirected[:, 1])
    low, high = keys // len(vertices), keys % len(vertices)
    senders, receivers = np.concatenate([low, high]), np.concatenate([high, low])
    order = np.lexsort((senders, receivers))
    mesh = MultiMesh(vertices=vertices, senders=senders[order].astype(np.int64),
                     receivers=receivers[order].astype(np.int64), faces=faces.astype(np.int64))
    for array in (mesh.vertices, mesh.senders, mesh.receivers, mesh.faces):
        array.flags.writeable = False
    return mesh


def icosahedral_multimesh(refinement: int) -> MultiMesh:
    """Icosahedral multi-mesh refined ``refinement`` times (10 * 4**r + 2 nodes).

    Parameters
    ----------
    refinement : number r >= 0 of 1-to-4 triangle splits of the icosahedron.

    Returns
    -------
    MultiMesh
        Shared and read-only (cached per process): copy arrays before changing them. It has
        ``sum(30 * 4**l for l in 0..r)`` undirected edges (twice as many directed ones).
    """
    if isinstance(refinement, bool) or int(refinement) != refinement or refinement < 0:
        raise ConfigError(f"mesh refinement must be an integer >= 0, got {refinement!r}",
                          "give 0..7 (GraphCast uses 6)")
    return _multimesh(int(refinement))


def finest_edge_chord(mesh: MultiMesh) -> float:
    """Longest chord (unit sphere) among the edges of the finest level of ``mesh``."""
    edges, _ = _undirected_edges(mesh.faces, len(mesh.vertices))
    return float(_chord(mesh.vertices[edges[:, 0]], mesh.vertices[edges[:, 1]]).max())


def _chord(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1)


def _chord_to_arc(chord: float) -> float:
    """Great-circle angle (radians) subtended by a chord of the unit sphere."""
    return 2.0 * np.arcsin(min(chord / 2.0, 1.0))


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------

def lat_lon_to_xyz(latitude: np.ndarray, longitude: np.ndarray) -> np.ndarray:
    """Unit vectors (..., 3) of points given in degrees (arrays broadcast)."""
    lat, lon = np.radians(latitude), np.radians(longitude)
    return np.stack(np.broadcast_arrays(np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon),
                                        np.sin(lat)), axis=-1)


def grid_xyz(latitude: np.ndarray, longitude: np.ndarray) -> np.ndarray:
    """(n_lat * n_lon, 3) unit vectors of a grid, flattened latitude-major."""
    lat, lon = np.meshgrid(latitude, longitude, indexing="ij")
    return lat_lon_to_xyz(lat.ravel(), lon.ravel())


def barycentric_weights(points: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray
                        ) -> np.ndarray:
    """Barycentric weights of points in the plane triangles (a, b, c), along rays from the centre.

    ``w_a, w_b, w_c`` solve ``s * p = w_a a + w_b b + w_c c`` with ``w_a + w_b + w_c = 1`` and
    ``s > 0`` (gnomonic projection). All three are >= 0 exactly when p lies in the spherical
    triangle (a, b, c) (sides on great circles). Where p is not on the triangle's side of the
    centre the weights are -inf.

    Parameters
    ----------
    points, a, b, c : (..., 3) unit vectors (broadcast); triangles counter-clockwise.

    Returns
    -------
    (..., 3) float64 weights of a, b and c.
    """
    w_a = np.einsum("...i,...i->...", points, np.cross(b, c))
    w_b = np.einsum("...i,...i->...", points, np.cross(c, a))
    w_c = np.einsum("...i,...i->...", points, np.cross(a, b))
    weights = np.stack([w_a, w_b, w_c], axis=-1)
    total = weights.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(total > 0, weights / np.where(total > 0, total, 1.0), -np.inf)
    return weights


def _frame(xyz: np.ndarray, longitude_rad: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cos/sin of the latitude and longitude of unit vectors (longitude given where known)."""
    cos_lat = np.hypot(xyz[..., 0], xyz[..., 1])
    sin_lat = xyz[..., 2]
    if longitude_rad is None:
        safe = np.where(cos_lat > 0, cos_lat, 1.0)
        cos_lon = np.where(cos_lat > 0, xyz[..., 0] / safe, 1.0)
        sin_lon = np.where(cos_lat > 0, xyz[..., 1] / safe, 0.0)
    else:
        cos_lon, sin_lon = np.cos(longitude_rad), np.sin(longitude_rad)
    return cos_lat, sin_lat, cos_lon, sin_lon


def to_local_frame(vectors: np.ndarray, frame_xyz: np.ndarray,
                   frame_longitude_rad: np.ndarray | None = None) -> np.ndarray:
    """Express vectors in the frame rotated so that ``frame_xyz`` sits at lat 0, lon 0.

    The rotation is about z by -lon, then about y by +lat: the frame point becomes (1, 0, 0),
    local east is +y and local north is +z. It does not depend on the frame point's longitude
    other than through the rotation itself, so results are invariant under rotations of
    everything about the polar axis.

    Parameters
    ----------
    vectors : (..., 3) vectors to rotate.
    frame_xyz : (..., 3) unit vectors of the frame points.
    frame_longitude_rad : (...) longitudes (radians) of the frame points; needed at the poles,
        where the position alone does not define one. Default: from ``frame_xyz``.
    """
    cos_lat, sin_lat, cos_lon, sin_lon = _frame(frame_xyz, frame_longitude_rad)
    x1 = cos_lon * vectors[..., 0] + sin_lon * vectors[..., 1]
    y1 = -sin_lon * vectors[..., 0] + cos_lon * vectors[..., 1]
    z1 = vectors[..., 2]
    return np.stack([cos_lat * x1 + sin_lat * z1, y1, -sin_lat * x1 + cos_lat * z1], axis=-1)


def _node_features(xyz: np.ndarray) -> np.ndarray:
    """(N, 2) float32 sin(lat), cos(lat): no longitude, for longitude equivariance."""
    return np.stack([xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])], axis=1).astype(np.float32)


def _edge_features(sender_xyz: np.ndarray, receiver_xyz: np.ndarray,
                   receiver_longitude_rad: np.ndarray, scale: float | None = None) -> np.ndarray:
    """(E, 4) float32: chord length, sender - receiver in the receiver's frame; / ``scale``.

    ``scale`` defaults to the longest chord of these edges (GraphCast), so the longest edge's
    length feature is exactly 1 and every component lies in [-1, 1].
    """
    displacement = sender_xyz - receiver_xyz
    local = to_local_frame(displacement, receiver_xyz, receiver_longitude_rad)
    length = np.linalg.norm(displacement, axis=1, keepdims=True)
    if scale is None:
        longest = float(length.max()) if length.size else 0.0
        scale = longest if longest > 0 else 1.0
    return (np.concatenate([length, local], axis=1) / scale).astype(np.float32)


def _mesh_longitudes(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes (radians) of mesh nodes, and which nodes sit at a pole (longitude 0 there)."""
    at_pole = np.hypot(xyz[:, 0], xyz[:, 1]) < 1e-12
    return np.where(at_pole, 0.0, np.arctan2(xyz[:, 1], xyz[:, 0])), at_pole


def _receiver_frame_longitudes(receiver_lon: np.ndarray, receiver_at_pole: np.ndarray,
                               sender_lon: np.ndarray) -> np.ndarray:
    """Longitude (radians) of each edge's frame: the receiver's, or the sender's at a pole.

    A node at a pole has no east of its own. Any fixed frame there would break the symmetry
    under rotations about the polar axis, so an edge into a pole node is expressed in the frame
    of the meridian through its sender: rotating every sender by the same angle about the axis
    then leaves every feature unchanged (the pole node tells its neighbours apart by their
    distances and states, not by their directions).
    """
    return np.where(receiver_at_pole, sender_lon, receiver_lon)


# ----------------------------------------------------------------------------------------------
# Grid description
# ----------------------------------------------------------------------------------------------

def _check_grid(latitude: np.ndarray, longitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lat = np.asarray(latitude, dtype=np.float64)
    lon = np.asarray(longitude, dtype=np.float64)
    if lat.ndim != 1 or lon.ndim != 1 or lat.size == 0 or lon.size == 0:
        raise DataError(f"latitude and longitude must be non-empty 1-D arrays, got shapes "
                        f"{lat.shape} and {lon.shape}", "pass the grid's coordinate vectors")
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise DataError("latitude or longitude holds NaN or infinite values",
                        "pass finite coordinates in degrees")
    if np.abs(lat).max() > 90.0:
        raise DataError(f"latitudes must lie in -90..90 degrees, got {lat.min()}..{lat.max()}",
                        "pass latitudes in degrees (not radians, not colatitudes)")
    return lat, lon


def _longitude_steps(longitude: np.ndarray) -> np.ndarray:
    """Steps (degrees, in 0..360) between consecutive longitudes, across any wrap-around."""
    return np.mod(np.diff(longitude), 360.0)


def is_global_longitude(longitude: np.ndarray) -> bool:
    """True when the longitudes go all the way round: ``n_lon * step ~= 360`` degrees.

    The step is the median spacing; "about" means within half a step.
    """
    lon = np.asarray(longitude, dtype=np.float64)
    if lon.size < 2:
        return False
    step = float(np.median(_longitude_steps(lon)))
    return step > 0 and abs(lon.size * step - 360.0) < 0.5 * step


def _longitude_interval(longitude: np.ndarray) -> tuple[float, float]:
    """Smallest arc of longitudes holding every grid longitude: (start in 0..360, width)."""
    lon = np.sort(np.mod(longitude, 360.0))
    gaps = np.diff(np.concatenate([lon, [lon[0] + 360.0]]))
    largest = int(np.argmax(gaps))
    start = lon[(largest + 1) % lon.size]
    return float(start), float(360.0 - gaps[largest])


def _regional_node_mask(xyz: np.ndarray, latitude: np.ndarray, longitude: np.ndarray,
                        margin_arc: float) -> np.ndarray:
    """Mesh nodes within ``margin_arc`` (radians, great circle) of the grid's lat-lon box.

    The box is widened by ``margin_arc`` in latitude and, at a node's latitude phi, by
    ``arcsin(sin(margin) / cos(phi))`` in longitude, which bounds the longitude difference of
    any two points within ``margin_arc`` of each other; nodes so near a pole that the bound
    exceeds 90 degrees are kept whatever their longitude.
    """
    node_lat = np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0))
    lat_lo, lat_hi = np.radians(latitude.min()), np.radians(latitude.max())
    in_lat = (node_lat >= lat_lo - margin_arc) & (node_lat <= lat_hi + margin_arc)
    start, width = _longitude_interval(longitude)
    node_lon = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))
    offset = np.mod(node_lon - start, 360.0)
    outside = np.where(offset <= width, 0.0, np.minimum(offset - width, 360.0 - offset))
    ratio = np.sin(margin_arc) / np.maximum(np.cos(node_lat), 1e-300)
    allowed = np.degrees(np.arcsin(np.clip(ratio, 0.0, 1.0)))
    in_lon = (ratio >= 1.0) | (outside <= allowed)
    return in_lat & in_lon


# ----------------------------------------------------------------------------------------------
# Grid <-> mesh connectivity
# ----------------------------------------------------------------------------------------------

def _kd_tree(points: np.ndarray) -> cKDTree:
    """A k-d tree of ``points`` (N, 3). scipy.spatial is imported here, not with the module:
    the import takes 0.3 s, and a graph read from the cache (every run after the first on a
    grid) needs none of it."""
    from scipy.spatial import cKDTree

    return cKDTree(points)


def _grid_to_mesh_edges(points: np.ndarray, mesh_xyz: np.ndarray, radius: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Every (grid point, mesh node) pair closer than ``radius`` (chord), grid -> mesh."""
    neighbours = _kd_tree(mesh_xyz).query_ball_point(points, r=radius, workers=-1)
    counts = np.fromiter((len(n) for n in neighbours), dtype=np.int64, count=len(points))
    receivers = np.fromiter(itertools.chain.from_iterable(neighbours), dtype=np.int64,
                            count=int(counts.sum()))
    senders = np.repeat(np.arange(len(points), dtype=np.int64), counts)
    return senders, receivers


def _choose_triangles(points: np.ndarray, point_lon: np.ndarray, vertices: np.ndarray,
                      faces: np.ndarray, candidates: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Pick, for each point, the candidate face that contains it.

    A face contains a point when its barycentric weights are all >= -tolerance. A point
    strictly inside (all weights > tolerance) has exactly one such face. A point on an edge
    or a vertex picks, among the faces touching it, the one whose centroid lies furthest east
    in the point's local frame (then furthest north): a rule that rotations about the polar
    axis do not change, unlike an index-based tie-break.

    Returns
    -------
    face : (P,) chosen face index (meaningless where not found).
    found : (P,) bool.
    """
    corners = vertices[faces[candidates]]                       # (P, k, 3, 3)
    weights = barycentric_weights(points[:, None, :], corners[..., 0, :], corners[..., 1, :],
                                  corners[..., 2, :])
    min_weight = weights.min(axis=-1)                           # (P, k)
    valid = min_weight >= -_TOLERANCE
    strict = min_weight > _TOLERANCE
    eligible = np.where(strict.any(axis=1, keepdims=True), strict, valid)
    centroid = corners.mean(axis=-2) - points[:, None, :]
    local = to_local_frame(centroid, points[:, None, :], point_lon[:, None])
    east = np.where(eligible, local[..., 1], -np.inf)
    near_best = eligible & (east >= east.max(axis=1, keepdims=True) - _TOLERANCE)
    best = np.argmax(np.where(near_best, local[..., 2], -np.inf), axis=1)
    face = candidates[np.arange(len(points)), best]
    return face, valid.any(axis=1)


def containing_triangles(points: np.ndarray, point_lon_rad: np.ndarray, vertices: np.ndarray,
                         faces: np.ndarray, n_candidates: int = 12) -> np.ndarray:
    """Index of the face of ``faces`` containing each point (see :func:`_choose_triangles`).

    Candidates are the faces with the nearest centroids (KD-tree); points not inside any of
    them are retried with more candidates, then against every face.

    Parameters
    ----------
    points : (P, 3) unit vectors; point_lon_rad : (P,) their longitudes (radians).
    vertices : (M, 3) unit vectors; faces : (T, 3) counter-clockwise triangles covering the
        points.
    """
    centroids = vertices[faces].mean(axis=1)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    tree = _kd_tree(centroids)
    result = np.full(len(points), -1, dtype=np.int64)
    todo = np.arange(len(points))
    for k in (n_candidates, 64):
        k = min(k, len(faces))
        for start in range(0, len(todo), _CHUNK):
            chunk = todo[start:start + _CHUNK]
            _, candidates = tree.query(points[chunk], k=k, workers=-1)
            candidates = np.asarray(candidates).reshape(len(chunk), k)
            face, found = _choose_triangles(points[chunk], point_lon_rad[chunk], vertices,
                                            faces, candidates)
            result[chunk[found]] = face[found]
        todo = np.flatnonzero(result < 0)
        if todo.size == 0:
            return result
    everything = np.arange(len(faces))
    for index in todo:
        face, found = _choose_triangles(points[index:index + 1], point_lon_rad[index:index + 1],
                                        vertices, faces, everything[None, :])
        if found[0]:
            result[index] = face[0]
    if (result < 0).any():
        raise DataError(f"{int((result < 0).sum())} grid points lie in no mesh triangle",
                        "use mesh_to_grid='knn' (the kept mesh does not cover the grid)")
    return result


def _mesh_to_grid_edges(points: np.ndarray, point_lon_rad: np.ndarray, mesh: MultiMesh,
                        method: str, knn: int) -> tuple[np.ndarray, np.ndarray]:
    """Mesh -> grid edges: the containing triangle's 3 vertices, or the ``knn`` nearest nodes."""
    if method == "triangle":
        face = containing_triangles(points, point_lon_rad, mesh.vertices, mesh.faces)
        senders = mesh.faces[face].reshape(-1)
        per_point = 3
    else:
        _, nearest = _kd_tree(mesh.vertices).query(points, k=knn, workers=-1)
        senders = np.asarray(nearest, dtype=np.int64).reshape(-1)
        per_point = knn
    receivers = np.repeat(np.arange(len(points), dtype=np.int64), per_point)
    return senders.astype(np.int64), receivers


# ----------------------------------------------------------------------------------------------
# Grid-mesh graph
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridMeshGraph:
    """Everything a GraphCast-style network needs about its graphs, as numpy arrays.

    Attributes
    ----------
    grid_latitude, grid_longitude : 1-D degrees, as given.
    mesh_vertices : (M', 3) unit vectors of the kept mesh nodes (all of them for a global grid,
        those near the region for a regional one).
    mesh_senders, mesh_receivers : (E,) int64 multi-mesh edges among kept nodes (reindexed).
    grid2mesh_senders, grid2mesh_receivers : grid index (``i_lat * n_lon + i_lon``) -> mesh node.
    mesh2grid_senders, mesh2grid_receivers : mesh node -> grid index.
    grid_node_features, mesh_node_features : (G, 2), (M', 2) float32 sin(lat), cos(lat).
    mesh_edge_features, grid2mesh_edge_features, mesh2grid_edge_features : (E, 4) float32:
        chord length and sender position minus receiver position in the receiver's local
        frame (receiver at lat 0, lon 0; +y east, +z north; for a receiver at a pole, the
        longitude of the frame is the sender's), divided by the longest chord of the same
        edge set (``per_edge_set``, so the largest length feature is 1) or, for
        ``icosahedron_edge``, by the longest edge of the full multi-mesh (~1.05).
    is_regional : the grid does not go all the way round in longitude.
    mesh_faces : (T', 3) int64 finest-level faces whose 3 vertices are kept (reindexed).
    mesh_node_index : (M',) int64 index of each kept node in the full multi-mesh.
    """

    grid_latitude: np.ndarray
    grid_longitude: np.ndarray
    mesh_vertices: np.ndarray
    mesh_senders: np.ndarray
    mesh_receivers: np.ndarray
    grid2mesh_senders: np.ndarray
    grid2mesh_receivers: np.ndarray
    mesh2grid_senders: np.ndarray
    mesh2grid_receivers: np.ndarray
    grid_node_features: np.ndarray
    mesh_node_features: np.ndarray
    mesh_edge_features: np.ndarray
    grid2mesh_edge_features: np.ndarray
    mesh2grid_edge_features: np.ndarray
    is_regional: bool
    mesh_faces: np.ndarray
    mesh_node_index: np.ndarray

    @property
    def n_grid(self) -> int:
        """Number of grid points, ``n_lat * n_lon``."""
        return len(self.grid_latitude) * len(self.grid_longitude)

    @property
    def n_mesh(self) -> int:
        """Number of kept mesh nodes."""
        return len(self.mesh_vertices)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every field as a numpy array (``is_regional`` as a 0-d bool), for ``np.savez``."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> GridMeshGraph:
        """Inverse of :meth:`to_arrays` (accepts the result of ``np.load`` of an ``.npz``)."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in arrays]
        if missing:
            raise DataError(f"graph arrays lack {missing}",
                            "rebuild the graph (delete the cached file)")
        values = {name: np.asarray(arrays[name]) for name in names}
        values["is_regional"] = bool(values["is_regional"])
        return cls(**values)


def _validate_options(refinement: int, radius_fraction: float, mesh_to_grid: str,
                      knn: int, edge_normalization: str = "per_edge_set") -> None:
    if isinstance(refinement, bool) or int(refinement) != refinement or refinement < 0:
        raise ConfigError(f"mesh refinement must be an integer >= 0, got {refinement!r}",
                          "give 0..7 (GraphCast uses 6)")
    if not radius_fraction > 0:
        raise ConfigError(f"grid-to-mesh radius fraction must be > 0, got {radius_fraction}",
                          "use 0.6 (GraphCast)")
    if mesh_to_grid not in MESH_TO_GRID_METHODS:
        raise ConfigError(f"unknown mesh_to_grid method {mesh_to_grid!r}",
                          f"use one of {MESH_TO_GRID_METHODS}")
    if mesh_to_grid == "knn" and (int(knn) != knn or knn < 1):
        raise ConfigError(f"knn must be an integer >= 1, got {knn!r}", "use 3")
    if edge_normalization not in EDGE_NORMALIZATIONS:
        raise ConfigError(f"unknown edge normalisation {edge_normalization!r}",
                          f"use one of {EDGE_NORMALIZATIONS} ('per_edge_set' for new models)")


def _subset(mesh: MultiMesh, keep: np.ndarray) -> tuple[np.ndarray, ...]:
    """Kept nodes' old->new index map, and the edges and faces among kept nodes (reindexed)."""
    new_index = np.full(len(mesh.vertices), -1, dtype=np.int64)
    new_index[keep] = np.arange(int(keep.sum()))
    edge_kept = keep[mesh.senders] & keep[mesh.receivers]
    face_kept = keep[mesh.faces].all(axis=1)
    return (new_index, new_index[mesh.senders[edge_kept]], new_index[mesh.receivers[edge_kept]],
            new_index[mesh.faces[face_kept]])


def build_graph(latitude: np.ndarray, longitude: np.ndarray, refinement: int,
                radius_fraction: float = 0.6, mesh_to_grid: str = "triangle",
                knn: int = 3, edge_normalization: str = "per_edge_set") -> GridMeshGraph:
    """Build the grid -> mesh, multi-mesh and mesh -> grid graphs of a lat-lon grid.

    Parameters
    ----------
    latitude, longitude : 1-D grid coordinates in degrees (any longitude convention).
    refinement : icosahedral refinement r (10 * 4**r + 2 mesh nodes).
    radius_fraction : a grid point sends to every mesh node within this fraction of the longest
        finest-level edge (chord distance).
    mesh_to_grid : ``triangle`` (the 3 vertices of the finest triangle containing the grid
        point) or ``knn`` (its ``knn`` nearest mesh nodes; ties broken by node index).
    knn : neighbours for ``knn``.
    edge_normalization : ``per_edge_set`` (each edge set's features divided by its own longest
        chord, GraphCast) or ``icosahedron_edge`` (all divided by the longest multi-mesh edge,
        for models trained before mesh format 2); see :data:`EDGE_NORMALIZATIONS`.

    Returns
    -------
    GridMeshGraph

    Raises
    ------
    ConfigError : invalid options.
    DataError : invalid coordinates, or a grid point that sends to no mesh node (raise
        ``radius_fraction``).
    """
    _validate_options(refinement, radius_fraction, mesh_to_grid, knn, edge_normalization)
    lat, lon = _check_grid(latitude, longitude)
    mesh = icosahedral_multimesh(refinement)
    finest = finest_edge_chord(mesh)
    points = grid_xyz(lat, lon)
    point_lon = np.radians(np.broadcast_to(lon, (lat.size, lon.size)).reshape(-1))

    g2m_senders, g2m_receivers = _grid_to_mesh_edges(points, mesh.vertices,
                                                     radius_fraction * finest)
    lonely = np.setdiff1d(np.arange(len(points)), g2m_senders)
    if lonely.size:
        i_lat, i_lon = divmod(int(lonely[0]), lon.size)
        raise DataError(f"{lonely.size} grid points send to no mesh node, e.g. "
                        f"({lat[i_lat]}, {lon[i_lon]})",
                        "raise radius_fraction (GraphCast uses 0.6) or the refinement")
    if mesh_to_grid == "knn" and knn > len(mesh.vertices):
        raise ConfigError(f"knn={knn} exceeds the {len(mesh.vertices)} mesh nodes",
                          "lower knn or raise the refinement")
    m2g_senders, m2g_receivers = _mesh_to_grid_edges(points, point_lon, mesh, mesh_to_grid,
                                                     int(knn))

    regional = not is_global_longitude(lon)
    if regional:
        keep = _regional_node_mask(mesh.vertices, lat, lon, _chord_to_arc(finest) + 1e-9)
        keep[g2m_receivers] = True
        keep[m2g_senders] = True
    else:
        keep = np.ones(len(mesh.vertices), dtype=bool)
    new_index, mesh_senders, mesh_receivers, faces = _subset(mesh, keep)
    g2m_receivers, m2g_senders = new_index[g2m_receivers], new_index[m2g_senders]

    order = np.lexsort((g2m_senders, g2m_receivers))
    g2m_senders, g2m_receivers = g2m_senders[order], g2m_receivers[order]

    vertices = np.array(mesh.vertices[keep])
    mesh_lon, mesh_at_pole = _mesh_longitudes(vertices)
    mesh_frame_lon = _receiver_frame_longitudes(mesh_lon[mesh_receivers],
                                                mesh_at_pole[mesh_receivers],
                                                mesh_lon[mesh_senders])
    g2m_frame_lon = _receiver_frame_longitudes(mesh_lon[g2m_receivers],
                                               mesh_at_pole[g2m_receivers],
                                               point_lon[g2m_senders])
    scale = (float(_chord(mesh.vertices[mesh.senders], mesh.vertices[mesh.receivers]).max())
             if edge_normalization == "icosahedron_edge" else None)
    return GridMeshGraph(
        grid_latitude=lat.copy(), grid_longitude=lon.copy(), mesh_vertices=vertices,
        mesh_senders=mesh_senders, mesh_receivers=mesh_receivers,
        grid2mesh_senders=g2m_senders, grid2mesh_receivers=g2m_receivers,
        mesh2grid_senders=m2g_senders, mesh2grid_receivers=m2g_receivers,
        grid_node_features=_node_features(points), mesh_node_features=_node_features(vertices),
        mesh_edge_features=_edge_features(vertices[mesh_senders], vertices[mesh_receivers],
                                          mesh_frame_lon, scale),
        grid2mesh_edge_features=_edge_features(points[g2m_senders], vertices[g2m_receivers],
                                               g2m_frame_lon, scale),
        mesh2grid_edge_features=_edge_features(vertices[m2g_senders], points[m2g_receivers],
                                               point_lon[m2g_receivers], scale),
        is_regional=regional, mesh_faces=faces, mesh_node_index=np.flatnonzero(keep))


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

_MEMORY_CACHE: dict[str, GridMeshGraph] = {}


def default_cache_dir() -> Path:
    """``$WEATHERMODEL_CACHE`` if set, else ``~/.cache/weathermodel``."""
    configured = os.environ.get("WEATHERMODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "weathermodel"


def graph_cache_key(latitude: np.ndarray, longitude: np.ndarray, refinement: int,
                    radius_fraction: float = 0.6, mesh_to_grid: str = "triangle",
                    knn: int = 3, edge_normalization: str = "per_edge_set") -> str:
    """sha256 (hex) of the exact inputs of :func:`build_graph` and ``MESH_FORMAT_VERSION``."""
    lat = np.ascontiguousarray(latitude, dtype="<f8")
    lon = np.ascontiguousarray(longitude, dtype="<f8")
    digest = hashlib.sha256()
    digest.update(f"mesh-format={MESH_FORMAT_VERSION};refinement={int(refinement)};"
                  f"radius={float(radius_fraction)!r};method={mesh_to_grid};knn={int(knn)};"
                  f"edges={edge_normalization};nlat={lat.size};nlon={lon.size};".encode())
    digest.update(lat.tobytes())
    digest.update(b";")
    digest.update(lon.tobytes())
    return digest.hexdigest()


def clear_memory_cache() -> None:
    """Forget the graphs built or loaded by this process (files on disk are kept)."""
    _MEMORY_CACHE.clear()


def _load(path: Path, latitude: np.ndarray, longitude: np.ndarray) -> GridMeshGraph | None:
    """The cached graph at ``path``, or None if it is missing, unreadable or for another grid."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            graph = GridMeshGraph.from_arrays(data)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, DataError) as error:
        warnings.warn(f"ignoring unreadable cached graph {path}: {error}", stacklevel=3)
        return None
    if not (np.array_equal(graph.grid_latitude, latitude)
            and np.array_equal(graph.grid_longitude, longitude)):
        warnings.warn(f"ignoring cached graph {path}: made for another grid", stacklevel=3)
        return None
    return graph


def _save(graph: GridMeshGraph, path: Path) -> None:
    """Write ``graph`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".graph-", suffix=".npz.tmp",
                                             dir=path.parent)
    except OSError as error:
        warnings.warn(f"cannot cache the graph in {path.parent}: {error}", stacklevel=3)
        return
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **graph.to_arrays())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        warnings.warn(f"cannot cache the graph in {path}: {error}", stacklevel=3)


def cached_graph(latitude: np.ndarray, longitude: np.ndarray, refinement: int,
                 radius_fraction: float = 0.6, mesh_to_grid: str = "triangle", knn: int = 3,
                 cache_dir: str | Path | None = None,
                 edge_normalization: str = "per_edge_set") -> GridMeshGraph:
    """:func:`build_graph`, built at most once per process and cached on disk.

    The file is ``<cache_dir>/graph-<sha256 of the inputs>.npz`` (see :func:`graph_cache_key`),
    read with ``allow_pickle=False`` and written atomically. An unreadable file is rebuilt.

    Parameters
    ----------
    latitude, longitude, refinement, radius_fraction, mesh_to_grid, knn, edge_normalization :
        as for :func:`build_graph`.
    cache_dir : folder of the cached files (default :func:`default_cache_dir`).

    Returns
    -------
    GridMeshGraph
        Shared between callers with the same inputs: do not modify its arrays.
    """
    lat = np.asarray(latitude, dtype=np.float64)
    lon = np.asarray(longitude, dtype=np.float64)
    key = graph_cache_key(lat, lon, refinement, radius_fraction, mesh_to_grid, knn,
                          edge_normalization)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder.expanduser() / f"graph-{key}.npz"
    memory_key = str(path.absolute())
    if memory_key in _MEMORY_CACHE:
        return _MEMORY_CACHE[memory_key]
    graph = _load(path, lat, lon)
    if graph is None:
        graph = build_graph(lat, lon, refinement, radius_fraction, mesh_to_grid, knn,
                            edge_normalization)
        _save(graph, path)
    _MEMORY_CACHE[memory_key] = graph
    return graph


# ----------------------------------------------------------------------------------------------
# Cell areas
# ----------------------------------------------------------------------------------------------

def longitude_cell_widths(longitude: np.ndarray) -> np.ndarray:
    """(n_lon,) widths (degrees) of the cells centred on ``longitude``.

    Edges lie halfway between neighbouring longitudes (steps taken modulo 360, so a region
    across the meridian of its convention works); a global grid wraps round (widths sum to
    360), a regional grid's end cells extend half a step beyond the end longitudes.
    """
    lon = np.asarray(longitude, dtype=np.float64)
    if lon.ndim != 1 or lon.size < 2:
        raise DataError("cell widths need at least 2 longitudes", "pass the grid's longitudes")
    steps = _longitude_steps(lon)
    if not (steps > 0).all():
        raise DataError("longitudes must increase (modulo 360) without repeats",
                        "sort the longitudes eastwards")
    if is_global_longitude(lon):
        wrap = np.mod(lon[0] - lon[-1], 360.0)
        before, after = np.concatenate([[wrap], steps]), np.concatenate([steps, [wrap]])
    else:
        before, after = np.concatenate([[steps[0]], steps]), np.concatenate([steps, [steps[-1]]])
    return 0.5 * (before + after)


def cell_areas_m2(latitude: np.ndarray, longitude: np.ndarray,
                  radius_m: float = 6_371_000.0) -> np.ndarray:
    """Exact spherical areas (m**2) of the grid cells, shape (n_lat, n_lon).

    ``R**2 * |sin(lat_upper) - sin(lat_lower)| * width_radians`` with the edges of
    :func:`latitude_cell_edges` and :func:`longitude_cell_widths`; a global grid sums to
    ``4 * pi * R**2``.
    """
    lat_edges = np.radians(latitude_cell_edges(latitude))
    band = np.abs(np.diff(np.sin(lat_edges)))
    width = np.radians(longitude_cell_widths(longitude))
    return radius_m ** 2 * band[:, None] * width[None, :]

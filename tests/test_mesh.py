"""Icosahedral multi-mesh, grid <-> mesh graphs, their cache, and cell areas.

Oracles are brute force (all pairs, all faces), closed forms (node and edge counts, Euler
characteristic, 4 pi R**2) and symmetry (rotation by 72 degrees about the polar axis).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from weathermodel.errors import ConfigError, DataError
from weathermodel.models import mesh as mesh_module
from weathermodel.models.mesh import (
    GridMeshGraph,
    barycentric_weights,
    build_graph,
    cached_graph,
    cell_area_weights,
    cell_areas_m2,
    clear_memory_cache,
    finest_edge_chord,
    grid_xyz,
    icosahedral_multimesh,
    is_global_longitude,
)

EARTH_RADIUS = 6_371_000.0
SPHERE = 4.0 * np.pi * EARTH_RADIUS ** 2

LAT_25 = np.arange(-90.0, 90.0 + 1e-9, 2.5)            # 73, poles included
LON_25 = np.arange(0.0, 360.0, 2.5)                    # 144
GAUSS_LAT = np.degrees(np.arcsin(np.polynomial.legendre.leggauss(32)[0]))   # 32, ascending
GAUSS_LON = np.arange(64) * 360.0 / 64
NCEP_LAT = np.arange(15.0, 75.0 + 1e-9, 2.5)
NCEP_LON = np.arange(200.0, 330.0 + 1e-9, 2.5)
CROSS_LAT = np.arange(35.0, 60.0 + 1e-9, 2.5)
CROSS_LON = np.arange(-20.0, 30.0 + 1e-9, 2.5)


# ------------------------------------------------------------------------------------ helpers

def rotation_z(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0.0],
                     [np.sin(angle), np.cos(angle), 0.0],
                     [0.0, 0.0, 1.0]])


def finest_edges(faces: np.ndarray) -> set[tuple[int, int]]:
    sides = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    return {(int(min(a, b)), int(max(a, b))) for a, b in sides}


def rotation_permutation(vertices: np.ndarray, degrees: float) -> np.ndarray:
    """perm[i] = index of the vertex at R(degrees) @ vertices[i] (asserting it exists)."""
    rotated = vertices @ rotation_z(degrees).T
    distance = np.linalg.norm(rotated[:, None, :] - vertices[None, :, :], axis=-1)
    perm = distance.argmin(axis=1)
    assert distance[np.arange(len(vertices)), perm].max() < 1e-12
    return perm


def chord_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


def edge_pairs(senders: np.ndarray, receivers: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(senders.tolist(), receivers.tolist()))


def face_lookup(graph: GridMeshGraph) -> dict[frozenset, np.ndarray]:
    return {frozenset(face.tolist()): face for face in graph.mesh_faces}


def triangle_of_each_point(graph: GridMeshGraph) -> np.ndarray:
    """(G, 3) kept-mesh vertices (counter-clockwise) sending to each grid point."""
    faces = face_lookup(graph)
    order = np.argsort(graph.mesh2grid_receivers, kind="stable")
    senders = graph.mesh2grid_senders[order].reshape(-1, 3)
    return np.stack([faces[frozenset(row.tolist())] for row in senders])


def check_connected_both_ways(graph: GridMeshGraph, per_point: int = 3) -> None:
    n_grid = graph.n_grid
    assert np.bincount(graph.grid2mesh_senders, minlength=n_grid).min() >= 1
    assert (np.bincount(graph.mesh2grid_receivers, minlength=n_grid) == per_point).all()
    for array in (graph.grid2mesh_receivers, graph.mesh2grid_senders, graph.mesh_senders,
                  graph.mesh_receivers):
        assert array.min() >= 0 and array.max() < graph.n_mesh


def check_triangles_contain_points(graph: GridMeshGraph) -> np.ndarray:
    points = grid_xyz(graph.grid_latitude, graph.grid_longitude)
    corners = graph.mesh_vertices[triangle_of_each_point(graph)]
    weights = barycentric_weights(points, corners[:, 0], corners[:, 1], corners[:, 2])
    assert weights.min() >= -1e-9
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    return weights


def brute_force_radius_pairs(points: np.ndarray, vertices: np.ndarray,
                             radius: float) -> set[tuple[int, int]]:
    grid, node = np.nonzero(chord_matrix(points, vertices) <= radius)
    return set(zip(grid.tolist(), node.tolist()))


def sorted_rows(features: np.ndarray) -> np.ndarray:
    return features[np.lexsort(np.round(features, 6).T[::-1])]


# ------------------------------------------------------------------------------------- mesh

@pytest.mark.parametrize("refinement", range(5))
def test_multimesh_counts_and_topology(refinement: int) -> None:
    mesh = icosahedral_multimesh(refinement)
    n_vertices = 10 * 4 ** refinement + 2
    assert mesh.vertices.shape == (n_vertices, 3)
    assert mesh.senders.dtype == np.int64 and mesh.receivers.dtype == np.int64
    assert mesh.faces.dtype == np.int64 and mesh.faces.shape == (20 * 4 ** refinement, 3)
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), 1.0, atol=1e-14)

    directed = edge_pairs(mesh.senders, mesh.receivers)
    assert len(directed) == len(mesh.senders)                      # deduplicated
    assert all((r, s) in directed for s, r in directed)            # both directions
    assert not (mesh.senders == mesh.receivers).any()
    assert len(directed) // 2 == sum(30 * 4 ** level for level in range(refinement + 1))

    fine = finest_edges(mesh.faces)
    assert len(fine) == 30 * 4 ** refinement
    assert n_vertices - len(fine) + len(mesh.faces) == 2           # Euler characteristic
    assert fine <= {(min(s, r), max(s, r)) for s, r in directed}
    assert np.unique(mesh.faces).size == n_vertices


@pytest.mark.parametrize("refinement", range(5))
def test_faces_counter_clockwise_and_edges_regular(refinement: int) -> None:
    mesh = icosahedral_multimesh(refinement)
    a, b, c = (mesh.vertices[mesh.faces[:, k]] for k in range(3))
    outward = np.einsum("ij,ij->i", np.cross(b - a, c - a), (a + b + c) / 3)
    assert (outward > 0).all()

    pairs = np.array(sorted(finest_edges(mesh.faces)))
    lengths = np.linalg.norm(mesh.vertices[pairs[:, 0]] - mesh.vertices[pairs[:, 1]], axis=1)
    assert lengths.min() / lengths.max() > 0.83                    # midpoint subdivision ~0.837
    icosahedron_edge = 4.0 / np.sqrt(10.0 + 2.0 * np.sqrt(5.0))    # chord of a unit icosahedron
    assert lengths.max() <= icosahedron_edge / 2 ** refinement * 1.3
    assert lengths.max() >= icosahedron_edge / 2 ** refinement * 0.99
    assert finest_edge_chord(mesh) == pytest.approx(lengths.max())
    multi = np.linalg.norm(mesh.vertices[mesh.senders] - mesh.vertices[mesh.receivers], axis=1)
    assert multi.max() == pytest.approx(icosahedron_edge)


def test_orientation_poles_and_nested_levels() -> None:
    mesh = icosahedral_multimesh(3)
    lat = np.degrees(np.arcsin(mesh.vertices[:, 2]))
    lon = np.degrees(np.arctan2(mesh.vertices[:, 1], mesh.vertices[:, 0]))
    assert np.isclose(lat, 90).sum() == 1 and np.isclose(lat, -90).sum() == 1
    assert (np.isclose(lon, 0.0, atol=1e-12) & np.isclose(lat, np.degrees(np.arctan(0.5)))).any()
    coarse = icosahedral_multimesh(2)
    np.testing.assert_array_equal(mesh.vertices[:len(coarse.vertices)], coarse.vertices)
    assert edge_pairs(coarse.senders, coarse.receivers) <= edge_pairs(mesh.senders,
                                                                      mesh.receivers)


@pytest.mark.parametrize("refinement", [0, 1, 3])
def test_invariant_under_72_degree_rotation(refinement: int) -> None:
    mesh = icosahedral_multimesh(refinement)
    perm = rotation_permutation(mesh.vertices, 72.0)
    assert np.array_equal(np.sort(perm), np.arange(len(mesh.vertices)))        # a bijection
    edges = edge_pairs(mesh.senders, mesh.receivers)
    assert edge_pairs(perm[mesh.senders], perm[mesh.receivers]) == edges
    assert {frozenset(f) for f in perm[mesh.faces].tolist()} == \
        {frozenset(f) for f in mesh.faces.tolist()}
    with pytest.raises(AssertionError):
        rotation_permutation(mesh.vertices, 36.0)                   # not a symmetry


def test_bad_refinement() -> None:
    with pytest.raises(ConfigError):
        icosahedral_multimesh(-1)
    with pytest.raises(ConfigError):
        build_graph(LAT_25, LON_25, 2, mesh_to_grid="nearest")


# ------------------------------------------------------------------------------- global graphs

@pytest.fixture(scope="module")
def graph_25() -> GridMeshGraph:
    return build_graph(LAT_25, LON_25, 3)


@pytest.fixture(scope="module")
def graph_gauss() -> GridMeshGraph:
    return build_graph(GAUSS_LAT, GAUSS_LON, 3)


def test_global_graph_shapes_and_node_features(graph_25: GridMeshGraph) -> None:
    graph = graph_25
    assert not graph.is_regional and graph.n_grid == 73 * 144
    assert graph.n_mesh == 642
    np.testing.assert_array_equal(graph.mesh_node_index, np.arange(642))
    mesh = icosahedral_multimesh(3)
    assert edge_pairs(graph.mesh_senders, graph.mesh_receivers) == \
        edge_pairs(mesh.senders, mesh.receivers)
    assert len(graph.mesh_faces) == len(mesh.faces)
    lat = np.radians(np.repeat(LAT_25, 144))
    assert graph.grid_node_features.dtype == np.float32
    np.testing.assert_allclose(graph.grid_node_features,
                               np.stack([np.sin(lat), np.cos(lat)], 1), atol=1e-6)
    mesh_lat = np.arcsin(graph.mesh_vertices[:, 2])
    np.testing.assert_allclose(graph.mesh_node_features,
                               np.stack([np.sin(mesh_lat), np.cos(mesh_lat)], 1), atol=1e-6)
    for features in (graph.mesh_edge_features, graph.grid2mesh_edge_features,
                     graph.mesh2grid_edge_features):
        assert features.dtype == np.float32 and features.shape[1] == 4
        # length == |displacement| (a rotation keeps lengths)
        np.testing.assert_allclose(features[:, 0], np.linalg.norm(features[:, 1:], axis=1),
                                   rtol=1e-5, atol=1e-7)
    assert graph.mesh_edge_features[:, 0].max() == pytest.approx(1.0)   # normalised


def test_edge_features_are_in_the_receiver_frame(graph_25: GridMeshGraph) -> None:
    """Recompute a few features by hand with explicit rotation matrices."""
    graph = graph_25
    scale = 4.0 / np.sqrt(10.0 + 2.0 * np.sqrt(5.0))
    rng = np.random.default_rng(0)
    into_pole = np.flatnonzero(np.abs(graph.mesh_vertices[graph.mesh_receivers, 2]) == 1.0)
    assert into_pole.size == 2 * 5 * 4                              # 2 poles, 5 per level
    picked = np.concatenate([rng.choice(len(graph.mesh_senders), 20, replace=False), into_pole])
    for index in picked:
        sender = graph.mesh_vertices[graph.mesh_senders[index]]
        receiver = graph.mesh_vertices[graph.mesh_receivers[index]]
        lat, lon = np.arcsin(receiver[2]), np.arctan2(receiver[1], receiver[0])
        if abs(receiver[2]) == 1.0:                                 # pole: sender's meridian
            lon = np.arctan2(sender[1], sender[0])
        rot_y = np.array([[np.cos(lat), 0, np.sin(lat)], [0, 1, 0], [-np.sin(lat), 0, np.cos(lat)]])
        rotation = rot_y @ rotation_z(-np.degrees(lon))
        np.testing.assert_allclose(rotation @ receiver, [1, 0, 0], atol=1e-12)
        expected = np.concatenate([[np.linalg.norm(sender - receiver)],
                                   rotation @ (sender - receiver)]) / scale
        np.testing.assert_allclose(graph.mesh_edge_features[index], expected, atol=1e-6)


@pytest.mark.parametrize("which", ["graph_25", "graph_gauss"])
def test_grid_to_mesh_is_exactly_the_radius_rule(which: str, request) -> None:
    graph = request.getfixturevalue(which)
    points = grid_xyz(graph.grid_latitude, graph.grid_longitude)
    radius = 0.6 * finest_edge_chord(icosahedral_multimesh(3))
    expected = brute_force_radius_pairs(points, graph.mesh_vertices, radius)
    assert edge_pairs(graph.grid2mesh_senders, graph.grid2mesh_receivers) == expected
    assert {g for g, _ in expected} == set(range(graph.n_grid))     # every point sends


@pytest.mark.parametrize("which", ["graph_25", "graph_gauss"])
def test_mesh_to_grid_triangle_contains_the_point(which: str, request) -> None:
    graph = request.getfixturevalue(which)
    check_connected_both_ways(graph)
    check_triangles_contain_points(graph)

    # brute force: loop over every face for 50 random grid points
    points = grid_xyz(graph.grid_latitude, graph.grid_longitude)
    chosen = triangle_of_each_point(graph)
    rng = np.random.default_rng(1)
    for g in rng.choice(graph.n_grid, 50, replace=False):
        corners = graph.mesh_vertices[graph.mesh_faces]            # every face, (T, 3, 3)
        weights = barycentric_weights(points[g], corners[:, 0], corners[:, 1], corners[:, 2])
        containing = [frozenset(face.tolist())
                      for face in graph.mesh_faces[weights.min(axis=1) >= -1e-9]]
        assert frozenset(chosen[g].tolist()) in containing
        corners = graph.mesh_vertices[chosen[g]]
        if barycentric_weights(points[g], *corners).min() > 1e-9:
            assert len(containing) == 1                             # strictly inside: unique


def test_poles_and_points_on_edges_find_a_triangle(graph_25: GridMeshGraph) -> None:
    weights = check_triangles_contain_points(graph_25)
    on_boundary = weights.min(axis=1) < 1e-9
    assert on_boundary.sum() >= 2 * 144      # both pole rows sit on mesh vertices


@pytest.mark.parametrize("k", [1, 3, 6])
def test_knn_matches_brute_force(k: int) -> None:
    graph = build_graph(GAUSS_LAT, GAUSS_LON, 2, mesh_to_grid="knn", knn=k)
    check_connected_both_ways(graph, per_point=k)
    points = grid_xyz(GAUSS_LAT, GAUSS_LON)
    distance = chord_matrix(points, graph.mesh_vertices)
    order = np.argsort(distance, axis=1)
    for g in range(graph.n_grid):
        senders = graph.mesh2grid_senders[graph.mesh2grid_receivers == g]
        np.testing.assert_allclose(np.sort(distance[g, senders]), distance[g, order[g, :k]],
                                   atol=1e-12)
        if k < graph.n_mesh and distance[g, order[g, k]] - distance[g, order[g, k - 1]] > 1e-9:
            assert set(senders.tolist()) == set(order[g, :k].tolist())


def test_too_small_radius_is_an_error() -> None:
    with pytest.raises(DataError, match="send to no mesh node"):
        build_graph(LAT_25, LON_25, 2, radius_fraction=0.05)


def test_one_degree_refinement_5_is_fast() -> None:
    lat, lon = np.arange(-90.0, 90.5, 1.0), np.arange(0.0, 360.0, 1.0)
    start = time.perf_counter()
    graph = build_graph(lat, lon, 5)
    assert time.perf_counter() - start < 20.0
    assert graph.n_mesh == 10 * 4 ** 5 + 2 and graph.n_grid == 181 * 360
    check_connected_both_ways(graph)


# ----------------------------------------------------------------------------- regional graphs

def great_circle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 2 * np.arcsin(np.clip(chord_matrix(a, b) / 2, 0, 1))


def test_regional_ncep_grid() -> None:
    refinement = 4
    graph = build_graph(NCEP_LAT, NCEP_LON, refinement)
    mesh = icosahedral_multimesh(refinement)
    assert graph.is_regional and not is_global_longitude(NCEP_LON)
    assert 0 < graph.n_mesh < 0.25 * len(mesh.vertices)
    check_connected_both_ways(graph)
    check_triangles_contain_points(graph)
    np.testing.assert_array_equal(graph.mesh_vertices, mesh.vertices[graph.mesh_node_index])

    # every mesh node within the radius of a grid point is kept and connected (as if global)
    points = grid_xyz(NCEP_LAT, NCEP_LON)
    finest = finest_edge_chord(mesh)
    expected = brute_force_radius_pairs(points, mesh.vertices, 0.6 * finest)
    found = {(g, int(graph.mesh_node_index[m]))
             for g, m in zip(graph.grid2mesh_senders.tolist(), graph.grid2mesh_receivers.tolist())}
    assert found == expected

    # kept nodes are near the region: within one finest edge (+ half a grid cell) of the grid
    nearest = great_circle(graph.mesh_vertices, points).min(axis=1)
    finest_arc = 2 * np.arcsin(finest / 2)
    assert nearest.max() <= finest_arc + np.radians(2.5)
    # and every node within one finest edge of the grid is kept
    all_nearest = great_circle(mesh.vertices, points).min(axis=1)
    assert set(np.flatnonzero(all_nearest <= finest_arc).tolist()) <= \
        set(graph.mesh_node_index.tolist())

    # edges and faces: exactly those of the full multi-mesh among kept nodes
    kept = set(graph.mesh_node_index.tolist())
    full_edges = {(s, r) for s, r in edge_pairs(mesh.senders, mesh.receivers)
                  if s in kept and r in kept}
    index = graph.mesh_node_index
    assert edge_pairs(index[graph.mesh_senders], index[graph.mesh_receivers]) == full_edges
    full_faces = {frozenset(f) for f in mesh.faces.tolist() if kept.issuperset(f)}
    assert {frozenset(f) for f in index[graph.mesh_faces].tolist()} == full_faces


def test_region_across_longitude_zero_in_both_conventions() -> None:
    signed = build_graph(CROSS_LAT, CROSS_LON, 4)
    wrapped_lon = np.mod(CROSS_LON, 360.0)                  # 340 .. 357.5, 0 .. 30
    wrapped = build_graph(CROSS_LAT, wrapped_lon, 4)
    for graph in (signed, wrapped):
        assert graph.is_regional
        check_connected_both_ways(graph)
        check_triangles_contain_points(graph)
    np.testing.assert_array_equal(signed.mesh_node_index, wrapped.mesh_node_index)
    lon = np.degrees(np.arctan2(signed.mesh_vertices[:, 1], signed.mesh_vertices[:, 0]))
    assert (lon < -20).any() and (lon > 30).any() and (np.abs(lon) < 150).all()
    for name in ("grid2mesh_senders", "grid2mesh_receivers", "mesh2grid_senders",
                 "mesh2grid_receivers", "mesh_senders", "mesh_receivers"):
        np.testing.assert_array_equal(getattr(signed, name), getattr(wrapped, name))
    for name in ("mesh_edge_features", "grid2mesh_edge_features", "mesh2grid_edge_features"):
        np.testing.assert_allclose(getattr(signed, name), getattr(wrapped, name), atol=1e-6)


def test_grid_of_one_longitude_is_regional() -> None:
    graph = build_graph(NCEP_LAT, np.array([250.0]), 3, mesh_to_grid="knn", knn=2)
    assert graph.is_regional
    check_connected_both_ways(graph, per_point=2)


# ------------------------------------------------------------------------ rotation invariance

def corresponding(graph: GridMeshGraph, shifted: GridMeshGraph, perm: np.ndarray) -> np.ndarray:
    """Map kept-node indices of ``graph`` to those of ``shifted`` through the mesh symmetry."""
    inverse = np.full(len(perm), -1)
    inverse[shifted.mesh_node_index] = np.arange(shifted.n_mesh)
    mapped = inverse[perm[graph.mesh_node_index]]
    assert (mapped >= 0).all()
    return mapped


def assert_same_features(keys: np.ndarray, features: np.ndarray, shifted_keys: np.ndarray,
                         shifted_features: np.ndarray) -> None:
    order, shifted_order = np.argsort(keys), np.argsort(shifted_keys)
    np.testing.assert_array_equal(keys[order], shifted_keys[shifted_order])
    np.testing.assert_allclose(features[order], shifted_features[shifted_order], atol=1e-6)
    np.testing.assert_allclose(sorted_rows(features), sorted_rows(shifted_features), atol=1e-6)


@pytest.mark.parametrize("lat, lon", [(LAT_25, LON_25), (GAUSS_LAT, GAUSS_LON),
                                      (NCEP_LAT, NCEP_LON)], ids=["2.5deg", "gauss", "ncep"])
def test_edge_features_invariant_under_72_degree_shift(lat: np.ndarray, lon: np.ndarray) -> None:
    refinement = 3
    graph = build_graph(lat, lon, refinement)
    shifted = build_graph(lat, lon + 72.0, refinement)
    assert graph.n_mesh == shifted.n_mesh
    perm = rotation_permutation(icosahedral_multimesh(refinement).vertices, 72.0)
    node = corresponding(graph, shifted, perm)
    n = graph.n_grid + graph.n_mesh

    assert_same_features(node[graph.mesh_senders] * n + node[graph.mesh_receivers],
                         graph.mesh_edge_features,
                         shifted.mesh_senders * n + shifted.mesh_receivers,
                         shifted.mesh_edge_features)
    assert_same_features(graph.grid2mesh_senders * n + node[graph.grid2mesh_receivers],
                         graph.grid2mesh_edge_features,
                         shifted.grid2mesh_senders * n + shifted.grid2mesh_receivers,
                         shifted.grid2mesh_edge_features)
    assert_same_features(node[graph.mesh2grid_senders] * n + graph.mesh2grid_receivers,
                         graph.mesh2grid_edge_features,
                         shifted.mesh2grid_senders * n + shifted.mesh2grid_receivers,
                         shifted.mesh2grid_edge_features)
    np.testing.assert_allclose(graph.grid_node_features, shifted.grid_node_features, atol=1e-7)


def test_graph_maps_onto_itself_when_the_grid_step_divides_72_degrees() -> None:
    """Rolling a 6-degree global grid (poles included) by 12 columns = rotating it by 72
    degrees: every edge maps onto an edge with the same features (edges into the pole nodes
    and from the pole grid points included), so a network on this graph is equivariant."""
    lat, lon = np.linspace(-90.0, 90.0, 31), np.arange(60) * 6.0
    for method in ("triangle", "knn"):
        graph = build_graph(lat, lon, 2, mesh_to_grid=method, knn=4)
        perm = rotation_permutation(graph.mesh_vertices, 72.0)
        roll = (np.arange(graph.n_grid) // 60) * 60 + (np.arange(graph.n_grid) % 60 + 12) % 60
        n = graph.n_grid + graph.n_mesh
        for senders, receivers, features, map_sender, map_receiver in (
                (graph.mesh_senders, graph.mesh_receivers, graph.mesh_edge_features, perm, perm),
                (graph.grid2mesh_senders, graph.grid2mesh_receivers,
                 graph.grid2mesh_edge_features, roll, perm),
                (graph.mesh2grid_senders, graph.mesh2grid_receivers,
                 graph.mesh2grid_edge_features, perm, roll)):
            if method == "knn" and features is not graph.mesh2grid_edge_features:
                continue
            keep = np.ones(len(senders), dtype=bool)
            if method == "knn":      # knn ties are broken by index: leave tied points out
                distance = np.sort(chord_matrix(grid_xyz(lat, lon), graph.mesh_vertices), axis=1)
                tied = distance[:, 4] - distance[:, 3] < 1e-9
                keep = ~tied[receivers]
                assert keep.mean() > 0.5
            keys = senders[keep] * n + receivers[keep]
            mapped = map_sender[senders[keep]] * n + map_receiver[receivers[keep]]
            features = features[keep]
            assert_same_features(mapped, features, keys, features)


# ----------------------------------------------------------------------------------- caching

def assert_graphs_equal(a: GridMeshGraph, b: GridMeshGraph) -> None:
    left, right = a.to_arrays(), b.to_arrays()
    assert left.keys() == right.keys()
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)
        assert left[name].dtype == right[name].dtype, name


def test_to_arrays_round_trip(graph_gauss: GridMeshGraph) -> None:
    again = GridMeshGraph.from_arrays(graph_gauss.to_arrays())
    assert_graphs_equal(graph_gauss, again)
    assert again.is_regional is False
    arrays = graph_gauss.to_arrays()
    del arrays["mesh_faces"]
    with pytest.raises(DataError):
        GridMeshGraph.from_arrays(arrays)


def test_cache_builds_once_and_reloads_without_pickle(tmp_path: Path, monkeypatch) -> None:
    clear_memory_cache()
    first = cached_graph(GAUSS_LAT, GAUSS_LON, 2, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("graph-*.npz"))
    assert len(files) == 1 and len(files[0].stem) == len("graph-") + 64
    assert not list(tmp_path.glob("*.tmp"))

    def no_build(*args, **kwargs):
        raise AssertionError("build_graph called although the graph is cached")

    monkeypatch.setattr(mesh_module, "build_graph", no_build)
    assert cached_graph(GAUSS_LAT, GAUSS_LON, 2, cache_dir=tmp_path) is first   # memory
    clear_memory_cache()
    from_disk = cached_graph(GAUSS_LAT, GAUSS_LON, 2, cache_dir=tmp_path)        # file
    assert from_disk is not first
    assert_graphs_equal(first, from_disk)
    with np.load(files[0], allow_pickle=False) as data:
        assert {key: data[key].dtype.kind for key in data.files}.keys() == \
            first.to_arrays().keys()
        assert all(data[key].dtype != object for key in data.files)

    with pytest.raises(AssertionError, match="cached"):            # other inputs: rebuild
        cached_graph(GAUSS_LAT, GAUSS_LON, 3, cache_dir=tmp_path)


def test_cache_files_differ_by_input(tmp_path: Path) -> None:
    clear_memory_cache()
    variants = [dict(refinement=2), dict(refinement=1), dict(refinement=2, radius_fraction=0.7),
                dict(refinement=2, mesh_to_grid="knn", knn=3),
                dict(refinement=2, mesh_to_grid="knn", knn=4)]
    for variant in variants:
        cached_graph(GAUSS_LAT, GAUSS_LON, cache_dir=tmp_path, **variant)
    cached_graph(GAUSS_LAT, GAUSS_LON + 1e-9, 2, cache_dir=tmp_path)   # other bytes
    assert len(list(tmp_path.glob("graph-*.npz"))) == len(variants) + 1


def test_cache_default_dir_and_corrupt_file(tmp_path: Path, monkeypatch) -> None:
    clear_memory_cache()
    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path / "cache"))
    graph = cached_graph(NCEP_LAT, NCEP_LON, 2)
    (path,) = (tmp_path / "cache").glob("graph-*.npz")
    path.write_bytes(b"not a zip file")
    clear_memory_cache()
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = cached_graph(NCEP_LAT, NCEP_LON, 2)
    assert_graphs_equal(graph, rebuilt)
    with np.load(path, allow_pickle=False) as data:                 # rewritten, valid
        assert bool(data["is_regional"])
    clear_memory_cache()


# ------------------------------------------------------------------------------- cell areas

@pytest.mark.parametrize("lat, lon", [
    (np.arange(-90.0, 90.5, 1.0), np.arange(0.0, 360.0, 1.0)),      # 1 degree with poles
    (np.arange(-89.5, 90.0, 1.0), np.arange(-180.0, 180.0, 1.0)),   # 1 degree, no poles
    (GAUSS_LAT, GAUSS_LON),
    (GAUSS_LAT[::-1], GAUSS_LON - 180.0),                           # descending
], ids=["1deg-poles", "1deg-centres", "gauss", "gauss-descending"])
def test_cell_areas_cover_the_sphere(lat: np.ndarray, lon: np.ndarray) -> None:
    areas = cell_areas_m2(lat, lon)
    assert areas.shape == (lat.size, lon.size) and (areas > 0).all()
    assert abs(areas.sum() / SPHERE - 1.0) < 1e-10
    # the same along a latitude row (equal longitude steps)
    np.testing.assert_allclose(areas, areas[:, :1].repeat(lon.size, axis=1), rtol=1e-12)


def test_regional_cell_areas() -> None:
    areas = cell_areas_m2(NCEP_LAT, NCEP_LON)
    box = EARTH_RADIUS ** 2 * (np.sin(np.radians(76.25)) - np.sin(np.radians(13.75))) \
        * np.radians(132.5)
    assert areas.sum() == pytest.approx(box, rel=1e-12)
    crossing = cell_areas_m2(CROSS_LAT, np.mod(CROSS_LON, 360.0))
    np.testing.assert_allclose(crossing, cell_areas_m2(CROSS_LAT, CROSS_LON), rtol=1e-12)


def test_area_weights() -> None:
    for lat in (LAT_25, GAUSS_LAT, NCEP_LAT, GAUSS_LAT[::-1]):
        for method in ("cos", "edges"):
            weights = cell_area_weights(lat, method)
            assert weights.shape == lat.shape and (weights >= 0).all()
            assert weights.mean() == pytest.approx(1.0, abs=1e-12)
    # they differ where a row touches a pole or the grid is irregular ...
    assert cell_area_weights(LAT_25, "cos")[0] == pytest.approx(0.0, abs=1e-12)
    assert cell_area_weights(LAT_25, "edges")[0] > 0
    polar_region = np.arange(60.0, 90.0 + 1e-9, 2.5)
    assert not np.allclose(cell_area_weights(polar_region, "cos"),
                           cell_area_weights(polar_region, "edges"), rtol=1e-3)
    assert not np.allclose(cell_area_weights(GAUSS_LAT, "cos"),
                           cell_area_weights(GAUSS_LAT, "edges"), rtol=1e-4)
    # ... and agree on a regular grid away from the poles: sin(x+h) - sin(x-h) = 2 sin(h) cos(x)
    np.testing.assert_allclose(cell_area_weights(NCEP_LAT, "cos"),
                               cell_area_weights(NCEP_LAT, "edges"), rtol=1e-12)
    # edges weights are the row sums of the exact areas
    areas = cell_areas_m2(GAUSS_LAT, GAUSS_LON).sum(axis=1)
    np.testing.assert_allclose(cell_area_weights(GAUSS_LAT, "edges"), areas / areas.mean(),
                               rtol=1e-12)
    with pytest.raises(ConfigError):
        cell_area_weights(LAT_25, "area")

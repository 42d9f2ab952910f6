"""Science defects of the models (issue 13, item 6), each pinned by a test that failed before.

1. The transformer wrapped every grid around in longitude; a regional grid must not wrap.
2. Graph edge features were divided by the icosahedron edge length (grid <-> mesh features
   ~0.02 at refinement 5); each edge set is now divided by its own longest edge (GraphCast).
3. ``cos`` latitude weights give pole rows no loss weight; the default weighting gives them the
   area of their polar cap (GraphCast's ``normalized_latitude_weights``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from weathermodel.configuration import from_dict
from weathermodel.data.grid import gaussian_latitudes
from weathermodel.models.config import (
    GraphConfig,
    LossConfig,
    ModelConfig,
    TransformerConfig,
)
from weathermodel.models.graph import GraphNetwork
from weathermodel.models.io import model_from_payload, read_payload
from weathermodel.models.mesh import (
    GridMeshGraph,
    build_graph,
    cached_graph,
    cell_area_weights,
    clear_memory_cache,
    icosahedral_multimesh,
)
from weathermodel.models.transformer import WeatherTransformer

PROJECT = Path(__file__).resolve().parents[1]
EDGE_SETS = ("grid2mesh", "mesh", "mesh2grid")

# SPEEDY T21: 64 x 32 Gaussian grid (its files hold exactly these Gauss-Legendre latitudes).
SPEEDY_LAT = gaussian_latitudes(32)
SPEEDY_LON = np.arange(64) * 360.0 / 64
NCEP_LAT = np.arange(15.0, 75.0 + 1e-9, 2.5)               # regional: 15-75 N, 200-330 E
NCEP_LON = np.arange(200.0, 330.0 + 1e-9, 2.5)


# ------------------------------------------------------------------ 1. transformer longitudes

def transformer(depth: int, n_lon: int, periodic: bool, n_lat: int = 8) -> WeatherTransformer:
    """Tiny windowed transformer (2x2 patches, 2x2-patch windows) with O(1) random weights."""
    torch.manual_seed(0)
    config = TransformerConfig(patch_size=2, embed_dim=16, depth=depth, num_heads=2,
                               mlp_ratio=2.0, window=2)
    model = WeatherTransformer(config, 2, 2, n_lat, n_lon, periodic_longitude=periodic)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


def edge_response(model: WeatherTransformer, perturbed_column: int, n_lon: int,
                  n_lat: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs before and after adding 1 to one input column."""
    x = torch.randn(1, 2, n_lat, n_lon, generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[..., perturbed_column] += 1.0
    lead = torch.tensor([6.0])
    with torch.no_grad():
        return model(x, lead), model(changed, lead)


@pytest.mark.parametrize("n_lon", [32, 31])          # 31: the last patch is padded
@pytest.mark.parametrize("depth", [1, 3])            # 3: unshifted, shifted, unshifted windows
def test_regional_transformer_does_not_wrap_in_longitude(depth: int, n_lon: int) -> None:
    model = transformer(depth, n_lon, periodic=False)
    before, after = edge_response(model, n_lon - 1, n_lon)        # east edge ...
    assert torch.equal(before[..., :4], after[..., :4])           # ... leaves the west alone
    assert not torch.equal(before[..., -1], after[..., -1])       # (and does act locally)
    before, after = edge_response(model, 0, n_lon)                # west edge ...
    assert torch.equal(before[..., -4:], after[..., -4:])         # ... leaves the east alone
    assert not torch.equal(before[..., 0], after[..., 0])


@pytest.mark.parametrize(("depth", "n_lon", "perturbed", "watched"),
                         [(3, 32, -1, slice(0, 4)),          # shifted windows wrap east -> west
                          (1, 31, 0, slice(-1, None))])     # circular patch padding west -> east
def test_global_transformer_keeps_the_wrap(depth: int, n_lon: int, perturbed: int,
                                           watched: slice) -> None:
    model = transformer(depth, n_lon, periodic=True)
    before, after = edge_response(model, perturbed % n_lon, n_lon)
    assert not torch.equal(before[..., watched], after[..., watched])


@pytest.mark.parametrize("grid", [(25, 53), (7, 9), (24, 48)])
@pytest.mark.parametrize("window", [2, 4])
def test_regional_transformer_shapes(grid: tuple[int, int], window: int) -> None:
    n_lat, n_lon = grid
    torch.manual_seed(0)
    config = TransformerConfig(patch_size=2, embed_dim=16, depth=2, num_heads=2, window=window)
    model = WeatherTransformer(config, 3, 2, n_lat, n_lon, periodic_longitude=False)
    y = model(torch.randn(2, 3, n_lat, n_lon), torch.tensor([6.0, 12.0]))
    assert y.shape == (2, 2, n_lat, n_lon) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------- 2. graph edge normalisation

def features(graph: GridMeshGraph, edge_set: str) -> np.ndarray:
    return getattr(graph, f"{edge_set}_edge_features")


def check_normalised(graph: GridMeshGraph) -> None:
    for edge_set in EDGE_SETS:
        values = features(graph, edge_set)
        assert values.dtype == np.float32 and np.isfinite(values).all(), edge_set
        assert values[:, 0].max() == 1.0, edge_set            # its own longest edge
        assert np.abs(values).max() <= 1.0, edge_set
        assert values[:, 0].min() >= 0.0, edge_set


@pytest.mark.parametrize("refinement", [3, 5])
def test_edge_features_normalised_per_edge_set_global(refinement: int) -> None:
    graph = build_graph(SPEEDY_LAT, SPEEDY_LON, refinement)
    assert not graph.is_regional
    check_normalised(graph)
    # the grid <-> mesh edges are short, yet their features now span the unit range
    assert np.median(graph.grid2mesh_edge_features[:, 0]) > 0.3


@pytest.mark.parametrize("refinement", [3, 5])
def test_edge_features_normalised_per_edge_set_regional(refinement: int) -> None:
    graph = build_graph(NCEP_LAT, NCEP_LON, refinement)
    assert graph.is_regional
    check_normalised(graph)


def test_legacy_icosahedron_edge_normalisation_is_kept_for_old_models() -> None:
    """``icosahedron_edge`` divides every set by the full multi-mesh's longest edge (the old
    features, which models trained before the fix need); the default is per edge set."""
    default = build_graph(NCEP_LAT, NCEP_LON, 3)
    legacy = build_graph(NCEP_LAT, NCEP_LON, 3, edge_normalization="icosahedron_edge")
    mesh = icosahedral_multimesh(3)
    icosahedron_edge = np.linalg.norm(mesh.vertices[mesh.senders]
                                      - mesh.vertices[mesh.receivers], axis=1).max()
    for edge_set in EDGE_SETS:
        chords = features(legacy, edge_set)[:, 0] * icosahedron_edge
        np.testing.assert_allclose(features(default, edge_set)[:, 0] * chords.max(), chords,
                                   rtol=1e-5)
    assert features(legacy, "grid2mesh")[:, 0].max() < 0.15      # the defect, on purpose


def old_cache_key(latitude: np.ndarray, longitude: np.ndarray, refinement: int) -> str:
    """The file name key the code before the fix used (mesh format 1)."""
    digest = hashlib.sha256()
    digest.update(f"mesh-format=1;refinement={refinement};radius=0.6;method=triangle;knn=3;"
                  f"nlat={latitude.size};nlon={longitude.size};".encode())
    digest.update(np.ascontiguousarray(latitude, dtype="<f8").tobytes())
    digest.update(b";")
    digest.update(np.ascontiguousarray(longitude, dtype="<f8").tobytes())
    return digest.hexdigest()


def test_cache_does_not_serve_graphs_with_old_features(tmp_path: Path) -> None:
    clear_memory_cache()
    graph = build_graph(NCEP_LAT, NCEP_LON, 2)
    arrays = graph.to_arrays()
    for edge_set in EDGE_SETS:                    # what the old code computed and cached
        arrays[f"{edge_set}_edge_features"] = arrays[f"{edge_set}_edge_features"] * 0.05
    np.savez(tmp_path / f"graph-{old_cache_key(NCEP_LAT, NCEP_LON, 2)}.npz", **arrays)
    served = cached_graph(NCEP_LAT, NCEP_LON, 2, cache_dir=tmp_path)
    check_normalised(served)
    clear_memory_cache()
    legacy = cached_graph(NCEP_LAT, NCEP_LON, 2, edge_normalization="icosahedron_edge",
                          cache_dir=tmp_path)
    assert legacy.grid2mesh_edge_features[:, 0].max() < 1.0      # its own file, not the other
    assert len(list(tmp_path.glob("graph-*.npz"))) == 3
    clear_memory_cache()


def test_graph_network_uses_the_configured_normalisation(tmp_path: Path) -> None:
    longest = {}
    for normalization in ("per_edge_set", "icosahedron_edge"):
        config = GraphConfig(mesh_refinement=2, latent_size=8, processor_layers=1,
                             edge_normalization=normalization)
        network = GraphNetwork(config, 3, 2, NCEP_LAT, NCEP_LON, cache_dir=tmp_path)
        longest[normalization] = float(network.grid2mesh_edge_features[:, 0].max())
    assert GraphConfig().edge_normalization == "per_edge_set"
    assert longest["per_edge_set"] == 1.0 and longest["icosahedron_edge"] < 0.5
    clear_memory_cache()


# ------------------------------------------------------------------------ 3. area weighting

def graphcast_latitude_weights(latitude: np.ndarray) -> np.ndarray:
    """GraphCast ``losses.normalized_latitude_weights`` (equispaced latitudes), mean 1."""
    delta = abs(latitude[1] - latitude[0])
    if np.isclose(np.abs(latitude), 90.0).any():
        weights = np.cos(np.radians(latitude)) * np.sin(np.radians(delta / 2))
        weights[np.isclose(np.abs(latitude), 90.0)] = np.sin(np.radians(delta / 4)) ** 2
    else:
        weights = np.cos(np.radians(latitude))
    return weights / weights.mean()


@pytest.mark.parametrize("step", [2.5, 1.0, 0.25])
def test_default_area_weights_give_pole_rows_their_polar_cap(step: float) -> None:
    latitude = np.arange(90.0, -90.0 - 1e-9, -step)                   # 90 .. -90, poles in
    weights = cell_area_weights(latitude, LossConfig().area_weighting)
    assert weights[0] > 0 and weights[-1] > 0
    # cap from 90 - step/2 to the pole: 2 pi (1 - cos(step/2)) of the sphere's 4 pi, mean 1
    cap = latitude.size * (1.0 - np.cos(np.radians(step / 2))) / 2.0
    np.testing.assert_allclose(weights[[0, -1]], cap, rtol=1e-9)
    np.testing.assert_allclose(weights, graphcast_latitude_weights(latitude), rtol=1e-9)
    assert weights.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(cell_area_weights(latitude), weights)    # function default too


@pytest.mark.parametrize("latitude", [np.arange(-88.75, 90.0, 2.5),     # no poles, global
                                      NCEP_LAT])                        # regional
def test_default_area_weights_are_cos_latitude_without_poles(latitude: np.ndarray) -> None:
    weights = cell_area_weights(latitude, LossConfig().area_weighting)
    cos = np.cos(np.radians(latitude))
    np.testing.assert_allclose(weights, cos / cos.mean(), rtol=1e-12)
    assert cell_area_weights(latitude, "cos") == pytest.approx(cos / cos.mean())  # kept


def test_shipped_model_configs_weight_the_poles() -> None:
    pole_grid = np.arange(-90.0, 90.0 + 1e-9, 2.5)
    for path in sorted((PROJECT / "configs").glob("model_*.yaml")):
        config = from_dict(ModelConfig, yaml.safe_load(path.read_text()))
        assert cell_area_weights(pole_grid, config.loss.area_weighting)[0] > 0, path.name


def test_shipped_checkpoint_keeps_the_edge_features_it_was_trained_on(tmp_path: Path) -> None:
    """Files written before the fix (format <= 2) are migrated to ``icosahedron_edge``."""
    path = PROJECT / "checkpoints" / "ncep_graph_2013" / "model.pt"
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    payload = read_payload(path)
    assert payload["migrated_from"] <= 2
    assert payload["model_config"]["graph"]["edge_normalization"] == "icosahedron_edge"
    network = model_from_payload(payload, path, cache_dir=tmp_path).network
    assert float(network.grid2mesh_edge_features[:, 0].max()) < 0.15
    clear_memory_cache()

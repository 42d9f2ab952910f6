"""Configuration of the forecaster models (saved inside every checkpoint)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weathermodel.errors import ConfigError


@dataclass
class GraphConfig:
    """Encoder-processor-decoder graph network on an icosahedral multi-mesh (GraphCast style).

    Attributes
    ----------
    mesh_refinement : refinement level r of the icosahedral mesh (10 * 4**r + 2 nodes); edges of
        every level 0..r are merged into the processor's multi-mesh.
    latent_size : width of node and edge latents.
    processor_layers : message-passing steps on the multi-mesh.
    mlp_hidden_layers : hidden layers of every MLP.
    grid_to_mesh_radius : grid points connect to mesh nodes within this fraction of the longest
        edge of the finest mesh (GraphCast uses 0.6).
    mesh_to_grid : ``triangle`` (the three nodes of the finest triangle containing the grid
        point) or ``knn`` (the ``knn`` nearest mesh nodes).
    knn : neighbours for ``mesh_to_grid: knn``.
    """

    mesh_refinement: int = 2
    latent_size: int = 64
    processor_layers: int = 4
    mlp_hidden_layers: int = 1
    grid_to_mesh_radius: float = 0.6
    mesh_to_grid: Literal["triangle", "knn"] = "triangle"
    knn: int = 3

    def validate(self) -> None:
        if not 0 <= self.mesh_refinement <= 7:
            raise ConfigError("'mesh_refinement' must be between 0 and 7", "give 0..7")
        if self.latent_size < 1 or self.processor_layers < 0 or self.mlp_hidden_layers < 0:
            raise ConfigError("graph sizes must be positive", "check latent_size and layers")


@dataclass
class TransformerConfig:
    """Vision transformer over latitude-longitude patches (Stormer / Pangu style).

    Attributes
    ----------
    patch_size : patch edge in grid points (latitude is padded to a multiple).
    embed_dim, depth, num_heads, mlp_ratio : transformer sizes.
    window : attention window in patches (square); 0 means global attention. Windows wrap
        around in longitude, and every other block shifts them by half a window.
    """

    patch_size: int = 2
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    window: int = 4

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError("'embed_dim' must be a multiple of 'num_heads'",
                              "change embed_dim or num_heads")


@dataclass
class LossConfig:
    """Weights of the training loss (mean squared error of normalised tendencies).

    Attributes
    ----------
    area_weighting : ``cos`` (cos latitude) or ``edges`` (sin of upper minus sin of lower cell
        edge, as WeatherBench 2); normalised to mean 1.
    level_weighting : ``pressure`` (proportional to the level's pressure, GraphCast) or
        ``uniform``; normalised to mean 1 over levels.
    variable_weights : per-variable multipliers (default 1).
    """

    area_weighting: Literal["cos", "edges"] = "cos"
    level_weighting: Literal["pressure", "uniform"] = "pressure"
    variable_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Which forecaster, and how it runs.

    Attributes
    ----------
    kind : ``graph`` or ``transformer``.
    history : input states per prediction (1 or 2).
    bf16 : run the network under bfloat16 autocast (CPU and CUDA).
    activation_checkpointing : recompute activations of each block in the backward pass.
    """

    kind: Literal["graph", "transformer"] = "graph"
    history: int = 1
    graph: GraphConfig = field(default_factory=GraphConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    bf16: bool = False
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.history < 1:
            raise ConfigError("'history' must be at least 1", "give 1 or 2")

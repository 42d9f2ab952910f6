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
    edge_normalization : ``per_edge_set`` (each edge set's features -- chord length and
        displacement in the receiver's frame -- divided by the set's longest edge, GraphCast) or
        ``icosahedron_edge`` (every set divided by the longest multi-mesh edge: grid <-> mesh
        features ~0.02 at refinement 5; only for models trained before that was fixed).
    processor : ``gnn`` (interaction networks that update node and edge latents, GraphCast) or
        ``transformer`` (graph transformer, as Anemoi's: multi-head attention of each mesh node
        over its multi-mesh senders, keys and values shifted by a projection of the edge
        features, softmax per receiver, then an MLP; the encoder and decoder attend the same
        way from grid to mesh and back, nodes are embedded linearly and the output is read by
        LayerNorm + linear).
    attention_heads : heads of the ``transformer`` processor (``latent_size`` must be a
        multiple).
    edge_chunks : the encoder's and decoder's edges (and the ``transformer`` processor's) are
        processed in this many chunks whose messages are summed into the receivers one chunk
        after the other (Anemoi's ``num_chunks``): with activation checkpointing only one
        chunk's edge activations are alive at once in the backward pass, and in inference only
        one chunk's in the forward. The result does not depend on it (up to float rounding).
    """

    mesh_refinement: int = 2
    latent_size: int = 64
    processor_layers: int = 4
    mlp_hidden_layers: int = 1
    grid_to_mesh_radius: float = 0.6
    mesh_to_grid: Literal["triangle", "knn"] = "triangle"
    knn: int = 3
    edge_normalization: Literal["per_edge_set", "icosahedron_edge"] = "per_edge_set"
    processor: Literal["gnn", "transformer"] = "gnn"
    attention_heads: int = 4
    edge_chunks: int = 1

    def validate(self) -> None:
        if not 0 <= self.mesh_refinement <= 7:
            raise ConfigError("'mesh_refinement' must be between 0 and 7", "give 0..7")
        if self.latent_size < 1 or self.processor_layers < 0 or self.mlp_hidden_layers < 0:
            raise ConfigError("graph sizes must be positive", "check latent_size and layers")
        if self.edge_chunks < 1:
            raise ConfigError(f"'edge_chunks' must be at least 1, got {self.edge_chunks}",
                              "give 1 (no chunking) or more")
        if self.processor == "transformer" and (
                self.attention_heads < 1 or self.latent_size % self.attention_heads):
            raise ConfigError(f"'latent_size' ({self.latent_size}) must be a multiple of "
                              f"'attention_heads' ({self.attention_heads})",
                              "change latent_size or attention_heads")


@dataclass
class TransformerConfig:
    """Vision transformer over latitude-longitude patches (Stormer / Pangu style).

    Attributes
    ----------
    patch_size : patch edge in grid points (latitude is padded to a multiple).
    embed_dim, depth, num_heads, mlp_ratio : transformer sizes.
    window : attention window in patches (square); 0 means global attention. Every other
        block shifts the windows by half a window. On a global grid windows wrap around in
        longitude; on a regional grid they do not (the model is told which by its grid).
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
    area_weighting : ``edges`` (cell area: sin of upper minus sin of lower cell edge, as
        WeatherBench 2; a pole row gets its polar half-cell, as GraphCast's
        ``normalized_latitude_weights``) or ``cos`` (cos latitude: no weight at all for pole
        rows); normalised to mean 1. Both agree on equispaced grids without poles.
    level_weighting : ``pressure`` (proportional to the level's pressure, GraphCast) or
        ``uniform``; normalised to mean 1 over levels.
    variable_weights : per-variable multipliers (default 1).
    """

    area_weighting: Literal["cos", "edges"] = "edges"
    level_weighting: Literal["pressure", "uniform"] = "pressure"
    variable_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class EnsembleConfig:
    """A stochastic (CRPS-trained) forecaster, in the style of AIFS-CRPS and FGN.

    Attributes
    ----------
    noise_channels : input channels of random noise drawn afresh at every step (0: a
        deterministic model). Each is a smooth field: standard normal values on a coarse grid
        ``noise_length_points`` grid points apart (periodic in longitude on global grids),
        interpolated bilinearly; the network's encoder embeds it into its latents like any
        input, so one draw gives one member.
    noise_length_points : grid points between the coarse noise values (the length scale).
    members : members per sample in training; the loss is their almost-fair CRPS.
    crps_alpha : the almost-fair CRPS's alpha (AIFS-CRPS uses 0.95; 1 is the fair CRPS).
    """

    noise_channels: int = 0
    noise_length_points: int = 4
    members: int = 4
    crps_alpha: float = 0.95

    @property
    def stochastic(self) -> bool:
        return self.noise_channels > 0

    def validate(self) -> None:
        if self.noise_channels < 0 or self.noise_length_points < 1:
            raise ConfigError("ensemble.noise_channels must be >= 0 and "
                              "ensemble.noise_length_points >= 1",
                              "give e.g. noise_channels: 8, noise_length_points: 4")
        if self.stochastic and self.members < 2:
            raise ConfigError("a stochastic model trains on the CRPS of at least 2 members per "
                              "sample", "set ensemble.members to 2 or more (AIFS-CRPS: 4)")
        if not 0.0 <= self.crps_alpha <= 1.0:
            raise ConfigError(f"ensemble.crps_alpha={self.crps_alpha} is outside [0, 1]",
                              "give 0.95 (AIFS-CRPS) or 1 (fair CRPS)")


@dataclass
class ModelConfig:
    """Which forecaster, and how it runs.

    Attributes
    ----------
    kind : ``graph`` or ``transformer``.
    history : input states per prediction (1 or 2).
    forcing : variables that are inputs only, read from the data and never predicted (Anemoi's
        ``forcing:``); None: every variable whose registry kind is ``forcing`` (e.g.
        sea_surface_temperature).
    diagnostic : variables that are predicted but never fed back as inputs (Anemoi's
        ``diagnostic:``); None: every variable whose registry kind is ``diagnostic`` (e.g.
        precipitation). Every other variable of the store is prognostic.
    imputer_mask_channel : besides replacing missing input values by the training mean
        (Anemoi's ``InputImputer`` with the ``mean`` statistic), give the network one more input
        channel per input channel with missing values: 1 where the value was missing.
    activation_checkpointing : recompute activations of each block in the backward pass.
    ensemble : noise inputs and CRPS training of a stochastic model (:class:`EnsembleConfig`);
        by default none (deterministic).

    Precision is not a model option: training's ``precision`` (``bf16-mixed``) is the one
    switch, applied by Lightning Fabric around the whole step.
    """

    kind: Literal["graph", "transformer"] = "graph"
    history: int = 1
    graph: GraphConfig = field(default_factory=GraphConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    forcing: list[str] | None = None
    diagnostic: list[str] | None = None
    imputer_mask_channel: bool = False
    activation_checkpointing: bool = False
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def validate(self) -> None:
        self.ensemble.validate()
        if self.history < 1:
            raise ConfigError("'history' must be at least 1", "give 1 or 2")
        overlap = sorted(set(self.forcing or []) & set(self.diagnostic or []))
        if overlap:
            raise ConfigError(f"variable(s) {overlap} are listed both as forcing and as "
                              "diagnostic", "give each variable one role")

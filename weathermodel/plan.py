"""``weathermodel plan``: peak memory per device of training and forecasting, before running.

The prediction counts the tensors the code really keeps, from the model configuration and the
grid (a store's, or a grid spec such as ``721x1440``):

* persistent state: float32 parameters (the master weights: bf16 autocast keeps them float32
  and casts per matrix product), AdamW's two float32 moments, the float32 moving average of the
  weights (EMA) when ``optim.ema_decay > 0``, the graph buffers (edge indices int64, node and
  edge features float32) and normalisation statistics;
* one training step: the data batch (float32 inputs, forcings, targets), the activations every
  layer keeps for the backward pass (counted tensor by tensor for the code of
  :mod:`weathermodel.models.graph` and :mod:`weathermodel.models.transformer`: see
  :func:`graph_stages` and :func:`transformer_stages`), the gradients (float32, one per
  parameter) and the largest transient tensors of a layer's forward or backward;
* a forecast step: the same without gradients, saved activations or optimizer, where only
  one layer's tensors are alive at a time.

The timeline walks the stages (embedding, encoder, processor layers, decoder, output and
loss) forward then backward for every rollout step, adding what each keeps; with activation
checkpointing a stage keeps only its inputs, and its own activations reappear when it is
recomputed in the backward pass. The peak of the timeline is the prediction.

Checked against measured peaks: ``tests/test_plan.py`` on the CPU (graph network, graph
transformer and vision transformer, two grid sizes, with and without checkpointing: within
5 %; the method is :func:`measure_cpu_training_step`) and ``benchmarks/bench_gpu.py`` on a GPU
(``torch.cuda.max_memory_allocated``). Transient tensors inside a layer's backward pass are
estimates (a few of the layer's largest tensors), calibrated on those measurements.
"""
from __future__ import annotations

import gc
import json
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from weathermodel.errors import ConfigError
from weathermodel.models.config import GraphConfig, ModelConfig

GIB = 2 ** 30
MIB = 2 ** 20

#: grids by name (latitudes x longitudes; WeatherBench 2 regular grids include both poles)
NAMED_GRIDS: dict[str, tuple[int, int]] = {
    "0.25deg": (721, 1440), "wb2-0.25": (721, 1440), "era5": (721, 1440),
    "1deg": (181, 360), "1.5deg": (121, 240), "wb2-1.5": (121, 240),
    "2deg": (91, 180), "5.625deg": (32, 64), "wb2-5.625": (32, 64),
}
#: channels of a WeatherBench 2 style grid spec: 6 variables x 13 levels + 5 surface fields
DEFAULT_GRID_CHANNELS = 83
#: fraction of a device's memory a plan may fill: the rest is the CUDA context, the
#: library workspaces and the caching allocator's fragmentation
USABLE_FRACTION = 0.9
#: fraction of what a stage keeps for backward that is alive at once when it runs without
#: gradients (forecasting)
INFERENCE_LIVE_FRACTION = 0.5


# ----------------------------------------------------------------------------------------------
# What is planned
# ----------------------------------------------------------------------------------------------

@dataclass
class GridSpec:
    """A latitude-longitude grid: sizes, and coordinates (degrees, ascending) when known."""

    n_latitude: int
    n_longitude: int
    is_global: bool = True
    latitude: list[float] | None = None
    longitude: list[float] | None = None

    @property
    def n_points(self) -> int:
        return self.n_latitude * self.n_longitude

    def coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Latitudes and longitudes in degrees: the given ones, else a regular grid (poles
        included, as WeatherBench 2's 721 x 1440 and 121 x 240; 32 x 64 without poles)."""
        if self.latitude is not None and self.longitude is not None:
            return np.asarray(self.latitude, "float64"), np.asarray(self.longitude, "float64")
        if self.n_latitude % 2 == 1:
            latitude = np.linspace(-90.0, 90.0, self.n_latitude)
        else:  # WB2's even grids: cell centres, no pole rows
            step = 180.0 / self.n_latitude
            latitude = -90.0 + step / 2 + step * np.arange(self.n_latitude)
        longitude = np.arange(self.n_longitude) * 360.0 / self.n_longitude
        return latitude, longitude

    def describe(self) -> str:
        kind = "global" if self.is_global else "regional"
        return f"{self.n_latitude} x {self.n_longitude} ({self.n_points:,} points, {kind})"


def parse_grid(text: str) -> GridSpec:
    """``721x1440`` (latitudes x longitudes) or a name of :data:`NAMED_GRIDS`.

    Raises
    ------
    ConfigError : neither form.
    """
    key = text.strip().lower()
    if key in NAMED_GRIDS:
        return GridSpec(*NAMED_GRIDS[key])
    match = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", key)
    if not match or int(match.group(1)) < 2 or int(match.group(2)) < 2:
        raise ConfigError(f"grid {text!r} is neither LATxLON nor a known name",
                          f"write e.g. --grid 721x1440, or one of {sorted(NAMED_GRIDS)}")
    return GridSpec(int(match.group(1)), int(match.group(2)))


def parse_memory(text: str) -> int:
    """Bytes of ``80GB`` / ``80GiB`` / ``80G`` / ``512MB`` (GB and GiB both read as 2**30,
    the way device memory is quoted: an "80 GB" H100 holds 79.6 GiB usable).

    Raises
    ------
    ConfigError : not a size.
    """
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ConfigError(f"memory size {text!r} is not understood",
                          "write e.g. --device-memory 80GB")
    scale = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[match.group(2)]
    return int(float(match.group(1)) * scale)


@dataclass
class Workload:
    """Everything the memory of a training or forecast step depends on.

    Channel counts follow :class:`weathermodel.models.forecaster.Forecaster`: ``prognostic``
    channels are inputs and outputs, ``forcing`` channels (read from the data) inputs only,
    ``diagnostic`` ones outputs only; ``masked`` input channels get an imputer mask channel;
    ``computed_forcings`` (solar radiation, time encodings) enter at every input time and the
    target time; ``statics`` once.
    """

    model: ModelConfig
    grid: GridSpec
    prognostic: int
    forcing: int = 0
    diagnostic: int = 0
    masked: int = 0
    computed_forcings: int = 5
    statics: int = 6
    batch_size: int = 1
    rollout: int = 1
    precision: str = "32"
    ema: bool = False
    gpus: int = 1

    @property
    def channels(self) -> int:
        """Channels of the store's state (every role)."""
        return self.prognostic + self.forcing + self.diagnostic

    @property
    def stochastic_members(self) -> int:
        """Members each sample is repeated into in training (a CRPS-trained stochastic model,
        ``model.ensemble``), else 1."""
        ensemble = getattr(self.model, "ensemble", None)
        return int(ensemble.members) if ensemble is not None and ensemble.stochastic else 1

    @property
    def network_batch(self) -> int:
        """Samples the network sees per training step (the batch times the members)."""
        return self.batch_size * self.stochastic_members

    @property
    def in_channels(self) -> int:
        history = self.model.history
        ensemble = getattr(self.model, "ensemble", None)
        noise = ensemble.noise_channels if ensemble is not None and ensemble.stochastic else 0
        return (history * (self.prognostic + self.forcing + self.masked)
                + (history + 1) * self.computed_forcings + self.statics + noise)

    @property
    def out_channels(self) -> int:
        return self.prognostic + self.diagnostic

    def to_dict(self) -> dict[str, Any]:
        from weathermodel.configuration import config_to_dict

        data = asdict(self)
        data["model"] = config_to_dict(self.model)
        return data


def workload_from_dict(data: dict[str, Any]) -> Workload:
    """Inverse of :meth:`Workload.to_dict`."""
    from weathermodel.configuration import from_dict

    values = dict(data)
    values["model"] = from_dict(ModelConfig, values["model"], "model")
    values["grid"] = GridSpec(**values["grid"])
    return Workload(**values)


# ----------------------------------------------------------------------------------------------
# The real model on synthetic data of the workload's shapes (measurements)
# ----------------------------------------------------------------------------------------------

def synthetic_metadata(workload: Workload) -> Any:
    """Model metadata of a store with the workload's grid and channel roles (unit statistics)."""
    from weathermodel import conventions
    from weathermodel.models.forecaster import ModelMetadata

    roles = ([conventions.PROGNOSTIC] * workload.prognostic + [conventions.FORCING] * workload.forcing
             + [conventions.DIAGNOSTIC] * workload.diagnostic)
    n = len(roles)
    masked = set(range(workload.masked))
    latitude, longitude = workload.grid.coordinates()
    n_statics = workload.statics
    return ModelMetadata(
        channels=[f"channel_{i}" for i in range(n)], channel_variables=["temperature"] * n,
        channel_levels=[float(i) for i in range(n)],
        forcings=list(conventions.FORCING_NAMES[:workload.computed_forcings])
        + [f"forcing_{i}" for i in range(max(0, workload.computed_forcings
                                             - len(conventions.FORCING_NAMES)))],
        statics=[f"static_{i}" for i in range(n_statics)],
        latitude=[float(v) for v in latitude], longitude=[float(v) for v in longitude],
        time_step_seconds=21600, mean=[0.0] * n, std=[1.0] * n, tendency_std=[1.0] * n,
        forcing_mean=[0.0] * workload.computed_forcings,
        forcing_std=[1.0] * workload.computed_forcings,
        static_mean=[0.0] * n_statics, static_std=[1.0] * n_statics, variables=[],
        grid={"is_global": workload.grid.is_global}, channel_roles=roles,
        channel_has_missing=[i in masked for i in range(n)])


def build_forecaster(workload: Workload, cache_dir: str | Path | None = None) -> Any:
    """The real :class:`Forecaster` of the workload (float32 weights, random initialisation)."""
    import torch

    from weathermodel.models.forecaster import Forecaster

    torch.manual_seed(0)
    statics = np.zeros((workload.statics, workload.grid.n_latitude, workload.grid.n_longitude),
                       "float32")
    return Forecaster(workload.model, synthetic_metadata(workload), statics, cache_dir=cache_dir)


def random_batch(workload: Workload, device: Any = "cpu") -> dict[str, Any]:
    """A training batch of the loader's shapes (float32): ``inputs`` (B, history, C, lat,
    lon), ``targets`` (B, rollout, C, lat, lon), ``forcings`` (B, history + rollout, F, lat,
    lon)."""
    import torch

    b, h, r = workload.batch_size, workload.model.history, workload.rollout
    shape = (workload.grid.n_latitude, workload.grid.n_longitude)
    generator = torch.Generator(device=device).manual_seed(1)

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, *shape, generator=generator, device=device)

    return {"inputs": normal(b, h, workload.channels),
            "targets": normal(b, r, workload.channels),
            "forcings": normal(b, h + r, workload.computed_forcings)}



# ----------------------------------------------------------------------------------------------
# Sizes of the graphs and parameters
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GraphSizes:
    """Node and edge counts of a grid-mesh graph (directed edges)."""

    grid_nodes: int
    mesh_nodes: int
    mesh_edges: int
    grid_to_mesh_edges: int
    mesh_to_grid_edges: int


def graph_sizes(grid: GridSpec, config: GraphConfig) -> GraphSizes:
    """Counts of :func:`weathermodel.models.mesh.build_graph`'s graph, without building it.

    A global grid: ``10 * 4**r + 2`` mesh nodes, ``2 * sum(30 * 4**l, l = 0..r)`` multi-mesh
    edges, grid-to-mesh edges counted by the radius rule (a KD-tree count, the rule of the
    builder), mesh-to-grid edges 3 per grid point (``triangle``) or ``knn``. A regional grid
    keeps only the mesh near the region: its graph is built (and cached) to count it.
    """
    from scipy.spatial import cKDTree

    from weathermodel.models import mesh as meshes

    latitude, longitude = grid.coordinates()
    if not meshes.is_global_longitude(longitude):
        graph = meshes.cached_graph(latitude, longitude, config.mesh_refinement,
                                    config.grid_to_mesh_radius, config.mesh_to_grid, config.knn,
                                    edge_normalization=config.edge_normalization)
        return GraphSizes(graph.n_grid, graph.n_mesh, len(graph.mesh_senders),
                          len(graph.grid2mesh_senders), len(graph.mesh2grid_senders))
    multimesh = meshes.icosahedral_multimesh(config.mesh_refinement)
    radius = config.grid_to_mesh_radius * meshes.finest_edge_chord(multimesh)
    points = meshes.grid_xyz(latitude, longitude)
    per_point = cKDTree(multimesh.vertices).query_ball_point(points, r=radius, workers=-1,
                                                             return_length=True)
    per_grid_point = 3 if config.mesh_to_grid == "triangle" else config.knn
    return GraphSizes(grid.n_points, len(multimesh.vertices), len(multimesh.senders),
                      int(np.sum(per_point)), per_grid_point * grid.n_points)


def parameter_count(workload: Workload) -> int:
    """Parameters of the workload's network, from the real modules built on the meta device
    (a graph network's parameter shapes do not depend on the grid, so a coarse stand-in grid
    serves)."""
    import torch

    model = workload.model
    with torch.device("meta"):
        if model.kind == "graph":
            from weathermodel.models.graph import GraphNetwork

            stand_in = replace(model.graph, mesh_refinement=0)
            network = GraphNetwork(stand_in, workload.in_channels, workload.out_channels,
                                   np.array([-45.0, 45.0]), np.arange(4) * 90.0,
                                   cache_dir=_stand_in_cache())
        else:
            from weathermodel.models.transformer import WeatherTransformer

            network = WeatherTransformer(model.transformer, workload.in_channels,
                                         workload.out_channels, workload.grid.n_latitude,
                                         workload.grid.n_longitude,
                                         periodic_longitude=workload.grid.is_global)
    return sum(p.numel() for p in network.parameters())


def _stand_in_cache() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / "weathermodel-plan-graphs"


# ----------------------------------------------------------------------------------------------
# The memory model
# ----------------------------------------------------------------------------------------------

@dataclass
class Precision:
    """Bytes per element of the tensors a step keeps.

    ``fp32``: layer-norm inputs and outputs, residual streams and sums into nodes (float32
    under bf16 autocast on CUDA, which runs layer norms in float32; CPU autocast runs them in
    bf16, so CPU bf16 runs keep less than planned); ``act``: outputs of matrix products and
    what follows them elementwise (bf16 under autocast); ``copy``: the extra bytes of a matrix
    product's saved float32 input (none in float32, whose storage is shared with whoever made
    it; a bf16 cast of it under autocast).
    """

    name: str
    fp32: int
    act: int
    copy: int

    @classmethod
    def of(cls, precision: str) -> "Precision":
        """The sizes of a training ``precision`` (``32``, ``bf16-mixed``, ``bf16-true``), with
        CUDA autocast's rules (layer norms in float32).

        Raises
        ------
        ConfigError : another precision.
        """
        if precision in ("32", "32-true", "fp32"):
            return cls("float32", 4, 4, 0)
        if precision in ("bf16-mixed", "16-mixed"):
            return cls("bf16 autocast (float32 weights)", 4, 2, 2)
        if precision in ("bf16-true", "bf16", "16-true"):
            return cls("bf16", 2, 2, 0)
        raise ConfigError(f"precision {precision!r} is not one the planner knows",
                          "use 32, bf16-mixed or bf16-true")


@dataclass
class Stage:
    """One piece of a step's forward pass, as the memory timeline sees it.

    Attributes
    ----------
    saved : bytes it keeps for the backward pass when it is not checkpointed.
    checkpointed : whether it runs under activation checkpointing (recomputed in backward).
    kept : bytes it keeps when checkpointed: its inputs that nothing else keeps.
    forward_transient : bytes alive only while its forward runs (on top of ``saved``).
    backward_transient : bytes of gradients and temporaries while its backward runs.
    repeat : identical stages in a row (processor layers, edge chunks).
    """

    name: str
    saved: float
    checkpointed: bool = False
    kept: float = 0.0
    forward_transient: float = 0.0
    backward_transient: float = 0.0
    repeat: int = 1
    inference: float | None = None

    @property
    def inference_bytes(self) -> float:
        """Bytes alive while it runs without gradients: ``inference`` when given, else
        :data:`INFERENCE_LIVE_FRACTION` of ``saved`` plus the forward transients."""
        if self.inference is not None:
            return self.inference
        return INFERENCE_LIVE_FRACTION * self.saved + self.forward_transient

    @property
    def keeps(self) -> float:
        return self.kept if self.checkpointed else self.saved


def _mlp_saved(rows: float, in_size: int, latent: int, out_size: int, hidden_layers: int,
               p: Precision, layer_norm: bool = True, input_shared: bool = False) -> float:
    """Bytes an ``mlp`` keeps for backward per call over ``rows`` rows: its first Linear's
    input, each SiLU's input and the next Linear's input (``act``), the LayerNorm's input
    (float32) and its mean and reciprocal std. The first input counts as a bf16 copy under
    autocast; in float32 it is the caller's tensor, counted here unless ``input_shared``
    (another stage already counts that storage)."""
    first = (p.copy if input_shared else (p.act if p.copy else p.fp32)) * in_size
    hidden = hidden_layers * 2 * latent * p.act
    norm = (out_size * p.fp32 + 2 * 4) if layer_norm else 0
    return rows * (first + hidden + norm)


def graph_stages(workload: Workload, sizes: GraphSizes, p: Precision) -> list[Stage]:
    """The stages of :class:`weathermodel.models.graph.GraphNetwork` for one step, with what
    each keeps for backward (counted from the code; rows are ``nodes x batch`` or
    ``edges x batch``, latents ``(rows, latent)``):

    * grid embedding: the MLP of [inputs, node features] (``_mlp_saved``);
    * encoder: the per-node projections keep their inputs; per edge chunk, the edge embedding
      MLP (per edge, batch-free) and the message MLP (per edge and sample: SiLU input, Linear
      input, LayerNorm input; sums into nodes keep only indices); node update: MLP of
      [receivers, sum] (2 latents in); the grid update MLP;
    * processor (``gnn``): per layer, the edge latents (input of the edge part of the first
      Linear; batch-free in the first layer), the mesh latents (input of the node
      projections), the message MLP and the node-update MLP as in the encoder; (``transformer``)
      per layer the LayerNorm input and output, gathered queries, keys and values per edge,
      the softmax weights per edge and head, the attention numerator, the output projection's
      input and the MLP's;
    * decoder: as the encoder, from the mesh to the grid;
    * output MLP, then the forecaster's head and the loss (two float32 fields of the output's
      size: the squared error's input and the weights).

    With activation checkpointing the grid embedding, the encoder's edge chunks and node update,
    every processor layer, the decoder's chunks and node update, the grid update and the output
    MLP keep only their inputs, and their activations are rebuilt one at a time in backward.
    """
    graph, model = workload.model.graph, workload.model
    ckpt = model.activation_checkpointing
    batch, latent, hidden = workload.network_batch, graph.latent_size, graph.mlp_hidden_layers
    grid, mesh = sizes.grid_nodes * batch, sizes.mesh_nodes * batch  # rows with the batch
    chunks = max(1, graph.edge_chunks)
    f, a = p.fp32, p.act
    in_size = workload.in_channels + 2
    stages = [Stage("grid embedding", _mlp_saved(grid, in_size, latent, latent, hidden, p),
                    ckpt, kept=grid * workload.in_channels * 4,
                    forward_transient=grid * (in_size * 4 * bool(p.copy) + latent * f),
                    backward_transient=2 * grid * latent * f),
              Stage("mesh embedding", _mlp_saved(sizes.mesh_nodes, 2, latent, latent, hidden, p),
                    forward_transient=sizes.mesh_nodes * latent * f)]

    def mapper(name: str, edges: int, senders: int, receivers: int, receiver_expanded: bool
               ) -> list[Stage]:
        """Encoder or decoder (``GraphNetwork._map``)."""
        rows = edges * batch / chunks
        # node projections: Linear inputs (senders' latents are kept anyway by the grid
        # update / previous stage in float32; a bf16 copy under autocast)
        projections = (senders * latent * p.copy
                       + (receivers // batch if receiver_expanded else receivers)
                       * latent * (p.copy or f))
        projected = (senders + receivers) * latent * a  # kept by the chunks' checkpoints
        if graph.processor == "transformer":  # raw edge features into the first Linear
            edge_embedding, edge_input = 0.0, edges / chunks * 4 * p.copy
        else:  # an embedding MLP per edge; its output is the first Linear's input
            edge_embedding = _mlp_saved(edges / chunks, 4, latent, latent, hidden, p)
            edge_input = edges / chunks * latent * (p.copy or f)
        message = rows * (2 * latent * a + latent * f + 8) + edge_input
        chunk_forward = 2 * rows * latent * a
        chunk_backward = 2 * rows * latent * f + receivers * latent * f
        update = _mlp_saved(receivers, 2 * latent, latent, latent, hidden, p,
                            input_shared=False)
        return [
            Stage(f"{name}: node projections", projections,
                  forward_transient=projected, backward_transient=projected),
            Stage(f"{name}: edge chunk", edge_embedding + message, ckpt,
                  kept=edges / chunks * 4 * 4 + (projected / chunks),
                  forward_transient=chunk_forward + receivers * latent * f,
                  backward_transient=chunk_backward, repeat=chunks),
            Stage(f"{name}: node update", update, ckpt, kept=receivers * latent * f,
                  forward_transient=2 * receivers * latent * f,
                  backward_transient=2 * receivers * latent * f)]

    def attention_mapper(name: str, edges: int, senders: int, receivers: int) -> Stage:
        """Encoder or decoder of the graph transformer (``GraphNetwork._attend``): with
        ``edge_chunks`` above 1, that many receiver ranges, each with its edges, mapped (and
        checkpointed) one after the other. Per range: per receiver row the LayerNorms' inputs
        (float32) and statistics, the Linear inputs, the scaled queries, the attention
        numerator, the output projection's input, the MLP's hidden layer; per sender row (all
        senders, in every range) the normalised senders and the keys and values, and once
        the senders' LayerNorm input; per edge and sample see
        :func:`_edge_attention_saved`."""
        heads = graph.attention_heads
        ranges = min(chunks, receivers // batch)
        rows, range_edges = receivers / ranges, edges / ranges
        per_receiver = latent * (2 * f + 2 * (p.copy or f) + 5 * a) + 4 * 8
        per_sender = latent * ((p.copy or f) + 2 * a) + 8
        saved = (rows * per_receiver + senders * per_sender + senders * latent * f / ranges
                 + range_edges * batch * _edge_attention_saved(latent, heads, chunks, a))
        chunk = range_edges * batch / chunks * latent * a
        kept = (rows + senders / ranges) * latent * f
        # the per-edge tensors come before the MLP keeps anything (forward) and after the
        # MLP's saved tensors are freed (backward, which also makes the key and value
        # gradients per sender)
        return Stage(f"{name} (graph attention)", saved, ckpt, kept=kept,
                     forward_transient=2 * chunk + rows * latent * f,
                     backward_transient=2 * chunk + 2 * senders * latent * f,
                     inference=3 * chunk + rows * latent * (4 * a + 2 * f)
                     + senders * latent * (2 * a + f), repeat=ranges)

    if graph.processor == "transformer":  # Anemoi's layout: Linear embeddings, no grid update
        stages = [Stage("grid embedding (Linear)", grid * in_size * (p.act if p.copy else f),
                        ckpt, kept=grid * workload.in_channels * 4,
                        forward_transient=grid * (in_size * 4 * bool(p.copy) + latent * a),
                        backward_transient=grid * latent * f),
                  Stage("mesh embedding (Linear)", sizes.mesh_nodes * 2 * 4,
                        forward_transient=sizes.mesh_nodes * latent * a)]
        stages.append(attention_mapper("encoder", sizes.grid_to_mesh_edges, grid, mesh))
        stages += processor_stages(workload, sizes, p)
        stages.append(attention_mapper("decoder", sizes.mesh_to_grid_edges, mesh, grid))
        stages.append(Stage("output (LayerNorm, Linear)",
                            grid * (latent * (f + (p.copy or f)) + 8), ckpt,
                            kept=grid * latent * f,
                            forward_transient=grid * (latent * f
                                                      + workload.out_channels * (a + f)),
                            backward_transient=grid * (2 * latent * f
                                                       + workload.out_channels * f)))
        return stages
    stages += mapper("encoder", sizes.grid_to_mesh_edges, grid, mesh, True)
    stages.append(Stage("grid update", _mlp_saved(grid, latent, latent, latent, hidden, p,
                                                  input_shared=True) + grid * latent * f,
                        ckpt, kept=grid * latent * f,
                        forward_transient=grid * latent * f,
                        backward_transient=2 * grid * latent * f))
    stages += processor_stages(workload, sizes, p)
    stages += mapper("decoder", sizes.mesh_to_grid_edges, mesh, grid, False)
    stages.append(Stage("output", _mlp_saved(grid, latent, latent, workload.out_channels,
                                             hidden, p, layer_norm=False)
                        + grid * latent * f, ckpt, kept=grid * latent * f,
                        forward_transient=grid * workload.out_channels * (a + f),
                        backward_transient=grid * (latent * f + workload.out_channels * f)))
    return stages


def _edge_attention_saved(latent: int, heads: int, chunks: int, act: int) -> float:
    """Bytes per edge and sample the graph attention's edge softmax-aggregation keeps for
    backward: the softmax weights per head; with one edge chunk also the gathered queries,
    keys and values (kept for speed); with several they are recomputed chunk by chunk."""
    return heads * act + (3 * latent * act if chunks == 1 else 0)


def processor_stages(workload: Workload, sizes: GraphSizes, p: Precision) -> list[Stage]:
    """The processor layers of a graph network (see :func:`graph_stages`)."""
    graph = workload.model.graph
    ckpt = workload.model.activation_checkpointing
    batch, latent, hidden = workload.network_batch, graph.latent_size, graph.mlp_hidden_layers
    mesh, edges = sizes.mesh_nodes * batch, sizes.mesh_edges * batch
    layers = graph.processor_layers
    f, a = p.fp32, p.act
    if layers == 0:
        return []
    if graph.processor == "transformer":
        # per node: both LayerNorms' inputs (float32) and statistics, the QKV Linear's input,
        # its whole output (keys and values are views of it), the scaled queries, the
        # attention numerator, the output projection's input, the MLP's input and hidden
        # layer; per edge see _edge_attention_saved
        heads = graph.attention_heads
        chunks = max(1, graph.edge_chunks)
        per_node = latent * (2 * f + 2 * (p.copy or f) + 9 * a) + 4 * 8 + 2 * heads * a
        saved = mesh * per_node + edges * _edge_attention_saved(latent, heads, chunks, a)
        chunk = edges * latent * a / chunks
        return [Stage("processor layer (graph transformer)", saved, ckpt,
                      kept=mesh * latent * f,
                      forward_transient=2 * chunk + mesh * latent * 2 * f,
                      # its backward holds two edge tensors of a chunk at once (message
                      # gradients with keys or key gradients) and the q, k, v gradients
                      backward_transient=2 * chunk + mesh * latent * (3 * a + 2 * f),
                      inference=3 * chunk + mesh * latent * (6 * a + 2 * f),
                      repeat=layers)]
    embedding = Stage("mesh edge embedding",
                      _mlp_saved(sizes.mesh_edges, 4, latent, latent, hidden, p),
                      forward_transient=sizes.mesh_edges * latent * f)

    def layer(edge_rows: float, update_edges: bool) -> Stage:
        saved = (edge_rows * latent * (p.copy or f)          # edge latents (Linear input)
                 + mesh * latent * (2 * p.copy or f)         # mesh latents (two projections)
                 + edges * (2 * latent * a + latent * f + 8)  # message MLP
                 + _mlp_saved(mesh, 2 * latent, latent, latent, hidden, p))  # node update
        kept = edge_rows * latent * f + mesh * latent * f
        # the message is built from two temporaries; the updated edges and the message
        # outlive it (the updated edges become the next layer's input)
        forward = 2 * mesh * latent * a + (2 * edges * latent * f if update_edges
                                           else 2 * edges * latent * a)
        backward = 2 * edges * latent * f + 2 * mesh * latent * f
        return Stage("processor layer (interaction network)", saved, ckpt, kept=kept,
                     forward_transient=forward, backward_transient=backward)

    stages = [embedding, layer(sizes.mesh_edges, layers > 1)]
    if layers > 2:
        middle = layer(edges, True)
        middle.repeat = layers - 2
        stages.append(middle)
    if layers > 1:
        stages.append(layer(edges, False))
    return stages



def transformer_stages(workload: Workload, p: Precision) -> list[Stage]:
    """The stages of :class:`weathermodel.models.transformer.WeatherTransformer` for one step.

    Per token (``batch x latitude patches x longitude patches`` rows of width ``embed_dim``),
    a block keeps: its input and LayerNorm outputs (float32), the QKV Linear's input, Q, K
    and V (the QKV output, which scaled-dot-product attention keeps) and the attention output
    with its log-sum-exp, the projection's input and output, the second LayerNorm's input and
    output, the MLP's input, its hidden layer before and after the GELU (``mlp_ratio`` wide),
    its output, and four LayerNorm statistics. Windowed attention works on the grid padded to
    whole windows and keeps the per-window additive mask (relative position bias, ``-inf``
    at padding) of every sample.
    """
    config, model = workload.model.transformer, workload.model
    ckpt = model.activation_checkpointing
    batch, dim, heads = workload.network_batch, config.embed_dim, config.num_heads
    patch = config.patch_size
    lat_patches = -(-workload.grid.n_latitude // patch)
    lon_patches = -(-workload.grid.n_longitude // patch)
    tokens = batch * lat_patches * lon_patches
    f, a = p.fp32, p.act
    hidden = int(dim * config.mlp_ratio)
    padded_pixels = batch * lat_patches * lon_patches * patch * patch
    stages = [Stage("patch embedding", padded_pixels * workload.in_channels * (p.copy or f),
                    forward_transient=tokens * dim * (a + f) + padded_pixels
                    * workload.in_channels * f,
                    backward_transient=tokens * dim * f)]
    window = config.window
    if window:
        shift = window // 2
        padded = batch * (-(-(lat_patches + shift) // window) * window) \
            * (-(-(lon_patches + (0 if workload.grid.is_global else shift)) // window) * window)
        windows = padded / batch / (window * window)  # the mask has no batch axis
        mask = windows * heads * (window * window) ** 2 * a
        attention_saved = padded * dim * (3 * a + a) + padded * heads * 4 + mask
        attention_transient = padded * dim * 3 * a * 2 + mask
    else:
        attention_saved = tokens * dim * (3 * a + a) + tokens * heads * 4
        attention_transient = tokens * dim * 3 * a
    block_saved = (tokens * dim * (4 * f + 2 * (p.copy or f) + 2 * a)  # norms, inputs, proj
                   + tokens * (2 * hidden * a + dim * a)  # MLP hidden, GELU, output
                   + tokens * 4 * 4 + attention_saved)    # LayerNorm statistics, attention
    stages.append(Stage("transformer block", block_saved, ckpt, kept=tokens * dim * f,
                        forward_transient=attention_transient + tokens * dim * f,
                        backward_transient=tokens * (hidden * f + dim * 2 * f),
                        repeat=config.depth))
    out = tokens * patch * patch * workload.out_channels
    stages.append(Stage("final layer", tokens * dim * (2 * f + (p.copy or f)) + tokens * 8,
                        forward_transient=out * (a + f),
                        backward_transient=out * f + tokens * dim * 2 * f))
    return stages


def head_and_loss_stage(workload: Workload, step: int) -> Stage:
    """The forecaster's head (tendency scaling, residual, channel copies) and the loss, for
    rollout step ``step`` (0-based): float32 fields of the output's size. From the second
    step on, the fed-back prediction's normalisation keeps its input too."""
    field_bytes = workload.network_batch * workload.grid.n_points * 4
    loss = 2 * workload.out_channels * field_bytes  # squared error's input and the weights
    fed_back = (workload.model.history * (workload.prognostic + workload.forcing) * field_bytes
                if step > 0 else 0)
    return Stage("head and loss", loss + fed_back,
                 forward_transient=4 * workload.channels * field_bytes,
                 backward_transient=4 * workload.channels * field_bytes)


def batch_bytes(workload: Workload) -> float:
    """One data batch as the loader hands it over (float32): inputs, targets, forcings."""
    b, h, r = workload.batch_size, workload.model.history, workload.rollout
    return 4.0 * b * workload.grid.n_points * ((h + r) * workload.channels
                                               + (h + r) * workload.computed_forcings)


def network_stages(workload: Workload, p: Precision, sizes: GraphSizes | None) -> list[Stage]:
    if workload.model.kind == "graph":
        assert sizes is not None
        return graph_stages(workload, sizes, p)
    return transformer_stages(workload, p)


def timeline_peak(stages_per_step: list[list[Stage]], grads: float) -> tuple[float, str]:
    """Peak bytes (above the persistent state and the batch) of forward then backward over
    the rollout steps, and the stage where it happens.

    Forward: each stage's ``keeps`` accumulate; while a stage runs, its own saved bytes (or,
    checkpointed, nothing extra) and its forward transients come on top. Backward walks the
    stages in reverse: a checkpointed stage first rebuilds its saved activations; its
    backward transients and the parameter gradients made so far (``grads`` spread evenly
    over one step's stages: the last layers' gradients come first) come on top of what is
    still kept.
    """
    flat = [stage for step in stages_per_step for stage in step]
    per_step = sum(stage.repeat for stage in stages_per_step[-1]) if stages_per_step else 1
    kept, peak, where, done = 0.0, 0.0, "", 0
    for stage in flat:
        for _ in range(stage.repeat):
            own = 0.0 if stage.checkpointed else stage.saved
            if kept + own + stage.forward_transient > peak:
                peak, where = kept + own + stage.forward_transient, f"forward: {stage.name}"
            kept += stage.keeps
    for stage in reversed(flat):
        for _ in range(stage.repeat):
            # a checkpointed stage first runs its forward again (saved + forward transients)
            transient = (max(stage.forward_transient, stage.backward_transient)
                         + stage.saved if stage.checkpointed else stage.backward_transient)
            live = kept + transient + grads * min(1.0, (done + 1) / per_step)
            done += 1
            if live > peak:
                peak, where = live, f"backward: {stage.name}"
            kept -= stage.keeps
    return peak, where


@dataclass
class MemoryPlan:
    """A predicted peak, its parts and the assumptions behind it (bytes)."""

    what: str
    persistent: dict[str, float]
    step: dict[str, float]
    peak_bytes: float
    peak_at: str
    assumptions: list[str] = field(default_factory=list)

    @property
    def persistent_bytes(self) -> float:
        return sum(self.persistent.values())

    @property
    def step_bytes(self) -> float:
        """The peak minus the persistent state: what a step adds (batch, activations,
        gradients, transients)."""
        return self.peak_bytes - self.persistent_bytes


def _graph_buffer_bytes(sizes: GraphSizes | None) -> float:
    if sizes is None:
        return 0.0
    edges = sizes.mesh_edges + sizes.grid_to_mesh_edges + sizes.mesh_to_grid_edges
    return edges * (2 * 8 + 4 * 4) + (sizes.grid_nodes + sizes.mesh_nodes) * 2 * 4


def plan_training(workload: Workload, sizes: GraphSizes | None = None,
                  parameters: int | None = None) -> MemoryPlan:
    """Predicted peak memory per device of one training step (steady state: the optimizer
    moments exist), for the per-device batch ``workload.batch_size``."""
    p = Precision.of(workload.precision)
    if workload.model.kind == "graph" and sizes is None:
        sizes = graph_sizes(workload.grid, workload.model.graph)
    n_params = parameter_count(workload) if parameters is None else parameters
    param_bytes = 4.0 * n_params
    persistent = {"parameters (float32 master weights)": param_bytes,
                  "AdamW moments (2 x float32)": 2 * param_bytes}
    if workload.ema:
        persistent["EMA of the weights (float32)"] = param_bytes
    if sizes is not None:
        persistent["graph (indices int64, features float32)"] = _graph_buffer_bytes(sizes)
    persistent["statics and statistics"] = 4.0 * workload.statics * workload.grid.n_points
    if workload.gpus > 1:
        persistent["DDP gradient buckets (float32)"] = param_bytes
    steps = [network_stages(workload, p, sizes) + [head_and_loss_stage(workload, s)]
             for s in range(workload.rollout)]
    grads = param_bytes
    activations, where = timeline_peak(steps, grads)
    autocast_cache = 2.0 * n_params if p.copy else 0.0
    data = batch_bytes(workload)
    # the optimizer step: gradients, and AdamW's temporaries (one float32 copy per parameter)
    optimizer_step = grads + param_bytes
    step_peak = max(activations + autocast_cache, optimizer_step)
    step = {"data batch": data,
            "activations, gradients and transients": activations,
            "bf16 copies of the weights (autocast cache)": autocast_cache}
    total = sum(persistent.values()) + data + step_peak
    saved_per_step = sum(stage.keeps * stage.repeat for stage in steps[-1])
    kept_what = ("inputs of checkpointed layers only"
                 if workload.model.activation_checkpointing else "every layer")
    assumptions = [
        f"precision {p.name}: float32 tensors {p.fp32} B/element, matrix-product outputs "
        f"{p.act} B, saved matrix-product inputs {'a bf16 copy' if p.copy else 'shared'}",
        f"{n_params:,} parameters: weights {param_bytes / GIB:.2f} GiB, gradients the same, "
        f"AdamW 2 float32 moments, {'an EMA copy' if workload.ema else 'no EMA'}",
        f"kept for backward per rollout step: {saved_per_step / GIB:.2f} GiB ({kept_what}), "
        f"x {workload.rollout} rollout step(s); the peak is in {where}",
        f"data batch: {workload.batch_size} sample(s) of {workload.model.history} input + "
        f"{workload.rollout} target states, {workload.channels} channels, "
        f"{workload.computed_forcings} computed forcings, float32",
    ]
    return MemoryPlan("training step", persistent, step, total, where, assumptions)


def plan_forecast(workload: Workload, sizes: GraphSizes | None = None,
                  parameters: int | None = None) -> MemoryPlan:
    """Predicted peak memory of a forecast (inference): weights, graph, the current state and
    the largest layer's forward transients (nothing is kept for backward)."""
    p = Precision.of(workload.precision)
    if workload.model.kind == "graph" and sizes is None:
        sizes = graph_sizes(workload.grid, workload.model.graph)
    n_params = parameter_count(workload) if parameters is None else parameters
    persistent = {"parameters (float32)": 4.0 * n_params}
    if sizes is not None:
        persistent["graph (indices int64, features float32)"] = _graph_buffer_bytes(sizes)
    persistent["statics and statistics"] = 4.0 * workload.statics * workload.grid.n_points
    stages = network_stages(workload, p, sizes)
    # without gradients nothing is saved: of the tensors a stage would keep for backward,
    # about half are alive at once while it runs (an MLP's input and hidden layer, then its
    # hidden layer and output), and one latent of every node set stays between stages
    largest = max(stage.inference_bytes for stage in stages)
    field_bytes = workload.batch_size * workload.grid.n_points * 4
    state = field_bytes * (workload.model.history + 1) * workload.channels \
        + field_bytes * (workload.model.history + 1) * workload.computed_forcings
    if workload.model.kind == "graph":
        latent = workload.model.graph.latent_size
        between = (sizes.grid_nodes + sizes.mesh_nodes) * workload.batch_size * latent * p.fp32
    else:
        between = 0.0
    step = {"states and forcings": state, "largest layer (forward only)": largest,
            "latents between layers": between}
    total = sum(persistent.values()) + sum(step.values())
    return MemoryPlan("forecast step", persistent, step, total, "forward",
                      [f"batch of {workload.batch_size} start date(s), no gradients"])



# ----------------------------------------------------------------------------------------------
# From a training configuration and a store (or a grid spec)
# ----------------------------------------------------------------------------------------------

def workload_from_store(model: ModelConfig, store: str | Path, **sizes: Any) -> Workload:
    """The workload of ``model`` on a training store: its grid (coordinates), channels and
    their roles (the config's ``forcing`` / ``diagnostic`` lists or the registry defaults),
    channels with missing values (imputer mask channels), forcings and statics."""
    from weathermodel import conventions
    from weathermodel.data.store import open_store
    from weathermodel.models.forecaster import resolve_roles

    ds = open_store(store, require_complete=False)
    variables = [str(v) for v in ds["channel_variable"].values]
    roles = resolve_roles(variables, model)
    has_missing = np.asarray(ds["missing_fraction"].values) > 0 \
        if "missing_fraction" in ds else np.zeros(len(variables), bool)
    masked = sum(1 for role, missing in zip(roles, has_missing)
                 if missing and role != conventions.DIAGNOSTIC) if model.imputer_mask_channel else 0
    latitude, longitude = ds["latitude"].values, ds["longitude"].values
    from weathermodel.models.mesh import is_global_longitude

    grid = GridSpec(len(latitude), len(longitude), bool(is_global_longitude(longitude)),
                    [float(v) for v in latitude], [float(v) for v in longitude])
    return Workload(model=model, grid=grid, prognostic=roles.count(conventions.PROGNOSTIC),
                    forcing=roles.count(conventions.FORCING), diagnostic=roles.count(conventions.DIAGNOSTIC),
                    masked=masked, computed_forcings=int(ds.sizes.get("forcing", 0)),
                    statics=int(ds.sizes.get("static", 0)), **sizes)


def workload_from_config(config: Any, grid: GridSpec | None = None,
                         channels: int = DEFAULT_GRID_CHANNELS, gpus: int = 1) -> Workload:
    """The workload of a :class:`TrainConfig`: its store's grid and channels, or, when
    ``grid`` is given (or the store does not exist), that grid with ``channels`` prognostic
    channels, the 5 computed forcings and 6 statics a prepared store has.

    Raises
    ------
    ConfigError : no store at ``data.store`` and no ``grid``.
    """
    from weathermodel.data.store import read_metadata

    rollout = max(stage.rollout for stage in config.rollout_schedule)
    sizes = dict(batch_size=config.data.batch_size, rollout=rollout,
                 precision=config.precision, ema=config.optim.ema_decay > 0, gpus=gpus)
    if grid is None:
        if read_metadata(config.data.store) is None:
            raise ConfigError(f"the training store {config.data.store} does not exist, so its "
                              "grid and channels are unknown",
                              "prepare it first, or plan for a grid: --grid 721x1440 "
                              "(or 0.25deg, 1deg, 1.5deg; --channels N)")
        return workload_from_store(config.model, config.data.store, **sizes)
    if channels < 1:
        raise ConfigError(f"--channels must be at least 1, got {channels}", "give e.g. 83")
    return Workload(model=config.model, grid=grid, prognostic=channels, **sizes)


# ----------------------------------------------------------------------------------------------
# Recommendations and the report
# ----------------------------------------------------------------------------------------------


@dataclass
class Option:
    """A way to run the training step, and its predicted peak."""

    batch_size: int
    checkpointing: bool
    edge_chunks: int
    plan: MemoryPlan

    def describe(self) -> str:
        chunks = f", edge_chunks {self.edge_chunks}" if self.edge_chunks > 1 else ""
        return (f"batch {self.batch_size}, checkpointing "
                f"{'on' if self.checkpointing else 'off'}{chunks}: "
                f"{self.plan.peak_bytes / GIB:.1f} GiB")


def with_options(workload: Workload, batch_size: int, checkpointing: bool,
                 edge_chunks: int) -> Workload:
    model = replace(workload.model, activation_checkpointing=checkpointing,
                    graph=replace(workload.model.graph, edge_chunks=edge_chunks))
    return replace(workload, model=model, batch_size=batch_size)


def recommend(workload: Workload, device_bytes: float, sizes: GraphSizes | None,
              parameters: int) -> tuple[Option | None, list[Option]]:
    """The fastest way to fit: the config's own batch and settings if they fit; else the
    same batch with checkpointing, then more edge chunks (graph); else the largest batch
    that fits with checkpointing and the most chunks. Returns (choice or None, tried)."""
    budget = USABLE_FRACTION * device_bytes
    chunk_choices = [1, 2, 4, 8, 16, 32] if workload.model.kind == "graph" else [1]
    current = workload.model.graph.edge_chunks
    tried: list[Option] = []

    def option(batch: int, ckpt: bool, chunks: int) -> Option:
        candidate = with_options(workload, batch, ckpt, chunks)
        found = Option(batch, ckpt, chunks, plan_training(candidate, sizes, parameters))
        tried.append(found)
        return found

    order = [(workload.model.activation_checkpointing, current)]
    order += [(True, chunks) for chunks in chunk_choices if chunks >= current]
    for ckpt, chunks in order:
        found = option(workload.batch_size, ckpt, chunks)
        if found.plan.peak_bytes <= budget:
            return found, tried
    ckpt, chunks = True, chunk_choices[-1]
    for batch in range(workload.batch_size - 1, 0, -1):
        found = option(batch, ckpt, chunks)
        if found.plan.peak_bytes <= budget:
            return found, tried
    return None, tried


def largest_batch(workload: Workload, device_bytes: float, sizes: GraphSizes | None,
                  parameters: int, forecast: bool = False, limit: int = 4096) -> int:
    """The largest per-device batch whose plan fits ``USABLE_FRACTION`` of the device
    (0 if not even one sample does), by bisection (the peak grows with the batch)."""
    budget = USABLE_FRACTION * device_bytes
    planner = plan_forecast if forecast else plan_training

    def fits(batch: int) -> bool:
        return planner(replace(workload, batch_size=batch), sizes, parameters).peak_bytes \
            <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _gib(value: float) -> str:
    """A size in GiB, or MiB below 1 GiB."""
    return f"{value / GIB:9.2f} GiB" if value >= GIB else f"{value / MIB:9.1f} MiB"


def describe_model(workload: Workload, sizes: GraphSizes | None, parameters: int) -> str:
    model = workload.model
    if model.kind == "graph":
        graph = model.graph
        assert sizes is not None
        body = (f"graph ({graph.processor} processor): mesh refinement {graph.mesh_refinement} "
                f"({sizes.mesh_nodes:,} nodes, {sizes.mesh_edges:,} mesh edges), "
                f"{sizes.grid_to_mesh_edges:,} grid->mesh and {sizes.mesh_to_grid_edges:,} "
                f"mesh->grid edges; latent {graph.latent_size}, {graph.processor_layers} "
                f"layers, edge_chunks {graph.edge_chunks}")
    else:
        t = model.transformer
        body = (f"transformer: patch {t.patch_size}, embed_dim {t.embed_dim}, depth {t.depth}, "
                f"{t.num_heads} heads, window {t.window or 'global'}")
    return (f"{body}; {parameters:,} parameters; {workload.channels} channels "
            f"({workload.prognostic} prognostic, {workload.forcing} forcing, "
            f"{workload.diagnostic} diagnostic): network in {workload.in_channels}, "
            f"out {workload.out_channels}")


def render_plan(plan: MemoryPlan, device_bytes: float) -> list[str]:
    lines = [f"{plan.what}:"]
    for name, value in {**plan.persistent, **plan.step}.items():
        if value > 0:
            lines.append(f"  {name:48s}{_gib(value)}")
    budget = USABLE_FRACTION * device_bytes
    verdict = "fits" if plan.peak_bytes <= budget else "does NOT fit"
    lines.append(f"  {'peak per device':48s}{_gib(plan.peak_bytes)}   {verdict} "
                 f"({USABLE_FRACTION:.0%} of {device_bytes / GIB:.1f} GiB usable)")
    return lines


def plan_report(workload: Workload, device_bytes: float, source: str,
                rollouts: list[int] | None = None) -> tuple[str, dict]:
    """The text ``weathermodel plan`` prints, and the numbers as a dict. ``rollouts``: the
    rollout lengths of the training schedule (``workload.rollout`` is the longest)."""
    sizes = (graph_sizes(workload.grid, workload.model.graph)
             if workload.model.kind == "graph" else None)
    parameters = parameter_count(workload)
    training = plan_training(workload, sizes, parameters)
    forecast = plan_forecast(replace(workload, batch_size=1), sizes, parameters)
    choice, _ = recommend(workload, device_bytes, sizes, parameters)
    lines = [f"# weathermodel plan: {source}",
             f"grid {workload.grid.describe()}",
             f"model {describe_model(workload, sizes, parameters)}",
             f"training: batch {workload.batch_size} per device x {workload.gpus} device(s), "
             f"rollout {workload.rollout}, precision {workload.precision}, activation "
             f"checkpointing {'on' if workload.model.activation_checkpointing else 'off'}",
             ""]
    lines += render_plan(training, device_bytes)
    lengths = sorted(set(rollouts or []))
    if len(lengths) > 1:
        def peak(length: int) -> float:
            return plan_training(replace(workload, rollout=length), sizes,
                                 parameters).peak_bytes

        peaks = ", ".join(f"{length} step(s) {peak(length) / GIB:.1f} GiB"
                          for length in lengths)
        lines.append(f"  by rollout stage of the schedule: {peaks}")
    lines += ["", "assumptions:"] + [f"  - {text}" for text in training.assumptions + [
        "kept for backward per layer: see weathermodel.plan.graph_stages / "
        "transformer_stages (Linear inputs, SiLU/GELU inputs, LayerNorm inputs and "
        "statistics, attention Q/K/V/output; sums into nodes keep only their indices)",
        f"a plan fits when its peak is at most {USABLE_FRACTION:.0%} of the device memory "
        "(CUDA context, library workspaces, allocator fragmentation)",
        "gradients in float32 (one per parameter); the optimizer step adds one float32 "
        "temporary per parameter"] + ([
            f"{workload.gpus} data-parallel devices: each holds the whole model and "
            f"its own batch; DDP adds gradient buckets (one more gradient copy)"]
            if workload.gpus > 1 else [])]
    lines += [""] + render_plan(forecast, device_bytes)
    best_forecast = largest_batch(workload, device_bytes, sizes, parameters, forecast=True)
    lines.append(f"  forecast: up to {best_forecast} start date(s) per batch fit")
    lines += ["", "other settings (training peak per device):"]
    chunk_choices = (1, 4, 16) if workload.model.kind == "graph" else (1,)
    for ckpt in (False, True):
        for chunks in chunk_choices if ckpt else (workload.model.graph.edge_chunks,):
            other = plan_training(with_options(workload, workload.batch_size, ckpt, chunks),
                                  sizes, parameters)
            text = Option(workload.batch_size, ckpt, chunks, other).describe()
            lines.append(f"  {text}"
                         + ("" if other.peak_bytes <= USABLE_FRACTION * device_bytes
                            else "  (does not fit)"))
    lines += ["", "recommendation:"]
    if choice is None:
        lines.append("  nothing fits, even batch 1 with checkpointing and 32 edge chunks: "
                     "use a coarser mesh, a smaller latent or a device with more memory")
    else:
        changed = with_options(workload, choice.batch_size, choice.checkpointing,
                               choice.edge_chunks)
        most = largest_batch(changed, device_bytes, sizes, parameters)
        settings = [f"data.batch_size={choice.batch_size}",
                    f"model.activation_checkpointing={str(choice.checkpointing).lower()}"]
        if workload.model.kind == "graph":
            settings.append(f"model.graph.edge_chunks={choice.edge_chunks}")
        lines.append(f"  {' '.join(settings)}  ->  peak {choice.plan.peak_bytes / GIB:.1f} GiB "
                     f"per device; with these settings up to batch {most} per device fits")
        effective = choice.batch_size * workload.gpus
        lines.append(f"  global batch {effective} ({choice.batch_size} x {workload.gpus} "
                     f"device(s)); raise optim.accumulate for a larger effective batch")
    numbers = {"training_peak_bytes": training.peak_bytes,
               "training_step_bytes": training.step_bytes,
               "forecast_peak_bytes": forecast.peak_bytes,
               "parameters": parameters,
               "fits": training.peak_bytes <= USABLE_FRACTION * device_bytes,
               "recommended": None if choice is None else {
                   "batch_size": choice.batch_size, "checkpointing": choice.checkpointing,
                   "edge_chunks": choice.edge_chunks, "peak_bytes": choice.plan.peak_bytes},
               "graph": None if sizes is None else asdict(sizes)}
    return "\n".join(lines), numbers



# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def add_plan_arguments(parser: Any) -> None:
    """Arguments of ``weathermodel plan`` (the parser comes from :mod:`weathermodel.cli`)."""
    parser.add_argument("config", help="training configuration (YAML, e.g. configs/train_*.yaml)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="overrides of the configuration, right after CONFIG, e.g. "
                             "data.batch_size=2 model.activation_checkpointing=true")
    parser.add_argument("--device-memory", default="80GB",
                        help="memory of one device, e.g. 80GB, 141GB, 40GB (default: "
                             "%(default)s)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="data-parallel devices; data.batch_size is per device")
    parser.add_argument("--store", help="training store whose grid and channels to use "
                                        "(default: the config's data.store)")
    parser.add_argument("--grid", help="plan for a grid instead of a store: LATxLON (e.g. "
                                       f"721x1440) or one of {', '.join(sorted(NAMED_GRIDS))}")
    parser.add_argument("--channels", type=int, default=DEFAULT_GRID_CHANNELS,
                        help="prognostic channels with --grid (default: %(default)s = 6 "
                             "variables x 13 levels + 5 surface fields)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")


def run_plan_command(args: Any) -> int:
    """``weathermodel plan``: print the plan of a training configuration."""
    from weathermodel.configuration import load_config
    from weathermodel.training.config import TrainConfig

    overrides = list(args.overrides)
    if args.store:
        overrides.append(f"data.store={args.store}")
    config = load_config(TrainConfig, args.config, overrides)
    if args.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {args.gpus}", "give e.g. --gpus 8")
    grid = parse_grid(args.grid) if args.grid else None
    workload = workload_from_config(config, grid, args.channels, args.gpus)
    source = args.config + (f" on grid {args.grid}" if args.grid else
                            f" on store {config.data.store}")
    text, numbers = plan_report(workload, parse_memory(args.device_memory), source,
                                [stage.rollout for stage in config.rollout_schedule])
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=1))
    print(text)
    return 0


class TrainingStep:
    """One optimizer step as :class:`weathermodel.training.loop.Trainer` takes it: rollout under
    autocast (``bf16-mixed``), weighted MSE, backward, AdamW, gradients set to None, EMA.

    Parameters
    ----------
    workload : model, sizes, precision and whether an EMA is kept.
    device : where the model and optimizer live.
    """

    def __init__(self, workload: Workload, device: Any = "cpu") -> None:
        import torch

        from weathermodel.models.loss import WeightedMSELoss
        from weathermodel.training.ema import ExponentialMovingAverage

        self.workload = workload
        self.device = torch.device(device)
        self.model = build_forecaster(workload).to(self.device).train()
        self.loss = WeightedMSELoss.for_model(self.model).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ema = ExponentialMovingAverage(self.model, 0.999) if workload.ema else None

    def autocast(self) -> Any:
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.workload.precision.startswith("bf16"))

    def __call__(self, batch: dict[str, Any]) -> Any:
        """Forward, backward and optimizer step on ``batch``; returns the (detached) loss."""
        rollout, history = self.workload.rollout, self.workload.model.history
        with self.autocast():
            prediction = self.model.rollout(batch["inputs"],
                                            batch["forcings"][:, :history + rollout], rollout,
                                            batch["targets"])
        loss = self.loss(prediction, batch["targets"][:, :rollout])
        loss.backward()
        del prediction
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return loss.detach()

    def forecast_step(self, batch: dict[str, Any]) -> Any:
        """One step of a forecast (no gradients), as inference runs it."""
        import torch

        history = self.workload.model.history
        with torch.no_grad(), self.autocast():
            return self.model(batch["inputs"], batch["forcings"][:, :history + 1])


def _rss_bytes(field_name: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field_name}")


def measure_cpu_training_step(workload: Workload, forecast: bool = False) -> dict[str, float]:
    """Peak memory of one steady-state training step on the CPU, in this process.

    How it is measured, and why so: the CPU allocator keeps no statistics, so the step's peak
    is read from the kernel: the peak resident set (``VmHWM``), reset just before the step by
    writing ``5`` to ``/proc/self/clear_refs``. Run it in a fresh process whose glibc returns
    freed memory at once (``MALLOC_MMAP_THRESHOLD_=65536``: every tensor of 64 kB or more is
    its own mapping, unmapped when freed), so that resident bytes follow live tensor bytes to
    within a page, as ``torch.cuda.max_memory_allocated`` follows them on a GPU. A first step
    on one sample (not measured) creates the optimizer moments and initialises the libraries;
    the measured step then starts from the persistent state alone (weights, moments, EMA,
    graph), which is the baseline (``VmRSS``), and its increase is the batch, the saved
    activations, the gradients and the transients: what :func:`plan_training` calls the
    step's working memory (:attr:`MemoryPlan.step_bytes`). ``ru_maxrss`` cannot be reset
    (a baseline after construction would hide any peak below construction's own), and the
    profiler's memory events miss memory that libraries allocate outside torch's allocator
    (oneDNN workspaces), hence this choice.

    Returns
    -------
    dict with ``baseline_bytes`` (persistent), ``peak_bytes`` and ``step_bytes`` (peak minus
    baseline), ``seconds`` (the measured step's wall time).
    """
    import time

    step = TrainingStep(workload)
    run = step.forecast_step if forecast else step
    # warm-up on one sample (half the cost): optimizer moments, library initialisation
    run(random_batch(replace(workload, batch_size=1)))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _rss_bytes("VmRSS")
    started = time.perf_counter()
    batch = random_batch(workload)
    run(batch)
    seconds = time.perf_counter() - started
    del batch
    peak = _rss_bytes("VmHWM")
    return {"baseline_bytes": float(baseline), "peak_bytes": float(peak),
            "step_bytes": float(peak - baseline), "seconds": seconds}


def start_measurement(workload: Workload, threads: int = 1,
                      forecast: bool = False) -> Any:
    """Start :func:`measure_cpu_training_step` in a fresh Python process (see there for why);
    :func:`finish_measurement` collects it. Several may run at once: each measures only its
    own resident memory."""
    import os
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "weathermodel.plan",
                             json.dumps(workload.to_dict()),
                             "forecast" if forecast else "train"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_measurement(process: Any, timeout: float = 600.0) -> dict[str, float]:
    """The result of a measurement started by :func:`start_measurement`."""
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure_in_subprocess(workload: Workload, timeout: float = 600.0, threads: int = 1,
                          forecast: bool = False) -> dict[str, float]:
    """:func:`measure_cpu_training_step` in a fresh Python process (see there for why)."""
    return finish_measurement(start_measurement(workload, threads, forecast), timeout)


if __name__ == "__main__":  # the measuring subprocess: one workload as JSON, result as JSON
    print(json.dumps(measure_cpu_training_step(workload_from_dict(json.loads(sys.argv[1])),
                                               forecast=sys.argv[2:] == ["forecast"])))

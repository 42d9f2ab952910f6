"""GraphCast-style encoder-processor-decoder network on an icosahedral multi-mesh.

Grid -> mesh (encoder, edges by radius), message passing on the multi-mesh (processor, all
refinement levels' edges merged), mesh -> grid (decoder, edges from the containing triangle or
the nearest nodes). Aggregation is a sum (``index_add_``), so the network needs no compiled
scatter library and runs the same on CPU and CUDA. Node features carry latitude only, and edge
features are expressed in the receiver's rotated frame, so rolling the input in longitude by a
symmetry of the mesh (72 degrees) rolls the output the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from weathermodel.models.config import GraphConfig
from weathermodel.models.mesh import GridMeshGraph, cached_graph


def mlp(in_size: int, hidden: int, out_size: int, hidden_layers: int,
        layer_norm: bool = True) -> nn.Sequential:
    """Linear-SiLU stack, optionally ending in a LayerNorm (GraphCast's MLP)."""
    layers: list[nn.Module] = []
    size = in_size
    for _ in range(hidden_layers):
        layers += [nn.Linear(size, hidden), nn.SiLU()]
        size = hidden
    layers.append(nn.Linear(size, out_size))
    if layer_norm:
        layers.append(nn.LayerNorm(out_size))
    return nn.Sequential(*layers)


class _ScatterSum(torch.autograd.Function):
    """Sum over edges into nodes whose backward is a gather: it saves only the index, where
    autograd's ``index_add`` keeps every edge message alive for the backward pass."""

    @staticmethod
    def forward(ctx, messages: torch.Tensor, receivers: torch.Tensor,  # type: ignore[override]
                n_nodes: int) -> torch.Tensor:
        ctx.save_for_backward(receivers)
        out = messages.new_zeros(messages.shape[0], n_nodes, messages.shape[-1])
        return out.index_add_(1, receivers, messages)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (receivers,) = ctx.saved_tensors
        return grad.index_select(1, receivers), None, None


def scatter_sum(messages: torch.Tensor, receivers: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Sum edge messages (batch, edges, dim) into their receiving nodes (batch, nodes, dim)."""
    return _ScatterSum.apply(messages, receivers, n_nodes)


class InteractionNetwork(nn.Module):
    """One message-passing step from sender nodes to receiver nodes, with residuals.

    Edge update ``e' = e + MLP([e, s[senders], r[receivers]])``; receiver update
    ``r' = r + MLP([r, sum of e' into r])``. The first layer of the edge MLP is applied to the
    node latents before they are gathered onto edges (``W [e, s, r] = W_e e + (W_s s)[senders]
    + (W_r r)[receivers]``): the same result with one matrix product per node instead of per
    edge, and no concatenated edge tensor.
    """

    def __init__(self, latent: int, hidden_layers: int) -> None:
        super().__init__()
        self.edge_mlp = mlp(3 * latent, latent, latent, hidden_layers)
        self.node_mlp = mlp(2 * latent, latent, latent, hidden_layers)

    def forward(self, senders_latent: torch.Tensor, receivers_latent: torch.Tensor,
                edges_latent: torch.Tensor, senders: torch.Tensor,
                receivers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        edges_latent = edges_latent.expand(receivers_latent.shape[0], -1, -1)
        first, rest = self.edge_mlp[0], self.edge_mlp[1:]
        w_edge, w_sender, w_receiver = first.weight.chunk(3, dim=1)
        hidden = (nn.functional.linear(edges_latent, w_edge, first.bias)
                  + nn.functional.linear(senders_latent, w_sender)[:, senders]
                  + nn.functional.linear(receivers_latent, w_receiver)[:, receivers])
        update = rest(hidden)
        edges_latent = edges_latent + update
        aggregated = scatter_sum(update, receivers, receivers_latent.shape[1])
        receivers_latent = receivers_latent + self.node_mlp(
            torch.cat([receivers_latent, aggregated], dim=-1))
        return receivers_latent, edges_latent


class GraphNetwork(nn.Module):
    """Maps a gridded input to a gridded output through the multi-mesh.

    Parameters
    ----------
    config : graph sizes and connectivity.
    in_channels, out_channels : channels of the input and output grids.
    latitude, longitude : the grid (degrees, canonical ascending order).
    activation_checkpointing : recompute each processor step in the backward pass.
    cache_dir : where the graph is cached (default: ``$WEATHERMODEL_CACHE`` or ~/.cache).
    """

    def __init__(self, config: GraphConfig, in_channels: int, out_channels: int,
                 latitude: np.ndarray, longitude: np.ndarray,
                 activation_checkpointing: bool = False,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        graph = cached_graph(np.asarray(latitude, "float64"), np.asarray(longitude, "float64"),
                             config.mesh_refinement, config.grid_to_mesh_radius,
                             config.mesh_to_grid, config.knn, cache_dir=cache_dir,
                             edge_normalization=config.edge_normalization)
        self._register_graph(graph)
        latent, hidden = config.latent_size, config.mlp_hidden_layers
        n_node_features = graph.grid_node_features.shape[1]
        n_edge_features = graph.mesh_edge_features.shape[1]
        self.grid_embed = mlp(in_channels + n_node_features, latent, latent, hidden)
        self.mesh_embed = mlp(graph.mesh_node_features.shape[1], latent, latent, hidden)
        self.g2m_edge_embed = mlp(n_edge_features, latent, latent, hidden)
        self.mesh_edge_embed = mlp(n_edge_features, latent, latent, hidden)
        self.m2g_edge_embed = mlp(n_edge_features, latent, latent, hidden)
        self.encoder = InteractionNetwork(latent, hidden)
        self.grid_update = mlp(latent, latent, latent, hidden)
        self.processor = nn.ModuleList(InteractionNetwork(latent, hidden)
                                       for _ in range(config.processor_layers))
        self.decoder = InteractionNetwork(latent, hidden)
        self.output = mlp(latent, latent, out_channels, hidden, layer_norm=False)
        self.n_latitude, self.n_longitude = len(latitude), len(longitude)

    def _register_graph(self, graph: GridMeshGraph) -> None:
        """Graph arrays as non-persistent buffers: rebuilt from the config, never saved."""
        def index(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, dtype=np.int64))

        def feature(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, dtype=np.float32))

        for name in ("mesh_senders", "mesh_receivers", "grid2mesh_senders",
                     "grid2mesh_receivers", "mesh2grid_senders", "mesh2grid_receivers"):
            self.register_buffer(name, index(getattr(graph, name)), persistent=False)
        for name in ("grid_node_features", "mesh_node_features", "mesh_edge_features",
                     "grid2mesh_edge_features", "mesh2grid_edge_features"):
            self.register_buffer(name, feature(getattr(graph, name)), persistent=False)
        self.n_mesh = int(graph.mesh_vertices.shape[0])

    def _processor_step(self, layer: InteractionNetwork, mesh: torch.Tensor,
                        edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return layer(mesh, mesh, edges, self.mesh_senders, self.mesh_receivers)

    def forward(self, x: torch.Tensor, lead_time_hours: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(batch, in_channels, lat, lon) -> (batch, out_channels, lat, lon).

        ``lead_time_hours`` is accepted for interface compatibility and unused: one graph
        network serves one time step.
        """
        batch = x.shape[0]
        grid = x.flatten(2).transpose(1, 2)  # (batch, lat*lon, channels), lat-major
        features = self.grid_node_features.to(x.dtype).expand(batch, -1, -1)
        grid = self.grid_embed(torch.cat([grid, features], dim=-1))
        mesh = self.mesh_embed(self.mesh_node_features.to(x.dtype)).expand(batch, -1, -1)
        g2m_edges = self.g2m_edge_embed(self.grid2mesh_edge_features.to(x.dtype))[None]
        mesh, _ = self.encoder(grid, mesh, g2m_edges, self.grid2mesh_senders,
                               self.grid2mesh_receivers)
        grid = grid + self.grid_update(grid)
        edges = self.mesh_edge_embed(self.mesh_edge_features.to(x.dtype))[None]
        for layer in self.processor:
            if self.activation_checkpointing and torch.is_grad_enabled():
                mesh, edges = checkpoint(self._processor_step, layer, mesh, edges,
                                         use_reentrant=False)
            else:
                mesh, edges = self._processor_step(layer, mesh, edges)
        m2g_edges = self.m2g_edge_embed(self.mesh2grid_edge_features.to(x.dtype))[None]
        grid, _ = self.decoder(mesh, grid, m2g_edges, self.mesh2grid_senders,
                               self.mesh2grid_receivers)
        out = self.output(grid)  # (batch, lat*lon, out)
        return out.transpose(1, 2).reshape(batch, -1, self.n_latitude, self.n_longitude)

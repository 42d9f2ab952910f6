"""The graph network's forward pass without gradients, its constant parts computed once.

In a GraphCast-style network much of a forward pass does not depend on the input: the mesh
nodes' embedding, every edge set's embedding, the edge part of each interaction network's
first layer on edges that are still as embedded (encoder, decoder, first processor layer), the
encoder's receiver (mesh) terms and the grid nodes' static features' part of the grid
embedding. Rolling a forecast out recomputes all of that at every step, per sample of the
batch. :class:`InferenceConstants` computes those tensors once per set of weights (they are
recomputed when a parameter is replaced or changed in place, or when the device or dtype
changes) with batch 1, and :func:`gnn_forward_without_grad` is the same function as
``GraphNetwork.forward`` (``processor: gnn``) that reads them, with in-place activations and
sums where no gradient needs the inputs.

The equations are those of :class:`~weathermodel.models.graph.InteractionNetwork`: the first
layer of an MLP over a concatenation is a sum of per-part products, so with
``W [e, s, r] + b = (W_e e + b) + W_s s + W_r r`` the constant parts are summed once. Results
equal the autograd path to float rounding (the sums are taken in another order).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from weathermodel.models.graph_layers import (edge_chunks, gather_nodes, scatter_sum,
                                              uniform_degree)

if TYPE_CHECKING:
    from weathermodel.models.graph import GraphNetwork, InteractionNetwork


def apply_mlp_in_place(layers: nn.Sequential, values: torch.Tensor, first: int = 0
                       ) -> torch.Tensor:
    """Layers ``first:`` of an MLP of :func:`~weathermodel.models.graph_layers.mlp` with
    SiLU in place (no grad: ``values`` may be overwritten)."""
    for layer in list(layers)[first:]:
        values = (nn.functional.silu(values, inplace=True) if isinstance(layer, nn.SiLU)
                  else layer(values))
    return values


def _first_layer_parts(layers: nn.Sequential, parts: int) -> tuple[torch.Tensor, ...]:
    """The first linear layer's weight split by input part (the concatenated inputs)."""
    return layers[0].weight.chunk(parts, dim=1)


class InferenceConstants:
    """The input-independent tensors of a ``processor: gnn`` forward pass, batch 1.

    Attributes (all ``(rows, 1, latent)``)
    ---------------------------------------
    grid_static : static grid features' part of the grid embedding's first layer, with its
        bias (``grid_nodes``).
    mesh : the embedded mesh nodes (``mesh_nodes``).
    encoder_edges : ``W_e e + b + (W_r mesh)[receivers]`` of the encoder (``grid2mesh`` edges).
    encoder_nodes : ``W_r mesh + b`` of the encoder's node MLP's first layer (``mesh_nodes``).
    processor_edges : the embedded mesh edges (input of the first processor layer).
    processor_edge_term : ``W_e e + b`` of the first processor layer (``mesh`` edges).
    decoder_edges : ``W_e e + b`` of the decoder (``mesh2grid`` edges).
    decoder_degree : edges per grid node when every grid node has the same number, in
        receiver order (``mesh_to_grid: triangle``: 3), else None.
    """

    def __init__(self, network: GraphNetwork, dtype: torch.dtype) -> None:
        with torch.no_grad():
            self._compute(network, dtype)

    def _compute(self, network: GraphNetwork, dtype: torch.dtype) -> None:
        n_inputs = network.grid_embed[0].in_features - network.grid_node_features.shape[1]
        first = network.grid_embed[0]
        self.grid_static = nn.functional.linear(network.grid_node_features.to(dtype),
                                                first.weight[:, n_inputs:], first.bias)[:, None]
        self.mesh = network.mesh_embed(network.mesh_node_features.to(dtype))[:, None]
        encoder = network.encoder
        _, receivers_projected = encoder.project_nodes(self.mesh, self.mesh)
        self.encoder_edges = (
            encoder.edge_term(network.g2m_edge_embed(
                network.grid2mesh_edge_features.to(dtype))[:, None])
            + gather_nodes(receivers_projected, network.grid2mesh_receivers))
        w_nodes, _ = _first_layer_parts(encoder.node_mlp, 2)
        self.encoder_nodes = nn.functional.linear(self.mesh, w_nodes, encoder.node_mlp[0].bias)
        self.processor_edges = network.mesh_edge_embed(
            network.mesh_edge_features.to(dtype))[:, None]
        self.processor_edge_term = network.processor[0].edge_term(self.processor_edges)
        self.decoder_edges = network.decoder.edge_term(network.m2g_edge_embed(
            network.mesh2grid_edge_features.to(dtype))[:, None])
        self.decoder_degree = uniform_degree(network.mesh2grid_receivers,
                                             network.grid_node_features.shape[0])


def _edge_messages(network: InteractionNetwork, edge_term: torch.Tensor,
                   senders_projected: torch.Tensor, receivers_projected: torch.Tensor | None,
                   senders: torch.Tensor, receivers: torch.Tensor | None,
                   degree: int | None = None) -> torch.Tensor:
    """Edge messages ``(edges, batch, latent)`` from the first layer's node parts (``None``:
    the receivers' part is in ``edge_term``). With ``degree`` (see
    :func:`~weathermodel.models.graph_layers.uniform_degree`), ``receivers_projected`` holds
    the receivers of these edges in order, each broadcast onto its ``degree`` edges, and
    ``receivers`` is not needed."""
    hidden = gather_nodes(senders_projected, senders)
    if receivers_projected is not None and degree is not None:
        hidden.unflatten(0, (-1, degree)).add_(receivers_projected[:, None])
    elif receivers_projected is not None:
        hidden += gather_nodes(receivers_projected, receivers)
    hidden += edge_term
    return apply_mlp_in_place(network.edge_mlp, hidden, first=1)


def _aggregated_messages(network: InteractionNetwork, edge_term: torch.Tensor,
                         senders_latent: torch.Tensor, receivers_latent: torch.Tensor | None,
                         senders: torch.Tensor, receivers: torch.Tensor, n_receivers: int,
                         chunks: int, degree: int | None = None) -> torch.Tensor:
    """The encoder's or decoder's messages summed into the receivers ``(n_receivers, batch,
    latent)``, formed ``chunks`` edge chunks at a time (``edge_chunks``: only one chunk's
    per-edge tensors are alive at once, as in the autograd path). ``degree``: see
    :func:`~weathermodel.models.graph_layers.uniform_degree`; the receivers' terms are then
    broadcast onto the edges and the sums are reshapes, not gathers and scatters."""
    senders_projected, receivers_projected = network.project_nodes(senders_latent,
                                                                   receivers_latent)
    if degree is not None and receivers_projected is not None:
        total = senders_latent.new_empty(n_receivers, *senders_latent.shape[1:])
        for nodes in edge_chunks(n_receivers, chunks):
            edges = slice(nodes.start * degree, nodes.stop * degree)
            messages = _edge_messages(network, edge_term[edges], senders_projected,
                                      receivers_projected[nodes], senders[edges], None, degree)
            torch.sum(messages.unflatten(0, (-1, degree)), dim=1, out=total[nodes])
        return total
    total = senders_latent.new_zeros(n_receivers, *senders_latent.shape[1:])
    for piece in edge_chunks(len(senders), chunks):
        messages = _edge_messages(network, edge_term[piece], senders_projected,
                                  receivers_projected, senders[piece], receivers[piece])
        total.view(n_receivers, -1).index_add_(0, receivers[piece],
                                               messages.view(len(messages), -1))
    return total


def _update_nodes(network: InteractionNetwork, receivers_latent: torch.Tensor,
                  aggregated: torch.Tensor, receivers_term: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``r + MLP([r, aggregated])``; ``receivers_term``: ``W_r r + b``, when known."""
    w_receiver, w_aggregated = _first_layer_parts(network.node_mlp, 2)
    hidden = nn.functional.linear(aggregated, w_aggregated)
    hidden += (receivers_term if receivers_term is not None
               else nn.functional.linear(receivers_latent, w_receiver,
                                         network.node_mlp[0].bias))
    return apply_mlp_in_place(network.node_mlp, hidden, first=1).add_(receivers_latent)


def gnn_forward_without_grad(network: GraphNetwork, x: torch.Tensor,
                             constants: InferenceConstants) -> torch.Tensor:
    """``GraphNetwork.forward`` of a ``processor: gnn`` network, without autograd.

    ``x`` is ``(batch, in_channels, lat, lon)``; returns ``(batch, out_channels, lat, lon)``.
    """
    batch = x.shape[0]
    n_inputs = network.grid_embed[0].in_features - network.grid_node_features.shape[1]
    grid = nn.functional.linear(x.flatten(2).permute(2, 0, 1),
                                network.grid_embed[0].weight[:, :n_inputs])
    grid = apply_mlp_in_place(network.grid_embed, grid.add_(constants.grid_static),
                              first=1)
    n_mesh = constants.mesh.shape[0]
    chunks = network.config.edge_chunks
    encoder = network.encoder
    aggregated = _aggregated_messages(encoder, constants.encoder_edges, grid, None,
                                      network.grid2mesh_senders, network.grid2mesh_receivers,
                                      n_mesh, chunks)
    mesh = _update_nodes(encoder, constants.mesh.expand(-1, batch, -1), aggregated,
                         constants.encoder_nodes)
    grid = grid + apply_mlp_in_place(network.grid_update, grid)
    senders, receivers = network.mesh_senders, network.mesh_receivers
    edges = constants.processor_edges
    for index, layer in enumerate(network.processor):
        edge_term = constants.processor_edge_term if index == 0 else layer.edge_term(edges)
        messages = _edge_messages(layer, edge_term, *layer.project_nodes(mesh, mesh), senders,
                                  receivers)
        if index < len(network.processor) - 1:  # the last layer's edge update is unused
            edges = edges + messages
        mesh = _update_nodes(layer, mesh, scatter_sum(messages, receivers, n_mesh))
    aggregated = _aggregated_messages(network.decoder, constants.decoder_edges, mesh, grid,
                                      network.mesh2grid_senders, network.mesh2grid_receivers,
                                      grid.shape[0], chunks, constants.decoder_degree)
    grid = _update_nodes(network.decoder, grid, aggregated)
    out = apply_mlp_in_place(network.output, grid)  # (lat*lon, batch, out)
    return out.permute(1, 2, 0).reshape(batch, -1, network.n_latitude, network.n_longitude)

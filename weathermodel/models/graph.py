"""GraphCast-style encoder-processor-decoder network on an icosahedral multi-mesh.

Grid -> mesh (encoder, edges by radius), message passing on the multi-mesh (processor, all
refinement levels' edges merged), mesh -> grid (decoder, edges from the containing triangle or
the nearest nodes). Aggregation is a sum (``index_add_``), so the network needs no compiled
scatter library and runs the same on CPU and CUDA. Node features carry latitude only, and edge
features are expressed in the receiver's rotated frame, so rolling the input in longitude by a
symmetry of the mesh (72 degrees) rolls the output the same way.

Layout and kernels
------------------
Inside the network node latents are ``(nodes, batch, latent)``: node-major, the batch flattened
into each node's row. Gathers onto edges are then ``index_select`` along dim 0 of a 2-D
``(nodes, batch * latent)`` view and sums into receivers ``index_add_`` along dim 0, whose
backward passes are each other (advanced indexing ``x[:, index]`` would instead go backward
through ``index_put_(accumulate=True)``, which sorts on CUDA and is slow with several CPU
threads). One index serves every sample of the batch.

Edges are ordered by receiver, so gathers and sums walk the node arrays nearly in order.

``processor: gnn`` (GraphCast, the default): interaction networks in the encoder, processor and
decoder, every edge set embedded by an MLP. ``processor: transformer`` (as Anemoi's graph
transformer): graph attention (:class:`GraphTransformerLayer`, as Anemoi's
``GraphTransformerProcessorBlock``) on the multi-mesh and in the encoder and decoder
(:class:`GraphTransformerMapper`), nodes embedded linearly, output read by LayerNorm + linear.
With activation checkpointing the encoder, every processor layer and the decoder are recomputed
in the backward pass; with ``edge_chunks`` above 1 the encoder's and decoder's edges (gnn: edge
chunks; transformer: receiver ranges with their edges) are processed, and checkpointed, one
chunk at a time, so only one chunk's activations are alive at once.

Without gradients (forecasts, validation), a ``processor: gnn`` network runs
:func:`~weathermodel.models.graph_inference.gnn_forward_without_grad`: the same function with
its input-independent parts (edge embeddings and edge terms, the mesh embedding, the static
grid features' share of the grid embedding) computed once per set of weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from weathermodel.models.config import GraphConfig
from weathermodel.models.graph_inference import InferenceConstants, gnn_forward_without_grad
from weathermodel.models.graph_layers import edge_chunks, gather_nodes, mlp, scatter_sum
from weathermodel.models.mesh import GridMeshGraph, cached_graph


class _EdgeSoftmaxAggregate(torch.autograd.Function):
    """Unnormalised attention over edges ``j -> i``, edge chunk by edge chunk.

    With the edge term ``f_ij = W g_ij + b`` of edge features ``g``, ``k'_ij = k_j + f_ij`` and
    ``v'_ij = v_j + f_ij``: the weights ``w_ij = exp(q_i . k'_ij - m_i)`` and the sums
    ``sum_j w_ij v'_ij``, ``m_i`` being each receiver's largest score (a constant: the
    normalised attention does not depend on it).

    Autograd of the same expression keeps five per-edge latents (gathered queries, keys,
    values, their sums with ``f`` and products) for the backward pass. With one chunk this
    keeps three (gathered queries, keys and values with ``f``); with several it keeps only the
    per-edge weights ``(edges, batch, heads)`` and recomputes the rest from the node tensors
    and edge features, one chunk of edges at a time (so only one chunk's per-edge latents are
    alive at once, forward and backward).
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor,  # type: ignore[override]
                value: torch.Tensor, edge_features: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, senders: torch.Tensor, receivers: torch.Tensor,
                chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_nodes, batch, heads, head = query.shape
        pieces = edge_chunks(len(senders), chunks)
        # one chunk: the edge term is computed once for keys and values, and the gathered
        # queries, keys and values are kept for the backward pass (speed); several chunks:
        # everything per-edge is recomputed chunk by chunk (memory)
        single = len(pieces) == 1
        kept: dict[str, torch.Tensor] = {}
        scores = query.new_empty(len(senders), batch, heads)
        for piece in pieces:
            edge_term = _edge_term(edge_features[piece], weight, bias, heads)
            keys = gather_nodes(key, senders[piece]).add_(edge_term)
            queries = gather_nodes(query, receivers[piece])
            scores[piece] = torch.einsum("ebhd,ebhd->ebh", keys, queries)
            if single:
                kept.update(edge_term=edge_term, keys=keys, queries=queries)
        largest = scores.new_full((n_nodes, batch * heads), float("-inf"))
        largest.scatter_reduce_(0, receivers[:, None].expand(-1, batch * heads),
                                scores.view(-1, batch * heads), "amax")
        weights = scores.sub_(gather_nodes(largest, receivers).view_as(scores)).exp_()
        numerator = query.new_zeros(n_nodes, batch * heads * head)
        for piece in pieces:
            edge_term = (kept.pop("edge_term") if single
                         else _edge_term(edge_features[piece], weight, bias, heads))
            values = gather_nodes(value, senders[piece]).add_(edge_term)
            messages = values * weights[piece, ..., None]
            numerator.index_add_(0, receivers[piece], messages.view(len(messages), -1))
            if single:
                kept["values"] = values
        ctx.save_for_backward(query, key, value, edge_features, weight, bias, weights,
                              senders, receivers, *(kept[name] for name in
                                                    ("queries", "keys", "values") if single))
        ctx.chunks = chunks
        return numerator.view(query.shape), weights

    @staticmethod
    def backward(ctx, grad_numerator: torch.Tensor,  # type: ignore[override]
                 grad_weights: torch.Tensor | None):
        (query, key, value, edge_features, weight, bias, weights, senders,
         receivers, *kept) = ctx.saved_tensors
        heads = query.shape[2]
        grad_numerator = grad_numerator.contiguous()
        grads = [torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)]
        grad_query, grad_key, grad_value = (g.view(len(g), -1) for g in grads)
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        for piece in edge_chunks(len(senders), ctx.chunks):
            chunk_senders, chunk_receivers = senders[piece], receivers[piece]
            chunk_weights = weights[piece]
            chunk_features = edge_features[piece]
            if kept:
                queries, keys, values = kept
                edge_term = None
            else:
                edge_term = _edge_term(chunk_features, weight, bias, heads)
                values = gather_nodes(value, chunk_senders).add_(edge_term)
            grad_messages = gather_nodes(grad_numerator, chunk_receivers)
            grad_scores = torch.einsum("ebhd,ebhd->ebh", values, grad_messages)
            del values
            if grad_weights is not None:
                grad_scores += grad_weights[piece]
            grad_scores *= chunk_weights  # d w / d score = w
            grad_values = grad_messages.mul_(chunk_weights[..., None])
            grad_value.index_add_(0, chunk_senders, grad_values.view(len(grad_values), -1))
            if not kept:
                keys = gather_nodes(key, chunk_senders).add_(edge_term)
                queries = gather_nodes(query, chunk_receivers)
            del edge_term
            weighted_keys = keys * grad_scores[..., None]
            grad_query.index_add_(0, chunk_receivers, weighted_keys.view(len(keys), -1))
            del keys, weighted_keys
            # in place only on a recomputed tensor: the kept ones may serve another backward
            grad_keys = (queries * grad_scores[..., None] if kept
                         else queries.mul_(grad_scores[..., None]))
            del queries
            grad_key.index_add_(0, chunk_senders, grad_keys.view(len(grad_keys), -1))
            grad_edge = grad_values.add_(grad_keys)  # (edges, batch, heads, head)
            grad_edge = (grad_edge.view(len(grad_edge), -1) if grad_edge.shape[1] == 1
                         else grad_edge.sum(1).flatten(1))  # summed over the batch
            grad_weight.addmm_(grad_edge.T, chunk_features)
            grad_bias += grad_edge.sum(0)
        return (*grads, None, grad_weight, grad_bias, None, None, None)


def _edge_term(edge_features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               heads: int) -> torch.Tensor:
    """``W g + b`` for edge features ``(edges, features)``: ``(edges, 1, heads, head)``.

    A matrix product and an in-place bias (``F.linear`` is twice as slow here: it first
    copies the bias into the output)."""
    term = torch.mm(edge_features, weight.T).add_(bias)
    return term.view(len(term), 1, heads, -1)


class InteractionNetwork(nn.Module):
    """One message-passing step from sender nodes to receiver nodes, with residuals.

    Edge message ``m = MLP([e, s[senders], r[receivers]])``; edge update ``e' = e + m``;
    receiver update ``r' = r + MLP([r, sum of m into r])``: the receivers sum the messages
    ``m``, not the updated edges ``e'`` (the edge residual does not enter the aggregation).
    The first layer of the edge MLP is applied to the node latents before they are gathered
    onto edges (``W [e, s, r] = W_e e + (W_s s)[senders] + (W_r r)[receivers]``): the same
    result with one matrix product per node instead of per edge, and no concatenated edge
    tensor. Latents are ``(nodes or edges, batch, latent)``; edge latents may have batch 1.

    """

    def __init__(self, latent: int, hidden_layers: int) -> None:
        super().__init__()
        self.edge_mlp = mlp(3 * latent, latent, latent, hidden_layers)
        self.node_mlp = mlp(2 * latent, latent, latent, hidden_layers)

    def project_nodes(self, senders_latent: torch.Tensor, receivers_latent: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sender and receiver parts of the edge MLP's first layer, per node (None for
        receivers not given)."""
        _, w_sender, w_receiver = self.edge_mlp[0].weight.chunk(3, dim=1)
        return (nn.functional.linear(senders_latent, w_sender),
                None if receivers_latent is None
                else nn.functional.linear(receivers_latent, w_receiver))

    def edge_term(self, edges_latent: torch.Tensor) -> torch.Tensor:
        """``W_e e + b``: the edge part of the edge MLP's first layer, with its bias."""
        first = self.edge_mlp[0]
        return nn.functional.linear(edges_latent, first.weight.chunk(3, dim=1)[0], first.bias)

    def messages(self, senders_projected: torch.Tensor, receivers_projected: torch.Tensor,
                 edges_latent: torch.Tensor, senders: torch.Tensor,
                 receivers: torch.Tensor) -> torch.Tensor:
        """Edge messages ``(edges, batch, latent)`` from projected node latents."""
        hidden = (self.edge_term(edges_latent)
                  + gather_nodes(senders_projected, senders)
                  + gather_nodes(receivers_projected, receivers))
        return self.edge_mlp[1:](hidden)

    def update_nodes(self, receivers_latent: torch.Tensor, aggregated: torch.Tensor
                     ) -> torch.Tensor:
        """``r + MLP([r, aggregated messages])``."""
        return receivers_latent + self.node_mlp(torch.cat([receivers_latent, aggregated], -1))

    def forward(self, senders_latent: torch.Tensor, receivers_latent: torch.Tensor,
                edges_latent: torch.Tensor, senders: torch.Tensor, receivers: torch.Tensor,
                update_edges: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Updated receivers and, if ``update_edges``, updated edges (else None)."""
        senders_projected, receivers_projected = self.project_nodes(senders_latent,
                                                                    receivers_latent)
        update = self.messages(senders_projected, receivers_projected, edges_latent, senders,
                               receivers)
        aggregated = scatter_sum(update, receivers, receivers_latent.shape[0])
        edges_out = edges_latent + update if update_edges else None
        return self.update_nodes(receivers_latent, aggregated), edges_out


class GraphTransformerLayer(nn.Module):
    """Multi-head attention of every receiver over its senders along graph edges, then an MLP.

    As Anemoi's ``GraphTransformerProcessorBlock`` (own code): with ``h = LayerNorm(x)``,
    query ``q = W_q h``, key ``k = W_k h``, value ``v = W_v h``, self term ``W_s h`` (one fused
    matrix product) and edge term ``f = W_f edge_features`` (shared by keys and values), each
    head of receiver ``i`` attends to the edges ``j -> i``:

        a_ij = softmax_j( q_i . (k_j + f_ij) / sqrt(d_head) )   (over the edges into i)
        o_i  = sum_j a_ij (v_j + f_ij)

    then ``x' = x + W_o(o + W_s h)`` and ``x'' = x' + MLP(LayerNorm(x'))``. The softmax is
    taken per receiver with scatter sums, shifted by each receiver's largest score; the
    normalisation is applied after the sum (``sum_j w_ij (v_j + f_ij) / sum_j w_ij``), so no
    per-edge weight is gathered back. A receiver without incoming edges gets ``o_i = 0``.
    The per-edge part is one autograd function (:class:`_EdgeSoftmaxAggregate`) that keeps
    few per-edge tensors for the backward pass. Edge latents are not updated: every layer
    projects the same edge features.

    Parameters
    ----------
    latent : node width (a multiple of ``heads``).
    heads : attention heads.
    edge_features : width of the edge features.
    hidden_layers : hidden layers of the MLP (width ``latent``).
    edge_chunks : the per-edge work is done in this many chunks of edges (the result does not
        depend on it, up to float rounding).
    """

    def __init__(self, latent: int, heads: int, edge_features: int, hidden_layers: int,
                 edge_chunks: int = 1) -> None:
        super().__init__()
        if latent % heads:
            raise ValueError(f"latent ({latent}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.edge_chunks = edge_chunks
        self.norm_attention = nn.LayerNorm(latent)
        self.query_key_value_self = nn.Linear(latent, 4 * latent)
        self.edge_projection = nn.Linear(edge_features, latent)
        self.output_projection = nn.Linear(latent, latent)
        self.norm_mlp = nn.LayerNorm(latent)
        self.mlp = mlp(latent, latent, latent, hidden_layers, layer_norm=False)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  edge_features: torch.Tensor, senders: torch.Tensor,
                  receivers: torch.Tensor) -> torch.Tensor:
        """Graph attention ``(nodes, batch, latent)`` from ``(nodes, batch, latent)`` q, k, v
        and ``(edges, features)`` edge features."""
        n_nodes, batch, latent = query.shape
        heads, head = self.heads, latent // self.heads
        shape = (n_nodes, batch, heads, head)
        sender_shape = (key.shape[0], batch, heads, head)
        numerator, weights = _EdgeSoftmaxAggregate.apply(
            query.reshape(shape) * head ** -0.5, key.reshape(sender_shape),
            value.reshape(sender_shape),
            edge_features, self.edge_projection.weight, self.edge_projection.bias, senders,
            receivers, self.edge_chunks)
        denominator = scatter_sum(weights, receivers, n_nodes)
        denominator = denominator.clamp_min(torch.finfo(weights.dtype).tiny)[..., None]
        return (numerator / denominator).reshape(n_nodes, batch, latent)

    def forward(self, nodes: torch.Tensor, edge_features: torch.Tensor, senders: torch.Tensor,
                receivers: torch.Tensor) -> torch.Tensor:
        """``(nodes, batch, latent)`` -> same; ``edge_features`` is ``(edges, features)``."""
        normed = self.norm_attention(nodes)
        query, key, value, self_term = self.query_key_value_self(normed).chunk(4, dim=-1)
        attended = self.attention(query, key, value, edge_features, senders, receivers)
        nodes = nodes + self.output_projection(attended + self_term)
        return nodes + self.mlp(self.norm_mlp(nodes))


class GraphTransformerMapper(GraphTransformerLayer):
    """Graph attention from one node set to another (as Anemoi's
    ``GraphTransformerMapperBlock``): the receivers' queries attend to the senders' keys and
    values along the edges, senders and receivers normalised by their own LayerNorms; then the
    receivers' MLP. Same equations as :class:`GraphTransformerLayer`; the senders are not
    updated.
    """

    def __init__(self, latent: int, heads: int, edge_features: int, hidden_layers: int,
                 edge_chunks: int = 1) -> None:
        super().__init__(latent, heads, edge_features, hidden_layers, edge_chunks)
        del self.query_key_value_self
        self.norm_senders = nn.LayerNorm(latent)
        self.query_self = nn.Linear(latent, 2 * latent)
        self.key_value = nn.Linear(latent, 2 * latent)

    def forward(self, senders_latent: torch.Tensor,  # type: ignore[override]
                receivers_latent: torch.Tensor, edge_features: torch.Tensor,
                senders: torch.Tensor, receivers: torch.Tensor) -> torch.Tensor:
        """Updated receivers ``(receivers, batch, latent)``."""
        query, self_term = self.query_self(self.norm_attention(receivers_latent)).chunk(2, -1)
        key, value = self.key_value(self.norm_senders(senders_latent)).chunk(2, dim=-1)
        attended = self.attention(query, key, value, edge_features, senders, receivers)
        nodes = receivers_latent + self.output_projection(attended + self_term)
        return nodes + self.mlp(self.norm_mlp(nodes))


class GraphNetwork(nn.Module):
    """Maps a gridded input to a gridded output through the multi-mesh.

    Parameters
    ----------
    config : graph sizes, connectivity, processor kind and edge chunks.
    in_channels, out_channels : channels of the input and output grids.
    latitude, longitude : the grid (degrees, canonical ascending order).
    activation_checkpointing : recompute the encoder (chunk by chunk), each processor layer and
        the decoder (chunk by chunk) in the backward pass.
    cache_dir : where the graph is cached (default: ``$WEATHERMODEL_CACHE`` or ~/.cache).
    """

    def __init__(self, config: GraphConfig, in_channels: int, out_channels: int,
                 latitude: np.ndarray, longitude: np.ndarray,
                 activation_checkpointing: bool = False,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        config.validate()
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
        transformer = config.processor == "transformer"
        n_mesh_features = graph.mesh_node_features.shape[1]
        # transformer (as Anemoi's): nodes embedded linearly, read out by LayerNorm + linear,
        # the residual stream's own norms doing the rest; gnn (GraphCast): MLPs
        self.grid_embed = (nn.Linear(in_channels + n_node_features, latent) if transformer
                           else mlp(in_channels + n_node_features, latent, latent, hidden))
        self.mesh_embed = (nn.Linear(n_mesh_features, latent) if transformer
                           else mlp(n_mesh_features, latent, latent, hidden))
        self.encoder: nn.Module
        self.decoder: nn.Module
        if transformer:  # as Anemoi's graph transformer: attention in the mappers too, and
            # the encoder leaves the grid (its senders) as embedded
            self.encoder = GraphTransformerMapper(latent, config.attention_heads,
                                                  n_edge_features, hidden, config.edge_chunks)
        else:  # GraphCast: every edge set embedded by an MLP, interaction networks
            self.g2m_edge_embed = mlp(n_edge_features, latent, latent, hidden)
            self.mesh_edge_embed = mlp(n_edge_features, latent, latent, hidden)
            self.m2g_edge_embed = mlp(n_edge_features, latent, latent, hidden)
            self.encoder = InteractionNetwork(latent, hidden)
        if not transformer:  # GraphCast updates the grid (senders) in the encoder
            self.grid_update = mlp(latent, latent, latent, hidden)
        self.processor = nn.ModuleList(
            GraphTransformerLayer(latent, config.attention_heads, n_edge_features, hidden,
                                  config.edge_chunks)
            if transformer else InteractionNetwork(latent, hidden)
            for _ in range(config.processor_layers))
        self.decoder = (GraphTransformerMapper(latent, config.attention_heads, n_edge_features,
                                               hidden, config.edge_chunks)
                        if transformer else InteractionNetwork(latent, hidden))
        self.output = (nn.Sequential(nn.LayerNorm(latent), nn.Linear(latent, out_channels))
                       if transformer
                       else mlp(latent, latent, out_channels, hidden, layer_norm=False))
        self.n_latitude, self.n_longitude = len(latitude), len(longitude)

    def _register_graph(self, graph: GridMeshGraph) -> None:
        """Graph arrays as non-persistent buffers: rebuilt from the config, never saved.

        Each edge set is ordered by receiver, then sender, so that gathers and sums walk the
        node arrays nearly in order (on CPU up to 3x faster than a scattered order) and edge
        chunks hold contiguous ranges of receivers. The order of the edges does not change the
        network's function (sums are merely taken in another order: float rounding).
        """
        def index(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, dtype=np.int64))

        def feature(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, dtype=np.float32))

        for prefix, features in (("mesh", "mesh_edge_features"),
                                 ("grid2mesh", "grid2mesh_edge_features"),
                                 ("mesh2grid", "mesh2grid_edge_features")):
            senders = np.asarray(getattr(graph, f"{prefix}_senders"))
            receivers = np.asarray(getattr(graph, f"{prefix}_receivers"))
            order = np.lexsort((senders, receivers))
            self.register_buffer(f"{prefix}_senders", index(senders[order]), persistent=False)
            self.register_buffer(f"{prefix}_receivers", index(receivers[order]),
                                 persistent=False)
            self.register_buffer(features, feature(np.asarray(getattr(graph, features))[order]),
                                 persistent=False)
        for name in ("grid_node_features", "mesh_node_features"):
            self.register_buffer(name, feature(getattr(graph, name)), persistent=False)
        self.n_mesh = int(graph.mesh_vertices.shape[0])

    def _inference_constants(self, x: torch.Tensor) -> InferenceConstants:
        """The input-independent tensors of a forward pass without gradients, recomputed when
        a parameter is replaced or changed in place, a direct submodule is replaced, or the
        dtype, device or autocast state differs from the last call."""
        children = tuple(map(id, self.children()))
        if getattr(self, "_parameter_slots", (None,))[0] != children:  # a submodule replaced
            self._parameter_slots = (children, [(module._parameters, name)
                                                for module in self.modules()
                                                for name in module._parameters])
        # by slot: a parameter replaced in its module is seen (walking the modules at every
        # step cost 1.3 ms, a tenth of a forecast step's time outside the network)
        key = (x.dtype, x.device, torch.is_autocast_enabled(x.device.type),
               tuple((slots[name].data_ptr(), slots[name]._version)
                     for slots, name in self._parameter_slots[1] if slots[name] is not None))
        if getattr(self, "_constants_key", None) != key:
            self._constants = InferenceConstants(self, x.dtype)
            self._constants_key = key
        return self._constants

    @property
    def _checkpointing(self) -> bool:
        return self.activation_checkpointing and torch.is_grad_enabled()

    def _maybe_checkpoint(self, function, *args):
        if self._checkpointing:
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    @staticmethod
    def _chunk_messages(network: InteractionNetwork, edge_embed: nn.Module,
                        edge_features: torch.Tensor, senders_projected: torch.Tensor,
                        receivers_projected: torch.Tensor, senders: torch.Tensor,
                        receivers: torch.Tensor, n_receivers: int) -> torch.Tensor:
        """Messages of one chunk of edges, embedded and summed into the receivers."""
        edges = edge_embed(edge_features)[:, None]
        update = network.messages(senders_projected, receivers_projected, edges, senders,
                                  receivers)
        return scatter_sum(update, receivers, n_receivers)

    def _map(self, network: InteractionNetwork, edge_embed: nn.Module,
             edge_features: torch.Tensor, senders_latent: torch.Tensor,
             receivers_latent: torch.Tensor, senders: torch.Tensor,
             receivers: torch.Tensor) -> torch.Tensor:
        """Encoder or decoder: updated receivers; the edge latents are never formed whole.

        Edges are embedded, turned into messages and summed into the receivers in
        ``config.edge_chunks`` chunks (each checkpointed when checkpointing).
        """
        senders_projected, receivers_projected = network.project_nodes(senders_latent,
                                                                       receivers_latent)
        n_receivers = receivers_latent.shape[0]
        chunks = zip(edge_features.tensor_split(self.config.edge_chunks),
                     senders.tensor_split(self.config.edge_chunks),
                     receivers.tensor_split(self.config.edge_chunks))
        aggregated: torch.Tensor | None = None
        for features, chunk_senders, chunk_receivers in chunks:
            part = self._maybe_checkpoint(self._chunk_messages, network, edge_embed,
                                          features.to(receivers_latent.dtype),
                                          senders_projected, receivers_projected,
                                          chunk_senders, chunk_receivers, n_receivers)
            aggregated = part if aggregated is None else aggregated + part
        assert aggregated is not None
        return self._maybe_checkpoint(network.update_nodes, receivers_latent, aggregated)

    def _attend(self, mapper: GraphTransformerMapper, senders_latent: torch.Tensor,
                receivers_latent: torch.Tensor, edge_features: torch.Tensor,
                senders: torch.Tensor, receivers: torch.Tensor) -> torch.Tensor:
        """Encoder or decoder of the graph transformer: updated receivers.

        With ``config.edge_chunks`` above 1 the receivers are split into that many ranges,
        each with its edges (contiguous: edges are ordered by receiver), mapped (and
        checkpointed) on its own, so that the receivers' activations too are alive for one
        range at a time (as Anemoi's chunked mappers).
        """
        edge_features = edge_features.to(receivers_latent.dtype)
        chunks = min(self.config.edge_chunks, receivers_latent.shape[0])
        if chunks == 1:
            return self._maybe_checkpoint(mapper, senders_latent, receivers_latent,
                                          edge_features, senders, receivers)
        node_bounds = np.linspace(0, receivers_latent.shape[0], chunks + 1).round()
        edge_bounds = torch.searchsorted(
            receivers, torch.as_tensor(node_bounds, dtype=receivers.dtype,
                                       device=receivers.device)).tolist()
        parts = []
        for index in range(chunks):
            first, last = int(node_bounds[index]), int(node_bounds[index + 1])
            edges = slice(edge_bounds[index], edge_bounds[index + 1])
            parts.append(self._maybe_checkpoint(
                mapper, senders_latent, receivers_latent[first:last], edge_features[edges],
                senders[edges], receivers[edges] - first))
        return torch.cat(parts)

    def _embed_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, lat, lon) -> grid latents (lat*lon, batch, latent), lat-major."""
        grid = x.flatten(2).permute(2, 0, 1)  # (lat*lon, batch, channels)
        features = self.grid_node_features.to(x.dtype)[:, None].expand(-1, x.shape[0], -1)
        return self.grid_embed(torch.cat([grid, features], dim=-1))

    def _process(self, mesh: torch.Tensor) -> torch.Tensor:
        """The processor: ``processor_layers`` steps on the multi-mesh."""
        senders, receivers = self.mesh_senders, self.mesh_receivers
        if self.config.processor == "transformer":
            features = self.mesh_edge_features.to(mesh.dtype)
            for layer in self.processor:
                mesh = self._maybe_checkpoint(layer, mesh, features, senders, receivers)
            return mesh
        edges = self.mesh_edge_embed(self.mesh_edge_features.to(mesh.dtype))[:, None]
        for index, layer in enumerate(self.processor):
            last = index == len(self.processor) - 1  # its edge update would be thrown away
            mesh, edges = self._maybe_checkpoint(layer, mesh, mesh, edges, senders, receivers,
                                                 not last)
        return mesh

    def largest_activation(self) -> int:
        """Elements of the largest tensor of one sample's forward pass: the latent of the
        largest node or edge set (encoder and decoder edges per edge chunk)."""
        chunks = self.config.edge_chunks
        rows = max(self.grid_node_features.shape[0], len(self.mesh_senders),
                   -(-len(self.grid2mesh_senders) // chunks),
                   -(-len(self.mesh2grid_senders) // chunks))
        return rows * self.config.latent_size

    def forward(self, x: torch.Tensor, lead_time_hours: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(batch, in_channels, lat, lon) -> (batch, out_channels, lat, lon).

        ``lead_time_hours`` is accepted for interface compatibility and unused: one graph
        network serves one time step.
        """
        if self.config.processor == "gnn" and not torch.is_grad_enabled():
            return gnn_forward_without_grad(self, x, self._inference_constants(x))
        batch = x.shape[0]
        grid = self._maybe_checkpoint(self._embed_grid, x)
        mesh = self.mesh_embed(self.mesh_node_features.to(x.dtype))[:, None]
        mesh = mesh.expand(-1, batch, -1)
        if self.config.processor == "transformer":
            mesh = self._attend(self.encoder, grid, mesh, self.grid2mesh_edge_features,
                                self.grid2mesh_senders, self.grid2mesh_receivers)
        else:
            mesh = self._map(self.encoder, self.g2m_edge_embed, self.grid2mesh_edge_features,
                             grid, mesh, self.grid2mesh_senders, self.grid2mesh_receivers)
            grid = grid + self._maybe_checkpoint(self.grid_update, grid)
        mesh = self._process(mesh)
        if self.config.processor == "transformer":
            grid = self._attend(self.decoder, mesh, grid, self.mesh2grid_edge_features,
                                self.mesh2grid_senders, self.mesh2grid_receivers)
        else:
            grid = self._map(self.decoder, self.m2g_edge_embed, self.mesh2grid_edge_features,
                             mesh, grid, self.mesh2grid_senders, self.mesh2grid_receivers)
        out = self._maybe_checkpoint(self.output, grid)  # (lat*lon, batch, out)
        return out.permute(1, 2, 0).reshape(batch, -1, self.n_latitude, self.n_longitude)

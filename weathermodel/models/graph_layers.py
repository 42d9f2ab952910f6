"""Building blocks of the graph network: GraphCast's MLP, gathers onto edges and sums into
nodes over a node-major layout (see :mod:`weathermodel.models.graph`)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


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


def gather_nodes(nodes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of node values ``(nodes, *rest)`` -> ``(len(index), *rest)``.

    An ``index_select`` along dim 0 of the 2-D view ``(nodes, prod(rest))``; its backward is an
    ``index_add_`` along dim 0.
    """
    rows = nodes.reshape(nodes.shape[0], -1).index_select(0, index)
    return rows.view(index.shape[0], *nodes.shape[1:])


class _ScatterSum(torch.autograd.Function):
    """Sum over edges into nodes whose backward is a gather: it saves only the index, where
    autograd's ``index_add`` keeps every edge message alive for the backward pass."""

    @staticmethod
    def forward(ctx, messages: torch.Tensor, receivers: torch.Tensor,  # type: ignore[override]
                n_nodes: int) -> torch.Tensor:
        ctx.save_for_backward(receivers)
        rows = messages.reshape(messages.shape[0], -1)
        out = rows.new_zeros(n_nodes, rows.shape[1]).index_add_(0, receivers, rows)
        return out.view(n_nodes, *messages.shape[1:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (receivers,) = ctx.saved_tensors
        return gather_nodes(grad, receivers), None, None


def scatter_sum(messages: torch.Tensor, receivers: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Sum edge values ``(edges, *rest)`` into their receiving nodes: ``(n_nodes, *rest)``."""
    return _ScatterSum.apply(messages, receivers, n_nodes)


def edge_chunks(n_edges: int, chunks: int) -> list[slice]:
    """``chunks`` contiguous slices covering ``n_edges`` edges."""
    bounds = np.linspace(0, n_edges, max(1, min(chunks, n_edges)) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def uniform_degree(receivers: torch.Tensor, n_receivers: int) -> int | None:
    """``k`` when edges sorted by receiver give every receiver exactly ``k`` edges (edge ``e``
    goes into receiver ``e // k``, as ``mesh_to_grid: triangle`` makes), else None. Sums into
    such receivers are a reshape and a sum; their values reach the edges by broadcasting."""
    if n_receivers == 0 or receivers.numel() == 0 or receivers.numel() % n_receivers:
        return None
    degree = receivers.numel() // n_receivers
    expected = torch.arange(n_receivers, device=receivers.device).repeat_interleave(degree)
    return degree if torch.equal(receivers, expected) else None

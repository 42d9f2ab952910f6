"""The graph network's fast paths against brute-force references (tiny sizes, CPU, seconds).

Gathers (``index_select``) and scatter sums (``index_add_``) against dense incidence matrices;
chunked and checkpointed encoder / decoder against the plain path; the graph-transformer
processor against dense masked attention; the shipped checkpoints against outputs recorded
with the code they were trained with.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from weathermodel.configuration import from_dict
from weathermodel.errors import ConfigError
from weathermodel.models.config import GraphConfig
from weathermodel.models.graph_layers import uniform_degree
from weathermodel.models.graph import (GraphNetwork, GraphTransformerLayer,
                                       GraphTransformerMapper, InteractionNetwork, gather_nodes,
                                       scatter_sum)
from weathermodel.models.io import model_from_payload, read_payload

PROJECT = Path(__file__).resolve().parents[1]
LATITUDE = np.linspace(-90, 90, 19)  # 10-degree global grid: 19 x 36 points
LONGITUDE = np.arange(36) * 10.0


@pytest.fixture(autouse=True)
def graph_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path / "cache"))


def random_graph(n_senders: int, n_receivers: int, n_edges: int, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random edges with repeated receivers (so that sums really add several messages)."""
    generator = torch.Generator().manual_seed(seed)
    senders = torch.randint(0, n_senders, (n_edges,), generator=generator)
    receivers = torch.randint(0, n_receivers, (n_edges,), generator=generator)
    return senders, receivers


def one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, n).double()  # (edges, nodes)


def test_gather_and_scatter_equal_dense_incidence_products() -> None:
    senders, receivers = random_graph(7, 5, 40)
    nodes = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    messages = torch.randn(40, 3, 4, dtype=torch.float64, requires_grad=True)
    gathered = gather_nodes(nodes, senders)
    summed = scatter_sum(messages, receivers, 5)
    dense_gathered = torch.einsum("en,nbd->ebd", one_hot(senders, 7), nodes)
    dense_summed = torch.einsum("en,ebd->nbd", one_hot(receivers, 5), messages)
    torch.testing.assert_close(gathered, dense_gathered, rtol=0, atol=1e-12)
    torch.testing.assert_close(summed, dense_summed, rtol=0, atol=1e-12)
    weights = torch.randn(40, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    fast = torch.autograd.grad((gathered * weights[0]).sum() + (summed * weights[1]).sum(),
                               (nodes, messages))
    dense = torch.autograd.grad((dense_gathered * weights[0]).sum()
                                + (dense_summed * weights[1]).sum(), (nodes, messages))
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda m: scatter_sum(m, receivers, 5), (messages,))


def test_interaction_network_equals_dense_reference() -> None:
    """Values and gradients of the split first layer, gathers and sums against concatenated
    edge inputs and incidence matrices; receivers sum the messages, not the updated edges."""
    torch.manual_seed(0)
    latent, n_send, n_recv, batch = 6, 9, 4, 2
    senders, receivers = random_graph(n_send, n_recv, 30)
    network = InteractionNetwork(latent, 1).double()
    s = torch.randn(n_send, batch, latent, dtype=torch.float64, requires_grad=True)
    r = torch.randn(n_recv, batch, latent, dtype=torch.float64, requires_grad=True)
    e = torch.randn(30, 1, latent, dtype=torch.float64, requires_grad=True)
    new_r, new_e = network(s, r, e, senders, receivers)
    edge_inputs = torch.cat([e.expand(-1, batch, -1),
                             torch.einsum("en,nbd->ebd", one_hot(senders, n_send), s),
                             torch.einsum("en,nbd->ebd", one_hot(receivers, n_recv), r)], -1)
    message = network.edge_mlp(edge_inputs)
    aggregated = torch.einsum("en,ebd->nbd", one_hot(receivers, n_recv), message)
    ref_r = r + network.node_mlp(torch.cat([r, aggregated], -1))
    ref_e = e + message
    torch.testing.assert_close(new_r, ref_r)
    torch.testing.assert_close(new_e, ref_e)
    parameters = (s, r, e, *network.parameters())
    fast = torch.autograd.grad(new_r.square().sum() + new_e.sum(), parameters)
    dense = torch.autograd.grad(ref_r.square().sum() + ref_e.sum(), parameters)
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a, b)
    only_nodes, no_edges = network(s, r, e, senders, receivers, update_edges=False)
    assert no_edges is None and torch.equal(only_nodes, new_r)


def tiny_network(seed: int = 0, **options) -> GraphNetwork:
    torch.manual_seed(seed)
    config = from_dict(GraphConfig, {"mesh_refinement": 1, "latent_size": 8,
                                     "processor_layers": 2, **options})
    return GraphNetwork(config, 3, 2, LATITUDE, LONGITUDE).double()


def values_and_gradients(network: GraphNetwork, checkpointing: bool
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    network.activation_checkpointing = checkpointing
    network.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 19, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = network(x)
    (out.square().mean() + out.mean()).backward()
    return out.detach(), {name: p.grad.clone() for name, p in network.named_parameters()}


@pytest.mark.parametrize("processor", ["gnn", "transformer"])
def test_chunked_and_checkpointed_equal_the_plain_path(processor: str) -> None:
    reference_out, reference_grads = values_and_gradients(
        tiny_network(processor=processor), checkpointing=False)
    for chunks, checkpointing in ((3, False), (1, True), (4, True)):
        out, grads = values_and_gradients(
            tiny_network(processor=processor, edge_chunks=chunks), checkpointing)
        torch.testing.assert_close(out, reference_out, rtol=1e-10, atol=1e-12)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            assert torch.count_nonzero(grad) > 0, name
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-9, atol=1e-12,
                                       msg=f"{name}: chunks {chunks}, checkpointing "
                                           f"{checkpointing}")


def saved_activations(network: GraphNetwork) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes and shapes of the tensors autograd keeps for the backward pass of one forward
    pass, outside checkpointed pieces (storages of parameters and buffers excluded, each
    storage counted once)."""
    def storage(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    known = {storage(t) for t in (*network.parameters(), *network.buffers())}
    sizes: dict[int, int] = {}
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if storage(tensor) not in known:
            sizes[storage(tensor)] = tensor.untyped_storage().nbytes()
            shapes.append(tuple(tensor.shape))
        return tensor

    x = torch.randn(1, 3, 19, 36, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(x).sum()
    return sum(sizes.values()), shapes


def test_checkpointing_keeps_no_edge_activations_of_encoder_and_decoder() -> None:
    """With checkpointing the encoder's and decoder's per-edge activations are recomputed in
    the backward pass, chunk by chunk, never kept (they once were, whole)."""
    network = tiny_network(edge_chunks=4)
    plain, plain_shapes = saved_activations(network)
    network.activation_checkpointing = True
    checkpointed, shapes = saved_activations(network)
    latent = network.config.latent_size
    edge_counts = set()
    for senders in (network.grid2mesh_senders, network.mesh2grid_senders):
        edge_counts |= {len(senders), *(len(c) for c in senders.tensor_split(4))}
    def edge_latents(found: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [shape for shape in found if shape[0] in edge_counts and shape[-1] == latent]

    assert edge_latents(plain_shapes)  # the plain path keeps them
    assert not edge_latents(shapes), edge_latents(shapes)
    assert checkpointed < 0.25 * plain, (checkpointed, plain)


def dense_graph_attention(layer: GraphTransformerLayer, nodes: torch.Tensor,
                          edge_features: torch.Tensor, senders: torch.Tensor,
                          receivers: torch.Tensor,
                          sender_nodes: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's equations with a dense (receivers x senders) score matrix, -inf off-graph
    (distinct edges), and torch's softmax; ``sender_nodes`` for a mapper."""
    n, batch, latent = nodes.shape
    heads, head = layer.heads, latent // layer.heads
    if sender_nodes is None:
        q, k, v, self_term = layer.query_key_value_self(layer.norm_attention(nodes)).chunk(4, -1)
        m = n
    else:
        q, self_term = layer.query_self(layer.norm_attention(nodes)).chunk(2, -1)
        k, v = layer.key_value(layer.norm_senders(sender_nodes)).chunk(2, -1)
        m = sender_nodes.shape[0]
    f = torch.zeros(n, m, latent, dtype=nodes.dtype)  # f[i, j]: edge j -> i
    f[receivers, senders] = layer.edge_projection(edge_features)
    adjacency = torch.zeros(n, m, dtype=torch.bool)
    adjacency[receivers, senders] = True
    q = q.reshape(n, batch, heads, head)
    k = k.reshape(m, batch, heads, head)[None] + f.view(n, m, 1, heads, head)  # (i, j, b, h, d)
    v = v.reshape(m, batch, heads, head)[None] + f.view(n, m, 1, heads, head)
    scores = torch.einsum("ibhd,ijbhd->ijbh", q, k) * head ** -0.5
    scores = scores.masked_fill(~adjacency[:, :, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=1)
    attended = torch.einsum("ijbh,ijbhd->ibhd", weights, v).reshape(n, batch, latent)
    out = nodes + layer.output_projection(attended + self_term)
    return out + layer.mlp(layer.norm_mlp(out))


def test_graph_transformer_mapper_equals_dense_masked_attention() -> None:
    """Receivers attend to another node set; every receiver has at least one edge."""
    torch.manual_seed(0)
    n_send, n_recv = 7, 4
    pairs = sorted({(j, i) for i in range(n_recv) for j in range(n_send) if (i + 2 * j) % 3}
                   | {(i, i) for i in range(n_recv)})
    senders = torch.tensor([p[0] for p in pairs])
    receivers = torch.tensor([p[1] for p in pairs])
    mapper = GraphTransformerMapper(8, 2, 3, 1, edge_chunks=2).double()
    sender_nodes = torch.randn(n_send, 2, 8, dtype=torch.float64, requires_grad=True)
    receiver_nodes = torch.randn(n_recv, 2, 8, dtype=torch.float64, requires_grad=True)
    features = torch.randn(len(pairs), 3, dtype=torch.float64)
    out = mapper(sender_nodes, receiver_nodes, features, senders, receivers)
    reference = dense_graph_attention(mapper, receiver_nodes, features, senders, receivers,
                                      sender_nodes)
    torch.testing.assert_close(out, reference)
    parameters = (sender_nodes, receiver_nodes, *mapper.parameters())
    fast = torch.autograd.grad(out.square().sum(), parameters)
    dense = torch.autograd.grad(reference.square().sum(), parameters)
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a, b)


def tiny_transformer_layer() -> tuple[GraphTransformerLayer, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    n = 6
    pairs = [(j, i) for i in range(n) for j in range(n) if j != i and (i + j) % 3]
    senders = torch.tensor([p[0] for p in pairs])
    receivers = torch.tensor([p[1] for p in pairs])
    layer = GraphTransformerLayer(8, 2, 3, 1).double()
    nodes = 2 * torch.randn(n, 2, 8, dtype=torch.float64)
    features = torch.randn(len(pairs), 3, dtype=torch.float64)
    return layer, nodes, features, senders, receivers


@pytest.mark.parametrize("edge_chunks", [1, 3])
def test_graph_transformer_layer_equals_dense_masked_attention(edge_chunks: int) -> None:
    layer, nodes, features, senders, receivers = tiny_transformer_layer()
    layer.edge_chunks = edge_chunks
    nodes.requires_grad_(True)
    out = layer(nodes, features, senders, receivers)
    reference = dense_graph_attention(layer, nodes, features, senders, receivers)
    assert out.shape == nodes.shape
    torch.testing.assert_close(out, reference)
    parameters = (nodes, *layer.parameters())
    fast = torch.autograd.grad(out.square().sum(), parameters)
    dense = torch.autograd.grad(reference.square().sum(), parameters)
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a, b)
    # huge scores do not overflow: the softmax is shifted per receiver
    with torch.no_grad():
        layer.query_key_value_self.weight.mul_(1e3)
    assert torch.isfinite(layer(nodes, features, senders, receivers)).all()


def test_graph_transformer_layer_is_permutation_equivariant() -> None:
    layer, nodes, features, senders, receivers = tiny_transformer_layer()
    permutation = torch.randperm(nodes.shape[0], generator=torch.Generator().manual_seed(3))
    new_label = torch.empty_like(permutation)
    new_label[permutation] = torch.arange(len(permutation))  # node p[k] is called k
    edge_order = torch.randperm(len(senders), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = layer(nodes, features, senders, receivers)
        permuted = layer(nodes[permutation], features[edge_order], new_label[senders[edge_order]],
                         new_label[receivers[edge_order]])
    torch.testing.assert_close(permuted, out[permutation])


def test_graph_transformer_processor_learns() -> None:
    network = tiny_network(processor="transformer").float()
    assert all(isinstance(layer, GraphTransformerLayer) for layer in network.processor)
    assert not hasattr(network, "mesh_edge_embed")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 19, 36, generator=generator)
    target = 0.5 * x[:, :2] + 0.3
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(network(x), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        for name, parameter in network.processor.named_parameters():
            assert torch.count_nonzero(parameter.grad) > 0, name
    assert network(x).shape == (2, 2, 19, 36)
    assert losses[-1] < 0.75 * losses[0], losses


def test_bad_graph_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="edge_chunks"):
        from_dict(GraphConfig, {"edge_chunks": 0})
    with pytest.raises(ConfigError, match="attention_heads"):
        from_dict(GraphConfig, {"processor": "transformer", "latent_size": 10,
                                "attention_heads": 4})
    with pytest.raises(ConfigError, match="processor"):
        from_dict(GraphConfig, {"processor": "attention"})


# Outputs of the shipped checkpoints' networks on a seeded input (2 samples, lead 6 h),
# computed with the network code these checkpoints were trained with (before the index_select /
# index_add_ layout, chunking and the transformer mask cache): sum, sum of absolute values and
# five values at evenly spaced flat indices.
SHIPPED_OUTPUTS = {
    "ncep_graph_2013": (1141.759537447244, 2793.691140267998,
                        [0.07449336349964142, 2.8189141750335693, -1.6440832614898682,
                         0.1660328507423401, -1.3682405948638916]),
    "speedy_transformer_2000": (3372.407879543258, 181832.9918768999,
                                [2.771448850631714, 0.4997399151325226, -0.5525978803634644,
                                 -0.36291128396987915, 0.5481383204460144]),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_OUTPUTS))
def test_shipped_checkpoints_give_the_outputs_they_gave_before(name: str, tmp_path: Path) -> None:
    path = PROJECT / "checkpoints" / name / "model.pt"
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    network = model_from_payload(read_payload(path), path, cache_dir=tmp_path).network.eval()
    in_channels = (network.in_channels if hasattr(network, "in_channels") else
                   network.grid_embed[0].in_features - network.grid_node_features.shape[1])
    x = torch.randn(2, in_channels, network.n_latitude, network.n_longitude,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = network(x, torch.full((2,), 6.0)).double()
    total, absolute, values = SHIPPED_OUTPUTS[name]
    flat = out.flatten()
    index = torch.linspace(0, flat.numel() - 1, 5).long()
    np.testing.assert_allclose(flat[index].numpy(), values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([float(out.sum()), float(out.abs().sum())], [total, absolute],
                               rtol=1e-5)


@pytest.mark.parametrize("hidden_layers, chunks", [(0, 1), (1, 1), (2, 1), (1, 3)])
def test_forward_without_grad_reuses_constants_and_equals_the_autograd_path(
        hidden_layers: int, chunks: int) -> None:
    """The gnn forward without gradients (constants computed once, in-place activations,
    encoder and decoder edges in ``edge_chunks``) equals the autograd path, for a batch of
    several samples; its constants are recomputed after the weights change in place or are
    replaced, and after a dtype change."""
    torch.manual_seed(0)
    network = tiny_network(mlp_hidden_layers=hidden_layers, edge_chunks=chunks)
    x = torch.randn(3, 3, 19, 36, dtype=torch.float64)
    with torch.no_grad():
        fast = network(x)
        constants = network._constants
        assert constants.decoder_degree == 3  # triangle: sums into grid nodes are reshapes
        assert network(x) is not fast and network._constants is constants  # reused
    torch.testing.assert_close(fast, network(x).detach(), rtol=1e-10, atol=1e-12)
    assert not torch.equal(fast[0], fast[1])  # the samples of the batch stay apart
    with torch.no_grad():
        network.decoder.edge_mlp[0].weight.mul_(1.5)  # in place, as an optimizer step does
        changed = network(x)
        assert network._constants is not constants
    torch.testing.assert_close(changed, network(x).detach(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(changed, fast)
    other = tiny_network(seed=1, mlp_hidden_layers=hidden_layers, edge_chunks=chunks)
    network.load_state_dict(other.state_dict())  # copied in place into the same parameters
    with torch.no_grad():
        loaded = network(x)
    assert not torch.allclose(loaded, changed)
    torch.testing.assert_close(loaded, other(x).detach(), rtol=1e-10, atol=1e-12)
    first = network.decoder.edge_mlp[0]  # a parameter object replaced in its module
    first.weight = torch.nn.Parameter(first.weight.detach() * 0.5)
    with torch.no_grad():
        replaced = network(x)
    assert not torch.allclose(replaced, loaded)
    torch.testing.assert_close(replaced, network(x).detach(), rtol=1e-10, atol=1e-12)
    network.decoder = copy.deepcopy(other.decoder)  # a submodule replaced
    with torch.no_grad():
        swapped = network(x)
    torch.testing.assert_close(swapped, loaded, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        single = network.float()(x.float())
    torch.testing.assert_close(single, other(x).float().detach(), rtol=1e-5, atol=1e-5)


def test_uniform_degree_only_for_receiver_ordered_equal_degrees() -> None:
    """Reshape sums are used only where edge ``e`` goes into receiver ``e // k``."""
    assert uniform_degree(torch.tensor([0, 0, 0, 1, 1, 1]), 2) == 3
    assert uniform_degree(torch.tensor([0, 0, 1, 1, 1, 0]), 2) is None  # unsorted
    assert uniform_degree(torch.tensor([0, 0, 1, 1, 1, 1]), 2) is None  # unequal degrees
    assert uniform_degree(torch.tensor([0, 0, 2, 2]), 3) is None  # a receiver without edges
    network = tiny_network(mesh_to_grid="knn")
    receivers = network.mesh2grid_receivers
    assert uniform_degree(receivers, network.grid_node_features.shape[0]) == 3

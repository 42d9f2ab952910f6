"""Training speed and peak memory of our graph network next to ECMWF Anemoi's (GNN and graph
transformer), in one run.

Four networks on the same global equiangular grid (default 2 degrees, 91 x 180), the same
icosahedral multi-mesh, width, processor depth and channels: ours with ``processor: gnn`` and
``processor: transformer``, Anemoi's (anemoi-models 0.19, its own layers: ``GNNForwardMapper``,
``GNNProcessor``, ``GNNBackwardMapper``; ``GraphTransformerForwardMapper``,
``GraphTransformerProcessor``, ``GraphTransformerBackwardMapper``, pyg attention backend, triton
being CUDA-only). Anemoi's layers are given OUR graph (the same grid->mesh, mesh and mesh->grid
edges, sorted by receiver as Anemoi's graph providers deliver them, and the same four edge
features and node features), so the edge counts are identical; one hidden layer per MLP and MLP
hidden width = latent on both sides (Anemoi ``mlp_extra_layers=0``, ``mlp_hidden_ratio=1``),
``num_heads`` = ours ``attention_heads``, no trainable edge parameters. Batch 1, float32, AdamW,
MSE, random inputs and targets, ``torch.set_num_threads`` equal for all.

Speed: after warm-up, full training steps of the four alternate in a rotating order (so all share
the machine's noise); medians are compared, with activation checkpointing off on both sides.
Each step's CPU time of the process (``time.process_time``: one torch thread, so the work done,
whatever else the machine runs) and wall time are recorded. Prints
``RATIO graph_step_time_ours_gnn_vs_anemoi_gnn`` (goal <= 0.8) and
``RATIO graph_step_time_ours_transformer_vs_anemoi_transformer`` (goal <= 1.0), of the median
CPU times, with the ratio of the median wall times beside them.

Memory: the peak of ONE training step (the first: it also allocates AdamW's state) with
activation checkpointing ON on both sides (ours: encoder chunk by chunk, each processor layer,
decoder chunk by chunk; Anemoi: each mapper, each processor layer, the same edge chunk count
``num_chunks``), each network in a fresh subprocess: the model, data and optimizer are built,
the high-water mark is reset (``/proc/self/clear_refs``), one step runs, and VmHWM minus the
VmRSS just before the step is reported (glibc's mmap threshold fixed so that freed blocks return
to the system alike for both). Prints ``RATIO graph_peak_memory_ours_gnn_vs_anemoi_gnn`` and
``RATIO graph_peak_memory_ours_transformer_vs_anemoi_transformer`` (goal <= 1).

Needs the peer environment (CPU torch 2.13.0; anemoi-models and anemoi-graphs installed with
--no-deps, see setup_peer_env.sh):

    bash benchmarks/setup_peer_env.sh
    .venv-bench/bin/python benchmarks/bench_graph_vs_anemoi.py

Without it, it says so and exits 0 without a RATIO line.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_graph_vs_physicsnemo import (Trainer, grid_shape, measure_in_child,  # noqa: E402
                                        n_params, proc_status_kib)

PEER_MISSING = ("peer not installed: run benchmarks/setup_peer_env.sh, then "
                ".venv-bench/bin/python benchmarks/bench_graph_vs_anemoi.py")
MEMORY_TAG = "MEMORY_JSON "
MODELS = ("ours_gnn", "anemoi_gnn", "ours_transformer", "anemoi_transformer")


def peer_available() -> bool:
    return all(importlib.util.find_spec(name) is not None
               for name in ("anemoi.models", "torch_geometric"))


def build_ours(args, processor: str, n_lat: int, n_lon: int, cache_dir: str,
               checkpointing: bool):
    import numpy as np
    from weathermodel.models.config import GraphConfig
    from weathermodel.models.graph import GraphNetwork

    config = GraphConfig(mesh_refinement=args.mesh_level, latent_size=args.latent,
                         processor_layers=args.layers, mlp_hidden_layers=1,
                         processor=processor, attention_heads=args.heads,
                         edge_chunks=args.chunks if checkpointing else 1)
    latitude = np.linspace(-90.0, 90.0, n_lat)
    longitude = np.arange(n_lon) * (360.0 / n_lon)
    return GraphNetwork(config, args.channels, args.channels, latitude, longitude,
                        activation_checkpointing=checkpointing, cache_dir=cache_dir)


def build_anemoi(args, kind: str, ours, checkpointing: bool):
    """Anemoi's encoder, processor and decoder layers wired as its AnemoiModelEncProcDec does,
    on our network's graph."""
    import torch
    from anemoi.models.distributed.shapes import BipartiteGraphShardInfo, GraphShardInfo
    from anemoi.models.layers.mapper import (GNNBackwardMapper, GNNForwardMapper,
                                             GraphTransformerBackwardMapper,
                                             GraphTransformerForwardMapper)
    from anemoi.models.layers.processor import GNNProcessor, GraphTransformerProcessor
    from anemoi.models.layers.utils import load_layer_kernels
    from torch import nn

    class AnemoiNetwork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kind = kind
            edge_sets = {"g2m": ("grid2mesh", ours.grid2mesh_edge_features),
                         "mesh": ("mesh", ours.mesh_edge_features),
                         "m2g": ("mesh2grid", ours.mesh2grid_edge_features)}
            for name, (prefix, features) in edge_sets.items():
                senders = getattr(ours, f"{prefix}_senders")
                receivers = getattr(ours, f"{prefix}_receivers")
                order = torch.argsort(receivers, stable=True)
                self.register_buffer(f"{name}_index",
                                     torch.stack([senders[order], receivers[order]]),
                                     persistent=False)
                self.register_buffer(f"{name}_edge_attr", features[order].contiguous(),
                                     persistent=False)
            self.register_buffer("grid_attr", ours.grid_node_features.clone(), persistent=False)
            self.register_buffer("mesh_attr", ours.mesh_node_features.clone(), persistent=False)
            self.n_lat, self.n_lon, self.n_mesh = ours.n_latitude, ours.n_longitude, ours.n_mesh
            latent, layers = args.latent, args.layers
            chunks = args.chunks if checkpointing else 1
            edge_dim = self.g2m_edge_attr.shape[1]
            source = args.channels + self.grid_attr.shape[1]
            common = {"layer_kernels": load_layer_kernels(instance=False),
                      "gradient_checkpointing": checkpointing, "edge_dim": edge_dim}
            if kind == "gnn":
                self.encoder = GNNForwardMapper(
                    in_channels_src=source, in_channels_dst=self.mesh_attr.shape[1],
                    num_channels=latent, num_chunks=chunks, mlp_extra_layers=0, **common)
                self.processor = GNNProcessor(num_channels=latent, num_layers=layers,
                                              num_chunks=layers, mlp_extra_layers=0, **common)
                self.decoder = GNNBackwardMapper(
                    in_channels_src=latent, in_channels_dst=latent, num_channels=latent,
                    out_channels_dst=args.channels, num_chunks=chunks, mlp_extra_layers=0,
                    **common)
            else:
                attention = {"num_heads": args.heads, "mlp_hidden_ratio": 1.0,
                             "graph_attention_backend": "pyg", **common}
                self.encoder = GraphTransformerForwardMapper(
                    in_channels_src=source, in_channels_dst=self.mesh_attr.shape[1],
                    num_channels=latent, num_chunks=chunks, **attention)
                self.processor = GraphTransformerProcessor(
                    num_channels=latent, num_layers=layers, num_chunks=layers, **attention)
                self.decoder = GraphTransformerBackwardMapper(
                    in_channels_src=latent, in_channels_dst=source, num_channels=latent,
                    out_channels_dst=args.channels, num_chunks=chunks, **attention)

        def forward(self, x):
            if x.shape[0] != 1:
                raise ValueError("batch 1 only")
            data = torch.cat([x.flatten(2)[0].T, self.grid_attr], dim=-1)
            bipartite = BipartiteGraphShardInfo()
            data_latent, mesh = self.encoder((data, self.mesh_attr), batch_size=1,
                                             shard_info=bipartite, edge_attr=self.g2m_edge_attr,
                                             edge_index=self.g2m_index)
            mesh = self.processor(mesh, batch_size=1,
                                  shard_info=GraphShardInfo(nodes=[self.n_mesh]),
                                  edge_attr=self.mesh_edge_attr, edge_index=self.mesh_index)
            # Anemoi's GNN decoder takes the embedded grid, its transformer decoder the raw one
            target = data_latent if self.kind == "gnn" else data
            out = self.decoder((mesh, target), batch_size=1, shard_info=bipartite,
                               edge_attr=self.m2g_edge_attr, edge_index=self.m2g_index)
            return out.T.reshape(1, -1, self.n_lat, self.n_lon)

    return AnemoiNetwork()


def build(args, which: str, n_lat: int, n_lon: int, cache_dir: str, checkpointing: bool):
    processor = "gnn" if which.endswith("gnn") else "transformer"
    ours = build_ours(args, processor, n_lat, n_lon, cache_dir, checkpointing)
    if which.startswith("ours"):
        return ours
    import torch

    torch.manual_seed(0)
    return build_anemoi(args, "gnn" if processor == "gnn" else "transformer", ours,
                        checkpointing)


def memory_child(args) -> None:
    """Runs in a fresh process: peak memory of one training step of one model."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_lat, n_lon = grid_shape(args.resolution)
    model = build(args, args.memory_child, n_lat, n_lon, args.cache_dir, checkpointing=True)
    trainer = Trainer(args.memory_child, model, args.channels, n_lat, n_lon, seed=1)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        reset = True
    except OSError:
        reset = False
    before = proc_status_kib("VmRSS")["VmRSS"]
    step_s = trainer.step()
    after = proc_status_kib("VmHWM")
    print(MEMORY_TAG + json.dumps({
        "model": args.memory_child, "params": n_params(model), "rss_before_mib": before / 1024,
        "peak_mib": after["VmHWM"] / 1024, "hwm_reset": reset, "step_s": step_s}), flush=True)


def run_memory_child(args, which: str, cache_dir: str) -> dict | str:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", which,
               "--resolution", str(args.resolution), "--mesh-level", str(args.mesh_level),
               "--latent", str(args.latent), "--layers", str(args.layers),
               "--channels", str(args.channels), "--heads", str(args.heads),
               "--chunks", str(args.chunks), "--threads", str(args.threads),
               "--cache-dir", cache_dir]
    return measure_in_child(command, args.memory_timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=float, default=2.0, help="grid spacing, degrees")
    parser.add_argument("--mesh-level", type=int, default=5, help="icosahedral refinement")
    parser.add_argument("--latent", type=int, default=64, help="latent width")
    parser.add_argument("--layers", type=int, default=4, help="processor layers")
    parser.add_argument("--channels", type=int, default=16, help="input = output channels")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--chunks", type=int, default=4,
                        help="encoder/decoder edge chunks when checkpointing (both sides)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each model")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--skip-memory", action="store_true", help="speed only")
    parser.add_argument("--skip-speed", action="store_true", help="memory only")
    parser.add_argument("--memory-timeout", type=int, default=600)
    parser.add_argument("--memory-child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if not peer_available():
        print(PEER_MISSING)
        return 0
    if args.memory_child:
        memory_child(args)
        return 0

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # Anemoi's "triton is not available" notes
    import torch

    run_begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    n_lat, n_lon = grid_shape(args.resolution)
    print(f"torch {torch.__version__}, anemoi-models {metadata.version('anemoi-models')}, "
          f"torch-geometric {metadata.version('torch-geometric')}, python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}")
    print(f"config: grid {args.resolution:g} deg ({n_lat} x {n_lon}), mesh level "
          f"{args.mesh_level} (multi-mesh, the same graph for all), latent {args.latent}, "
          f"processor layers {args.layers}, heads {args.heads}, channels {args.channels}, "
          f"batch 1, float32, AdamW(lr=1e-4), MSE")
    with tempfile.TemporaryDirectory(prefix="bench-anemoi-") as cache_dir:
        trainers = []
        for which in ([] if args.skip_speed else MODELS):
            torch.manual_seed(0)
            model = build(args, which, n_lat, n_lon, cache_dir, checkpointing=False)
            trainers.append(Trainer(which, model, args.channels, n_lat, n_lon, seed=1))
            if which == "ours_gnn":
                print(f"graph: grid nodes {n_lat * n_lon:,}, mesh nodes {model.n_mesh:,}, "
                      f"mesh edges {model.mesh_senders.numel():,}, grid2mesh edges "
                      f"{model.grid2mesh_senders.numel():,}, mesh2grid edges "
                      f"{model.mesh2grid_senders.numel():,}")
        for trainer in trainers:
            print(f"{trainer.name:19s}: {n_params(trainer.model):>9,} params")
            for _ in range(args.warmup):
                trainer.step()
        cpu_times: dict[str, list[float]] = {trainer.name: [] for trainer in trainers}
        for index in range(args.steps if trainers else 0):
            shift = index % len(trainers)
            for trainer in trainers[shift:] + trainers[:shift]:
                begin = time.process_time()
                trainer.times.append(trainer.step())
                cpu_times[trainer.name].append(time.process_time() - begin)
        cpu, wall = {}, {}
        for trainer in trainers:
            cpu[trainer.name] = statistics.median(cpu_times[trainer.name])
            wall[trainer.name] = statistics.median(trainer.times)
            print(f"{trainer.name:19s}: median step CPU {cpu[trainer.name] * 1e3:7.1f} ms (min "
                  f"{min(cpu_times[trainer.name]) * 1e3:7.1f}), wall "
                  f"{wall[trainer.name] * 1e3:7.1f} ms (min {min(trainer.times) * 1e3:7.1f}), "
                  f"{len(trainer.times)} steps, last loss {trainer.loss:.4f}")
        for kind, goal in (("gnn", 0.8), ("transformer", 1.0)):
            if trainers:
                ours, peer = f"ours_{kind}", f"anemoi_{kind}"
                print(f"RATIO graph_step_time_ours_{kind}_vs_anemoi_{kind} "
                      f"{cpu[ours] / cpu[peer]:.2f} (CPU time; wall {wall[ours] / wall[peer]:.2f};"
                      f" goal <= {goal})")
        if trainers:
            print(f"(ours transformer vs Anemoi GNN, CPU time: "
                  f"{cpu['ours_transformer'] / cpu['anemoi_gnn']:.2f})")
        del trainers
        gc.collect()

        if not args.skip_memory:
            print(f"peak memory of one training step (the first, AdamW state included), "
                  f"activation checkpointing on in both, {args.chunks} edge chunks, each "
                  f"model in a fresh process (VmHWM - VmRSS before the step):")
            increases = {}
            for which in MODELS:
                result = run_memory_child(args, which, cache_dir)
                if isinstance(result, str):
                    print(f"  {which:19s}: not measured: {result}")
                    continue
                increases[which] = result["peak_mib"] - result["rss_before_mib"]
                print(f"  {which:19s}: increase {increases[which]:7.0f} MiB (peak "
                      f"{result['peak_mib']:.0f} MiB, before {result['rss_before_mib']:.0f} "
                      f"MiB), step {result['step_s']:.1f} s")
            for kind in ("gnn", "transformer"):
                if f"ours_{kind}" in increases and f"anemoi_{kind}" in increases:
                    print(f"RATIO graph_peak_memory_ours_{kind}_vs_anemoi_{kind} "
                          f"{increases[f'ours_{kind}'] / increases[f'anemoi_{kind}']:.2f} "
                          f"(goal <= 1)")
    print(f"total run time {time.perf_counter() - run_begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

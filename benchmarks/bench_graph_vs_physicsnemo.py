"""Training speed and peak memory of our graph network next to NVIDIA PhysicsNeMo's GraphCastNet.

Both networks are built in the same process on the same global equiangular grid, with the same
mesh refinement level (multi-mesh: edges of every level merged), latent width, processor layers,
one hidden layer per MLP, sum aggregation, SiLU and LayerNorm, the same input and output channels,
float32, batch 1 (PhysicsNeMo's GraphCastNet takes batch 1 only), random inputs and targets,
PhysicsNeMo's ``do_concat_trick=True`` (its first edge-MLP layer split over the sender, receiver
and edge inputs and applied per node, as ours always does: without it theirs would do 3x the
first layer's work per edge),
AdamW and a mean squared error loss. After warm-up steps, full training steps (zero_grad, forward,
loss, backward, optimizer step) of the two alternate (ours, peer, peer, ours, ...) so that both
share the machine's noise, with ``torch.set_num_threads`` fixed. Prints both parameter counts,
graph sizes, steps per second (from the median step time) and
``RATIO graph_ours_vs_physicsnemo_steps_per_s <x>`` (goal: at least 1). The defaults (2 degrees,
mesh level 4, latent 64, 4 processor layers, 16 channels, 20 steps) finish in about a minute and
a half on a 2-core CPU.

Grids: the same points for both. PhysicsNeMo 2.2.2 lays ``input_res=(n_lat, n_lon)`` out as
latitude ``linspace(-90, 90, n_lat)`` (ascending, poles included) and longitude
``linspace(-180, 180, n_lon + 1)[1:]``; ours gets ascending latitude -90..90 and longitude
0..360-d, its canonical order. The longitudes are the same set rolled by 180 degrees, which only
permutes grid nodes; the icosahedral meshes of the two may be oriented differently, so the
grid<->mesh edge counts (printed) differ slightly.

Then the peak memory of ONE training step (the first: it also allocates AdamW's state) at
``--memory-resolution`` (1 degree: 181 x 360) is measured for each network in a fresh subprocess:
the model, data and optimizer are built, the high-water mark is reset (``/proc/self/clear_refs``),
one step runs, and VmHWM is read from /proc/self/status (not getrusage: ru_maxrss survives
fork+exec on Linux). Prints the absolute peak and its increase over the process's VmRSS just
before the step, and ``RATIO graph_peak_memory_ours_vs_physicsnemo <x>`` (of the increases).

Needs the peer environment (CPU torch 2.13.0, nvidia-physicsnemo 2.2.2 with its PyG backend):

    bash benchmarks/setup_peer_env.sh
    .venv-bench/bin/python benchmarks/bench_graph_vs_physicsnemo.py

Without it (for instance under the project's .venv, as `make bench` runs it), it says so and
exits 0 without a RATIO line.
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
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

PEER_MISSING = ("peer not installed: run benchmarks/setup_peer_env.sh, then "
                ".venv-bench/bin/python benchmarks/bench_graph_vs_physicsnemo.py")
MEMORY_TAG = "MEMORY_JSON "


def peer_available() -> bool:
    return all(importlib.util.find_spec(name) is not None
               for name in ("physicsnemo", "torch_geometric", "torch_scatter", "sklearn"))


_TORCHVISION_SHIM = []


def import_graphcastnet():
    """PhysicsNeMo's GraphCastNet class, importable beside a CPU torch.

    PhysicsNeMo imports timm, which imports torchvision. The torchvision wheels reachable here
    are CUDA builds: their C++ extension cannot load beside the CPU torch 2.13.0, and torchvision
    0.28 then fails at import ("operator torchvision::nms does not exist") registering fake
    kernels for two operators the extension would have defined. GraphCastNet never calls
    torchvision, so when (and only when) the extension does not load, the two schemas are
    declared here first; calling them would still fail.
    """
    import glob

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is not None and not _TORCHVISION_SHIM:
        libraries = [path for folder in (spec.submodule_search_locations or [])
                     for path in glob.glob(os.path.join(folder, "_C*.so"))]
        try:
            if libraries:
                torch.ops.load_library(libraries[0])
        except OSError:
            library = torch.library.Library("torchvision", "DEF")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_SHIM.append(library)  # keep the registration alive
    from physicsnemo.models.graphcast.graph_cast_net import GraphCastNet

    return GraphCastNet


def grid_shape(resolution: float) -> tuple[int, int]:
    n_lat, n_lon = round(180 / resolution) + 1, round(360 / resolution)
    if abs((n_lat - 1) * resolution - 180) > 1e-6 or abs(n_lon * resolution - 360) > 1e-6:
        raise SystemExit(f"--resolution {resolution} does not divide 180 and 360")
    return n_lat, n_lon


def build_ours(args, n_lat: int, n_lon: int, cache_dir: str):
    import numpy as np
    from weathermodel.models.config import GraphConfig
    from weathermodel.models.graph import GraphNetwork

    config = GraphConfig(mesh_refinement=args.mesh_level, latent_size=args.latent,
                         processor_layers=args.layers, mlp_hidden_layers=1,
                         grid_to_mesh_radius=0.6, mesh_to_grid="triangle")
    config.validate()
    # Our canonical grid: ascending latitude -90..90, longitude 0..360-d.
    latitude = np.linspace(-90.0, 90.0, n_lat)
    longitude = np.arange(n_lon) * (360.0 / n_lon)
    model = GraphNetwork(config, args.channels, args.channels, latitude, longitude,
                         cache_dir=cache_dir)
    sizes = {"grid nodes": n_lat * n_lon, "mesh nodes": int(model.n_mesh),
             "mesh edges": int(model.mesh_senders.numel()),
             "grid2mesh edges": int(model.grid2mesh_senders.numel()),
             "mesh2grid edges": int(model.mesh2grid_senders.numel())}
    return model, sizes


def build_peer(args, n_lat: int, n_lon: int):
    GraphCastNet = import_graphcastnet()

    # input_res=(n_lat, n_lon): GraphCastNet 2.2.2 places its grid at
    # latitude linspace(-90, 90, n_lat) and longitude linspace(-180, 180, n_lon + 1)[1:].
    model = GraphCastNet(
        mesh_level=args.mesh_level, multimesh=True, input_res=(n_lat, n_lon),
        input_dim_grid_nodes=args.channels, input_dim_mesh_nodes=3, input_dim_edges=4,
        output_dim_grid_nodes=args.channels, processor_type="MessagePassing",
        processor_layers=args.layers, hidden_layers=1, hidden_dim=args.latent,
        aggregation="sum", activation_fn="silu", norm_type="LayerNorm",
        use_cugraphops_encoder=False, use_cugraphops_processor=False,
        use_cugraphops_decoder=False, do_concat_trick=True, recompute_activation=False,
        partition_size=1, graph_backend="pyg")
    g2m = model.g2m_graph[model.g2m_graph.edge_types[0]].edge_index
    m2g = model.m2g_graph[model.m2g_graph.edge_types[0]].edge_index
    sizes = {"grid nodes": n_lat * n_lon, "mesh nodes": int(model.mesh_ndata.shape[0]),
             "mesh edges": int(model.mesh_graph.edge_index.shape[1]),
             "grid2mesh edges": int(g2m.shape[1]), "mesh2grid edges": int(m2g.shape[1])}
    return model, sizes


class Trainer:
    """One model, its optimizer and a fixed random batch; ``step`` is one full training step."""

    def __init__(self, name: str, model, channels: int, n_lat: int, n_lon: int, seed: int):
        import torch

        self.name, self.model = name, model
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(1, channels, n_lat, n_lon, generator=generator)
        self.y = torch.randn(1, channels, n_lat, n_lon, generator=generator)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.model.train()
        self.times: list[float] = []
        self.loss = float("nan")

    def step(self) -> float:
        import torch

        begin = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.x)
        loss = torch.nn.functional.mse_loss(out, self.y)
        loss.backward()
        self.optimizer.step()
        elapsed = time.perf_counter() - begin
        self.loss = float(loss.detach())
        return elapsed


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def proc_status_kib(*keys: str) -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in keys:
                values[key] = int(line.split()[1])
    return values


def memory_child(args) -> None:
    """Runs in a fresh process: peak memory of one training step of one model."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_lat, n_lon = grid_shape(args.memory_resolution)
    begin = time.perf_counter()
    if args.memory_child == "ours":
        model, sizes = build_ours(args, n_lat, n_lon, args.cache_dir)
    else:
        model, sizes = build_peer(args, n_lat, n_lon)
    trainer = Trainer(args.memory_child, model, args.channels, n_lat, n_lon, seed=1)
    build_s = time.perf_counter() - begin
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    build_peak = proc_status_kib("VmHWM")["VmHWM"]
    # Reset the high-water mark to the current RSS so that graph construction does not count.
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        reset = True
    except OSError:
        reset = False
    before = proc_status_kib("VmRSS")["VmRSS"]
    step_s = trainer.step()
    after = proc_status_kib("VmHWM", "VmRSS")
    print(MEMORY_TAG + json.dumps({
        "model": args.memory_child, "grid": [n_lat, n_lon], "sizes": sizes,
        "params": n_params(model), "rss_before_mib": before / 1024,
        "peak_mib": after["VmHWM"] / 1024, "rss_after_mib": after["VmRSS"] / 1024,
        "build_peak_mib": build_peak / 1024, "hwm_reset": reset, "build_s": build_s,
        "step_s": step_s, "loss": trainer.loss}), flush=True)


def run_memory_child(args, which: str, cache_dir: str) -> dict | str:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", which,
               "--memory-resolution", str(args.memory_resolution),
               "--mesh-level", str(args.mesh_level), "--latent", str(args.latent),
               "--layers", str(args.layers), "--channels", str(args.channels),
               "--threads", str(args.threads), "--cache-dir", cache_dir]
    return measure_in_child(command, args.memory_timeout)


def measure_in_child(command: list[str], timeout: float) -> dict | str:
    """Run one memory measurement in a fresh process; its MEMORY_TAG line as a dict, or why
    there is none. Shared by the peer benchmarks (PhysicsNeMo, Anemoi)."""
    # A fixed mmap threshold: large blocks go to mmap and return to the system when freed, so
    # RSS follows the live tensors of both networks alike (glibc otherwise raises the threshold
    # after frees and keeps freed blocks in its heap).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    for line in result.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    reason = "killed (out of memory?)" if result.returncode in (-9, 137) else \
        f"exit {result.returncode}"
    return f"{reason}: {result.stderr.strip()[-600:]}"


def format_sizes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{key} {value:,}" for key, value in sizes.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=float, default=2.0,
                        help="grid spacing in degrees of the speed comparison (default 2.0)")
    parser.add_argument("--mesh-level", type=int, default=4,
                        help="icosahedral refinement: our mesh_refinement, their mesh_level")
    parser.add_argument("--latent", type=int, default=64,
                        help="our latent_size, their hidden_dim")
    parser.add_argument("--layers", type=int, default=4,
                        help="processor message-passing steps (PhysicsNeMo needs at least 3)")
    parser.add_argument("--channels", type=int, default=16, help="input = output channels")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--memory-resolution", type=float, default=1.0,
                        help="grid spacing of the peak-memory measurement (0 skips it)")
    parser.add_argument("--memory-timeout", type=int, default=1200,
                        help="seconds allowed to each memory subprocess")
    parser.add_argument("--memory-child", choices=("ours", "physicsnemo"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if not peer_available():
        print(PEER_MISSING)
        return 0
    if args.memory_child:
        memory_child(args)
        return 0
    if args.layers < 3:
        raise SystemExit("--layers must be at least 3 (PhysicsNeMo's GraphCastNet needs 3)")

    warnings.filterwarnings("ignore")
    import torch

    run_begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_lat, n_lon = grid_shape(args.resolution)
    print(f"torch {torch.__version__}, nvidia-physicsnemo {metadata.version('nvidia-physicsnemo')}"
          f", torch-geometric {metadata.version('torch-geometric')}, python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}")
    print(f"config: grid {args.resolution:g} deg ({n_lat} x {n_lon}), mesh level "
          f"{args.mesh_level} (multi-mesh), latent {args.latent}, processor layers "
          f"{args.layers}, 1 hidden layer per MLP, sum aggregation, SiLU, LayerNorm, channels "
          f"{args.channels} -> {args.channels}, batch 1, float32, AdamW(lr=1e-4), MSE")
    print("grids: ours latitude -90..90 ascending, longitude 0..360-d; PhysicsNeMo latitude "
          "-90..90 ascending, longitude -180+d..180 (same points, longitudes rolled by 180 deg)")

    with tempfile.TemporaryDirectory(prefix="bench-graph-") as cache_dir:
        begin = time.perf_counter()
        ours, ours_sizes = build_ours(args, n_lat, n_lon, cache_dir)
        ours_build = time.perf_counter() - begin
        begin = time.perf_counter()
        peer, peer_sizes = build_peer(args, n_lat, n_lon)
        peer_build = time.perf_counter() - begin
        print(f"ours        : {n_params(ours):>9,} params, built in {ours_build:5.1f} s; "
              f"{format_sizes(ours_sizes)}")
        print(f"PhysicsNeMo : {n_params(peer):>9,} params, built in {peer_build:5.1f} s; "
              f"{format_sizes(peer_sizes)}")

        trainers = [Trainer("ours", ours, args.channels, n_lat, n_lon, seed=1),
                    Trainer("physicsnemo", peer, args.channels, n_lat, n_lon, seed=1)]
        for trainer in trainers:
            out = trainer.model(trainer.x)
            assert out.shape == trainer.y.shape, (trainer.name, out.shape)
        for _ in range(args.warmup):
            for trainer in trainers:
                trainer.step()
        for index in range(args.steps):
            # Alternate which model goes first (A B, B A, ...) so neither always follows the other.
            for trainer in (trainers if index % 2 == 0 else trainers[::-1]):
                trainer.times.append(trainer.step())
        rates = {}
        for trainer in trainers:
            median = statistics.median(trainer.times)
            mean = statistics.fmean(trainer.times)
            rates[trainer.name] = 1 / median
            print(f"{trainer.name:12s}: {1 / median:7.3f} steps/s (median step "
                  f"{median * 1e3:8.1f} ms, mean {mean * 1e3:8.1f} ms, min "
                  f"{min(trainer.times) * 1e3:8.1f} ms, max {max(trainer.times) * 1e3:8.1f} ms, "
                  f"{len(trainer.times)} steps), last loss {trainer.loss:.4f}")
        print(f"RATIO graph_ours_vs_physicsnemo_steps_per_s "
              f"{rates['ours'] / rates['physicsnemo']:.2f} (goal >= 1)")
        del trainers, ours, peer
        gc.collect()

        if args.memory_resolution > 0:
            m_lat, m_lon = grid_shape(args.memory_resolution)
            print(f"peak memory of one training step (the first, AdamW state included) at "
                  f"{args.memory_resolution:g} deg ({m_lat} x {m_lon}), each in a fresh process:")
            results = {}
            for which in ("ours", "physicsnemo"):
                result = run_memory_child(args, which, cache_dir)
                results[which] = result
                if isinstance(result, str):
                    print(f"  {which:12s}: not measured: {result}")
                    continue
                increase = result["peak_mib"] - result["rss_before_mib"]
                note = "" if result["hwm_reset"] else \
                    " (high-water mark not reset: includes graph construction)"
                print(f"  {which:12s}: peak VmHWM {result['peak_mib']:8.0f} MiB, VmRSS before "
                      f"the step {result['rss_before_mib']:7.0f} MiB, increase "
                      f"{increase:8.0f} MiB{note}; step {result['step_s']:.1f} s, build "
                      f"{result['build_s']:.1f} s (build peak {result['build_peak_mib']:.0f} "
                      f"MiB); {format_sizes(result['sizes'])}")
            if all(isinstance(result, dict) for result in results.values()):
                ours_r, peer_r = results["ours"], results["physicsnemo"]
                ours_inc = ours_r["peak_mib"] - ours_r["rss_before_mib"]
                peer_inc = peer_r["peak_mib"] - peer_r["rss_before_mib"]
                print(f"RATIO graph_peak_memory_ours_vs_physicsnemo {ours_inc / peer_inc:.2f} "
                      f"(increase over the pre-step RSS: ours {ours_inc:.0f} MiB, PhysicsNeMo "
                      f"{peer_inc:.0f} MiB; absolute peaks {ours_r['peak_mib']:.0f} vs "
                      f"{peer_r['peak_mib']:.0f} MiB; goal <= 1)")
    print(f"total run time {time.perf_counter() - run_begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``weathermodel plan``: the predicted peak memory of a training step against measured peaks
(CPU, fresh processes), the graph counts it uses, its recommendations and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from weathermodel.cli import main
from weathermodel.models.config import GraphConfig, ModelConfig, TransformerConfig
from weathermodel.models.mesh import cached_graph
from weathermodel.plan import (GIB, MIB, Workload, finish_measurement, graph_sizes,
                               parse_grid, parse_memory, plan_forecast, plan_report,
                               plan_training, start_measurement)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _workload(kind: str, grid: str, batch: int, checkpointing: bool = False,
              rollout: int = 1, **sizes: object) -> Workload:
    model = ModelConfig(kind=kind, history=2, activation_checkpointing=checkpointing)
    if kind == "graph":
        model.graph = GraphConfig(mesh_refinement=4, latent_size=64, processor_layers=4,
                                  **sizes)  # type: ignore[arg-type]
    else:
        model.transformer = TransformerConfig(patch_size=2, embed_dim=128, depth=4,
                                              num_heads=4, **sizes)  # type: ignore[arg-type]
    return Workload(model=model, grid=parse_grid(grid), prognostic=20, batch_size=batch,
                    rollout=rollout)


#: graph and transformer, two grid sizes, with and without checkpointing, rollout 1 and 2:
#: 90-260 MiB each
MEASURED = {
    "graph 32x64, rollout 2": _workload("graph", "32x64", batch=1, rollout=2),
    "graph 64x128 checkpointed, 2 edge chunks": _workload("graph", "64x128", batch=2,
                                                          checkpointing=True, edge_chunks=2),
    "graph transformer 32x64": _workload("graph", "32x64", batch=2, processor="transformer"),
    "transformer 32x64 global attention": _workload("transformer", "32x64", batch=8,
                                                    window=0),
    "transformer 64x128 windows": _workload("transformer", "64x128", batch=2, window=4),
}


@pytest.fixture(scope="module")
def measured_peaks() -> dict[str, dict[str, float]]:
    """One fresh process per configuration (see ``measure_cpu_training_step`` for the
    method), two at a time: each measures only its own resident memory, so they may share
    the cores."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the CPU measurement resets the peak RSS through /proc/self/clear_refs "
                    "(Linux only)")
    results: dict[str, dict[str, float]] = {}
    names = list(MEASURED)
    for start in range(0, len(names), 2):
        running = {name: start_measurement(MEASURED[name]) for name in names[start:start + 2]}
        results.update({name: finish_measurement(process)
                        for name, process in running.items()})
    return results


@pytest.mark.parametrize("name", list(MEASURED))
def test_plan_predicts_the_measured_peak_of_a_training_step(
        name: str, measured_peaks: dict[str, dict[str, float]]) -> None:
    workload = MEASURED[name]
    measured = measured_peaks[name]["step_bytes"]
    predicted = plan_training(workload).step_bytes
    print(f"{name}: plan {predicted / MIB:.1f} MiB, measured {measured / MIB:.1f} MiB, "
          f"ratio {predicted / measured:.3f}")
    assert measured > 80 * MIB  # big enough for the allocator's noise to be small
    assert 0.8 <= predicted / measured <= 1.2


def test_graph_counts_match_the_built_graph(tmp_path: Path) -> None:
    """The analytic node and edge counts are those of the mesh builder (radius rule)."""
    grid = parse_grid("32x64")
    config = GraphConfig(mesh_refinement=3, grid_to_mesh_radius=0.6)
    latitude, longitude = grid.coordinates()
    graph = cached_graph(latitude, longitude, 3, 0.6, "triangle", 3, cache_dir=tmp_path)
    sizes = graph_sizes(grid, config)
    assert (sizes.grid_nodes, sizes.mesh_nodes) == (32 * 64, 10 * 4 ** 3 + 2)
    assert sizes.mesh_edges == len(graph.mesh_senders)
    assert sizes.grid_to_mesh_edges == len(graph.grid2mesh_senders)
    assert sizes.mesh_to_grid_edges == len(graph.mesh2grid_senders)


def test_memory_grows_with_batch_and_rollout_and_shrinks_with_checkpointing() -> None:
    base = _workload("graph", "32x64", batch=2)
    sizes = graph_sizes(base.grid, base.model.graph)
    step = plan_training(base, sizes).step_bytes
    assert plan_training(replace(base, batch_size=4), sizes).step_bytes == \
        pytest.approx(2 * step, rel=0.1)
    assert plan_training(replace(base, rollout=3), sizes).step_bytes == \
        pytest.approx(3 * step, rel=0.15)
    checkpointed = replace(base, model=replace(base.model, activation_checkpointing=True))
    assert plan_training(checkpointed, sizes).step_bytes < 0.6 * step
    assert plan_forecast(base, sizes).step_bytes < 0.5 * step


def test_graphcast_size_training_step_fits_80gb_with_bf16_and_checkpointing() -> None:
    """0.25 degrees (721 x 1440), mesh 6, latent 512, 16 layers, 83 channels, batch 1."""
    model = ModelConfig(kind="graph", history=2, activation_checkpointing=True,
                        graph=GraphConfig(mesh_refinement=6, latent_size=512,
                                          processor_layers=16))
    workload = Workload(model=model, grid=parse_grid("0.25deg"), prognostic=83, batch_size=1,
                        precision="bf16-mixed")
    text, numbers = plan_report(workload, parse_memory("80GB"), "GraphCast size, 0.25 deg")
    print(text)
    assert numbers["graph"]["mesh_nodes"] == 40_962
    assert numbers["graph"]["mesh_edges"] == 327_660  # GraphCast's multi-mesh
    assert numbers["fits"]
    assert 20 * GIB < numbers["training_peak_bytes"] < 72 * GIB
    sizes = graph_sizes(workload.grid, model.graph)
    without = replace(workload, model=replace(model, activation_checkpointing=False))
    assert plan_training(without, sizes, numbers["parameters"]).peak_bytes > 80 * GIB


def test_plan_command_recommends_checkpointing_when_the_config_does_not_fit(
        capsys: pytest.CaptureFixture) -> None:
    config = str(PROJECT_ROOT / "configs" / "train_speedy_graph.yaml")
    code = main(["plan", "--grid", "64x128", "--channels", "30", "--device-memory", "2GB",
                 config, "data.batch_size=8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "does NOT fit" in out and "assumptions:" in out and "AdamW" in out
    assert "model.activation_checkpointing=true" in out


def test_plan_command_errors_name_the_fix(capsys: pytest.CaptureFixture,
                                          tmp_path: Path) -> None:
    config = str(PROJECT_ROOT / "configs" / "train_speedy_graph.yaml")
    assert main(["plan", "--store", str(tmp_path / "absent.zarr"), config]) == 2
    assert "--grid" in capsys.readouterr().err
    assert main(["plan", "--grid", "0.3deg", config]) == 2
    assert "721x1440" in capsys.readouterr().err
    assert main(["plan", "--grid", "32x64", "--device-memory", "lots", config]) == 2
    assert "80GB" in capsys.readouterr().err
    assert parse_memory("80GB") == 80 * GIB and parse_memory("512MiB") == 512 * MIB
    assert np.isclose(parse_grid("721x1440").coordinates()[0][-1], 90.0)


def test_bench_gpu_runs_small_on_cpu_and_compares_with_the_plan(tmp_path: Path) -> None:
    """``benchmarks/bench_gpu.py --small``: timings, FLOPs, forecast speed and the plan's
    ratio to the measured memory, written as JSON."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_gpu.py"),
                             "--small", "--device", "cpu", "--only", "transformer 1deg",
                             "--repeats", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RATIO plan_vs_measured_step_memory transformer 1deg" in result.stdout
    (row,) = json.loads(out.read_text())["results"]
    assert row["step_seconds"] > 0 and row["forecast_steps_per_second"] > 0
    assert row["model_flops_per_step"] > 1e8
    assert 0.7 <= row["plan_ratio"] <= 1.3  # a small case: 15 MiB

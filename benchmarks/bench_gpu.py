"""Training and forecast speed, model FLOP utilisation and peak memory, against the planner.

For the graph network and the transformer at 1 degree (181 x 360) and 0.25 degree
(721 x 1440), GraphCast sizes (mesh refinement 6, latent 512, 16 processor layers; the
transformer 512 wide, 16 blocks, 8 heads, 8 x 8 patch windows, patch 2 at 1 degree and 4 at
0.25 degree), 83 channels (6 variables x 13 levels + 5 surface fields), history 2, batch 1,
bf16 autocast and activation checkpointing, it measures:

* the training step time (forward, backward, AdamW step; the mean over timed steps after
  warm-up, the device synchronised around the timing) and samples per second;
* the model FLOP utilisation: FLOPs of a training step counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (three times those of one forward pass: the
  backward pass costs twice the forward; recomputation by checkpointing is not model work),
  divided by the step time and the device's dense bf16 peak (:data:`PEAK_BF16_FLOPS`);
* the peak memory of a training step: ``torch.cuda.max_memory_allocated`` over the timed
  steps (statistics reset after warm-up), next to ``weathermodel.plan``'s prediction (ratio
  printed as ``RATIO``);
* forecast steps per second (one step of the model without gradients, batch 1).

``--small`` (the default without a GPU) runs the same on the CPU at small sizes (32 x 64 and
48 x 96 grids, mesh 4, latent 64, 4 layers; float32, since CPU autocast keeps layer norms in
bf16 where CUDA's runs them in float32), in well under a minute; the CPU peak is measured in a
fresh process from the resident memory (see ``weathermodel.plan.measure_cpu_training_step``)
and compared with the plan's step memory. Results go to ``--out`` as JSON.

    python benchmarks/bench_gpu.py                 # on a GPU machine: full sizes
    python benchmarks/bench_gpu.py --small         # anywhere, quick
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from weathermodel.models.config import GraphConfig, ModelConfig, TransformerConfig
from weathermodel.plan import (GIB, MIB, TrainingStep, Workload, finish_measurement,
                               graph_sizes, parameter_count, parse_grid, plan_forecast,
                               plan_training, random_batch, start_measurement)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: dense bf16 peak FLOP/s by device name (no sparsity)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                   "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (FLOP/s) from :data:`PEAK_BF16_FLOPS`; None on a CPU or
    an unknown GPU (then no utilisation is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def cases(small: bool) -> dict[str, Workload]:
    """The benchmarked workloads by name."""
    if small:
        grids = {"1deg-standin 32x64": "32x64", "0.25deg-standin 48x96": "48x96"}
        graph = GraphConfig(mesh_refinement=4, latent_size=64, processor_layers=4)
        transformers = {name: TransformerConfig(patch_size=2, embed_dim=64, depth=4,
                                                num_heads=4, window=4) for name in grids}
        channels, precision, checkpointing = 20, "32", False
    else:
        grids = {"1deg": "1deg", "0.25deg": "0.25deg"}
        graph = GraphConfig(mesh_refinement=6, latent_size=512, processor_layers=16)
        transformers = {"1deg": TransformerConfig(patch_size=2, embed_dim=512, depth=16,
                                                  num_heads=8, window=8),
                        "0.25deg": TransformerConfig(patch_size=4, embed_dim=512, depth=16,
                                                     num_heads=8, window=8)}
        channels, precision, checkpointing = 83, "bf16-mixed", True
    found = {}
    for name, grid in grids.items():
        for kind in ("graph", "transformer"):
            model = ModelConfig(kind=kind, history=2, graph=graph,
                                transformer=transformers[name],
                                activation_checkpointing=checkpointing)
            found[f"{kind} {name}"] = Workload(model=model, grid=parse_grid(grid),
                                               prognostic=channels, batch_size=1,
                                               precision=precision)
    return found


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Any, device: torch.device, repeats: int) -> float:
    """Mean seconds of ``function()`` over ``repeats`` calls, the device synchronised."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def forward_flops(step: TrainingStep, batch: dict[str, torch.Tensor]) -> float:
    """FLOPs of one forward pass of the rollout (counted, no gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    workload = step.workload
    history = workload.model.history
    with FlopCounterMode(display=False) as counter, torch.no_grad(), step.autocast():
        step.model.rollout(batch["inputs"], batch["forcings"][:, :history + workload.rollout],
                           workload.rollout, batch["targets"])
    return float(counter.get_total_flops())


def run_case(name: str, workload: Workload, device: torch.device, repeats: int,
             warmup: int) -> dict[str, Any]:
    """Measure one workload (see the module docstring); on a CPU the memory is measured
    afterwards (:func:`measure_cpu_memory`)."""
    if device.type == "cuda":  # the previous case's blocks back to the device
        gc.collect()
        torch.cuda.empty_cache()
    sizes = graph_sizes(workload.grid, workload.model.graph) \
        if workload.model.kind == "graph" else None
    parameters = parameter_count(workload)
    plan = plan_training(workload, sizes, parameters)
    forecast_plan = plan_forecast(workload, sizes, parameters)
    step = TrainingStep(workload, device)
    batch = random_batch(workload, device)
    for _ in range(warmup):
        step(batch)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: step(batch), device, repeats)
    result: dict[str, Any] = {
        "name": name, "kind": workload.model.kind, "device": str(device),
        "grid": [workload.grid.n_latitude, workload.grid.n_longitude],
        "precision": workload.precision,
        "activation_checkpointing": workload.model.activation_checkpointing,
        "batch_size": workload.batch_size, "parameters": parameters,
        "step_seconds": seconds, "samples_per_second": workload.batch_size / seconds,
        "plan_peak_bytes": plan.peak_bytes, "plan_step_bytes": plan.step_bytes,
        "plan_forecast_peak_bytes": forecast_plan.peak_bytes}
    if device.type == "cuda":
        result["peak_bytes"] = float(torch.cuda.max_memory_allocated(device))
        result["plan_ratio"] = plan.peak_bytes / result["peak_bytes"]
    flops = 3 * forward_flops(step, batch)
    result["model_flops_per_step"] = flops
    peak = peak_flops(device)
    result["model_flops_per_second"] = flops / seconds
    result["mfu"] = flops / seconds / peak if peak else None
    del step.optimizer, step.ema
    forecast_batch = random_batch(replace(workload, batch_size=1, rollout=1), device)
    step.forecast_step(forecast_batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    forecast_seconds = timed(lambda: step.forecast_step(forecast_batch), device, repeats)
    result["forecast_steps_per_second"] = 1.0 / forecast_seconds
    if device.type == "cuda":
        result["forecast_peak_bytes"] = float(torch.cuda.max_memory_allocated(device))
        result["forecast_plan_ratio"] = forecast_plan.peak_bytes / result["forecast_peak_bytes"]
    return result


def measure_cpu_memory(workloads: dict[str, Workload], results: dict[str, dict[str, Any]]
                       ) -> None:
    """The step memory of each workload on the CPU, measured in fresh processes two at a
    time (see ``weathermodel.plan.measure_cpu_training_step``), after the timings so as not
    to slow them; sets ``peak_bytes`` (the step's increase) and ``plan_ratio``."""
    names = [name for name in workloads if name in results]
    for start in range(0, len(names), 2):
        running = {name: start_measurement(workloads[name]) for name in names[start:start + 2]}
        for name, process in running.items():
            measured = finish_measurement(process)
            results[name]["peak_bytes"] = measured["step_bytes"]
            results[name]["plan_ratio"] = results[name]["plan_step_bytes"] / \
                measured["step_bytes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", default=None,
                        help="small sizes, CPU-friendly (default when there is no GPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if any)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case")
    parser.add_argument("--only", help="comma-separated substrings of case names to run")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench_gpu.json"),
                        help="JSON file of the results (default: %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.small if args.small is not None else device.type != "cuda"
    repeats = args.repeats or (2 if small else 5)
    if device.type == "cpu":  # one thread: a shared small machine is slower with more
        torch.set_num_threads(1)
    selected = {name: workload for name, workload in cases(small).items()
                if not args.only or any(key in name for key in args.only.split(","))}
    results = []
    unit = GIB if device.type == "cuda" else MIB
    unit_name = "GiB" if unit == GIB else "MiB"
    label = "peak" if device.type == "cuda" else "step memory"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), {'small' if small else 'full'} sizes", flush=True)
    measured: dict[str, dict[str, Any]] = {}
    for name, workload in selected.items():
        try:
            measured[name] = run_case(name, workload, device, repeats,
                                      warmup=1 if small else 2)
        except torch.OutOfMemoryError as error:  # the plan said it fits: report, go on
            plan = plan_training(workload)
            results.append({"name": name, "error": f"out of memory: {error}"[:500],
                            "plan_peak_bytes": plan.peak_bytes})
            print(f"{name:32s} OUT OF MEMORY (plan {plan.peak_bytes / GIB:.2f} GiB)",
                  flush=True)
            torch.cuda.empty_cache()
    if device.type == "cpu":
        measure_cpu_memory(selected, measured)
    for name, result in measured.items():
        results.append(result)
        mfu = (f"{100 * result['mfu']:.1f} %" if result["mfu"] is not None else
               f"n/a ({result['model_flops_per_second'] / 1e9:.1f} GFLOP/s)")
        planned = result["plan_peak_bytes" if device.type == "cuda" else "plan_step_bytes"]
        print(f"{name:32s} step {result['step_seconds'] * 1e3:8.1f} ms  "
              f"{result['samples_per_second']:7.2f} samples/s  MFU {mfu:>7s}  "
              f"{label} {result['peak_bytes'] / unit:8.2f} {unit_name} (plan "
              f"{planned / unit:8.2f})  "
              f"forecast {result['forecast_steps_per_second']:7.2f} steps/s", flush=True)
        print(f"RATIO plan_vs_measured_{label.replace(' ', '_')} {name}: "
              f"{result['plan_ratio']:.3f}", flush=True)
        if "forecast_plan_ratio" in result:
            print(f"RATIO plan_vs_measured_forecast_peak {name}: "
                  f"{result['forecast_plan_ratio']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": str(device), "small": small,
                                          "results": results}, indent=1))
    print(f"results written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

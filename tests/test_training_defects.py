"""Training loop defects (issue 13, item 6): exact resume with a moving average of the weights,
the moving average on the device of the weights, bf16 autocast actually applied, and
validation that scores the whole period, once per window, like ``evaluate``. Then the loop's
speed (issue 14, item 2): batches of the current rollout only, loader workers with exact
resume, weight decay on weight matrices only, ``compile``, pinned memory and no device wait
per step (CUDA only)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from weathermodel.configuration import from_dict
from weathermodel.data.config import DataConfig, PrepareConfig
from weathermodel.data.dataset import WindowDataset, training_summary
from weathermodel.data.prepare import prepare
from weathermodel.data.weights import latitude_weights
from weathermodel.models.io import load_model, read_payload
from weathermodel.training.checkpoint import list_checkpoints
from weathermodel.training.config import TrainConfig
from weathermodel.training.ema import ExponentialMovingAverage
from weathermodel.training.loop import Trainer

from conftest import apply_overrides, assert_identical, free_port

PROJECT = Path(__file__).resolve().parents[1]
TRAIN = {"start": "2000-01-01T06", "end": "2000-01-06T18"}
VALIDATION = {"start": "2000-01-07", "end": "2000-01-10T18"}  # 16 states: 13 windows of 4


@pytest.fixture(scope="module")
def store(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten days of the SPEEDY single levels: a global Gaussian grid, sea surface temperature
    NaN over land, precipitation (a diagnostic)."""
    out = tmp_path_factory.mktemp("defects") / "speedy.zarr"
    path = prepare(from_dict(PrepareConfig, {
        "sources": [{"path": str(data_dir / "speedy-t21" / "single_levels_2000-01.nc")}],
        "output": str(out), "end": "2000-01-10T18", "max_missing_fraction": 0.9}),
        progress=False)
    training_summary(from_dict(DataConfig, {"store": str(path), "train": TRAIN}))  # cached
    return path


@pytest.fixture(autouse=True)
def graph_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path / "cache"))


def tiny_config(store: Path, run_dir: Path, **overrides: Any) -> dict:
    config: dict[str, Any] = {
        "data": {"store": str(store), "history": 2, "rollout": 2, "batch_size": 2,
                 "train": TRAIN, "validation": VALIDATION},
        "model": {"kind": "graph", "history": 2,
                  "graph": {"mesh_refinement": 1, "latent_size": 8, "processor_layers": 1}},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 3},
        "rollout_schedule": [{"from_step": 0, "rollout": 1}, {"from_step": 2, "rollout": 2}],
        "run_dir": str(run_dir), "checkpoint_every": 3, "log_every": 1, "val_every": 3,
        "val_batches": 1, "accelerator": "cpu",
    }
    return apply_overrides(config, overrides)


def trainer(config: dict, resume: bool = False) -> Trainer:
    return Trainer(from_dict(TrainConfig, config), resume=resume, progress=False)


# ---------------------------------------------------------------------------------------------
# 1. moving average of the weights
# ---------------------------------------------------------------------------------------------
def test_resume_with_a_moving_average_is_bit_identical(store: Path, tmp_path: Path) -> None:
    """Interrupted after step 5 (last checkpoint at 4, a validation with the average at 4),
    then resumed: training weights, optimizer state and moving average equal an uninterrupted
    run's bit for bit, and the checkpoint keeps the training weights beside the average."""
    def config(name: str) -> dict:
        return tiny_config(store, tmp_path / name, **{
            "optim.ema_decay": 0.7, "optim.max_steps": 8, "checkpoint_every": 4,
            "val_every": 4, "rollout_schedule": [{"from_step": 0, "rollout": 1}]})

    reference = trainer(config("a"))
    reference.fit()
    trainer(config("b")).fit(stop_after=5)
    assert [step for step, _ in list_checkpoints(tmp_path / "b")] == [4]
    resumed = trainer(config("b"), resume=True)
    assert resumed.step == 4
    resumed.fit()
    assert_identical(reference.model.state_dict(), resumed.model.state_dict(), "weights")
    assert_identical(reference.optimizer.state_dict(), resumed.optimizer.state_dict(),
                     "optimizer")
    assert_identical(reference.ema.state_dict(), resumed.ema.state_dict(), "average")
    a, b = (read_payload(list_checkpoints(tmp_path / name)[-1][1]) for name in "ab")
    assert_identical(a["state_dict"], b["state_dict"], "checkpoint average")
    assert_identical(a["training_state_dict"], b["training_state_dict"], "checkpoint weights")
    # the model part is the average, the training weights are the trained parameters
    average = reference.ema.state_dict()
    for name, value in a["state_dict"].items():
        if name in average:
            assert torch.equal(value, average[name].cpu()), name
    assert_identical(a["training_state_dict"],
                     {k: v.cpu() for k, v in reference.model.state_dict().items()}, "trained")
    assert any(not torch.equal(a["state_dict"][name], a["training_state_dict"][name])
               for name in average)


def test_moving_average_lives_on_the_device_of_the_parameters() -> None:
    """Built on the parameters' device and kept there when saved (CPU) values are loaded;
    updated there in float32 with lerp."""
    model = nn.Linear(3, 2, device="meta")
    average = ExponentialMovingAverage(model, 0.9)
    average.load_state_dict({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})
    average.update()
    for (name, parameter), value in zip(model.named_parameters(), average.average):
        assert value.device == parameter.device and value.dtype == torch.float32, name

    cpu = nn.Linear(3, 2)
    average = ExponentialMovingAverage(cpu, 0.75)
    start = {k: v.clone() for k, v in average.state_dict().items()}
    with torch.no_grad():
        cpu.weight.add_(1.0)
    average.update()
    torch.testing.assert_close(average.state_dict()["weight"],
                               0.75 * start["weight"] + 0.25 * cpu.weight.detach())
    with average.applied():  # the average in the module, the training weights put back after
        torch.testing.assert_close(cpu.weight.detach(), average.state_dict()["weight"])
    torch.testing.assert_close(cpu.weight.detach(), start["weight"] + 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resumed_moving_average_is_on_the_gpu(store: Path, tmp_path: Path) -> None:
    config = tiny_config(store, tmp_path / "gpu", **{
        "accelerator": "cuda", "devices": "1", "optim.ema_decay": 0.9, "optim.max_steps": 4,
        "checkpoint_every": 2, "data.validation": None})
    trainer(config).fit(stop_after=2)
    resumed = trainer(config, resume=True)
    resumed.fit()  # the update mixes the saved average with CUDA weights
    for parameter, value in zip(resumed.model.parameters(), resumed.ema.average):
        assert value.device == parameter.device and value.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# 2. precision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, network_dtype", [("bf16-mixed", torch.bfloat16),
                                                      ("32", torch.float32)])
def test_precision_switches_the_network_and_nothing_else(store: Path, tmp_path: Path,
                                                         precision: str,
                                                         network_dtype: torch.dtype) -> None:
    """``precision: bf16-mixed`` runs the network's layers in bf16; the forecaster's inputs
    (whose last state its tendency is added to) and the loss stay float32."""
    run = trainer(tiny_config(store, tmp_path / precision, **{
        "precision": precision, "optim.max_steps": 1, "data.validation": None}))
    seen: dict[str, list[torch.dtype]] = {"linear": [], "states": [], "loss": []}
    linear = next(m for m in run.model.network.modules() if isinstance(m, nn.Linear))
    linear.register_forward_hook(lambda m, args, out: seen["linear"].append(out.dtype))
    run.model.register_forward_pre_hook(lambda m, args: seen["states"].append(args[0].dtype))
    run.loss.register_forward_hook(lambda m, args, out: seen["loss"].append(out.dtype))
    metrics = run.fit()
    assert np.isfinite(metrics["train/loss"])
    assert seen["linear"] and set(seen["linear"]) == {network_dtype}
    assert seen["states"] and set(seen["states"]) == {torch.float32}
    assert seen["loss"] and set(seen["loss"]) == {torch.float32}


def test_bf16_forward_through_fabric_keeps_float32_inputs() -> None:
    """The path of a DDP-wrapped model (Fabric's module forward): autocast on, the inputs not
    cast to bf16 (a 280 K temperature would become 280 +- 1 K before the tendency is added)."""
    from weathermodel.training.loop import make_fabric

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, state: torch.Tensor) -> torch.Tensor:
            return state + self.linear(state).float()

    config = from_dict(TrainConfig, {"data": {"store": "unused"}, "precision": "bf16-mixed",
                                     "accelerator": "cpu", "devices": "1"})
    fabric = make_fabric(config)
    model = fabric.setup_module(Residual())
    seen: list[torch.dtype] = []
    model.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model.module.linear.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    state = torch.full((2, 4), 280.3)
    out = model(state)
    assert seen == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# 3. validation
# ---------------------------------------------------------------------------------------------
def validation_metrics(run_dir: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                found.update({k: float(v) for k, v in row.items()
                              if k.startswith("val/") and v not in ("", None)})
    return found


def brute_force_rmse(store: Path, config: dict, checkpoint: Path,
                     windows: list[int]) -> dict[str, float]:
    """One window at a time in float64: sqrt of the mean over windows of the area-weighted
    MSE (weights of the evaluation module; points with missing truth left out)."""
    model = load_model(checkpoint).eval()
    data = from_dict(DataConfig, config["data"])
    dataset = WindowDataset(data.store, data.history, data.rollout, data.validation,
                            summary=training_summary(data))
    assert len(dataset) % 2 == 1
    rows = latitude_weights(dataset.summary.latitude)[:, None]
    hours = dataset.summary.metadata["time_step_seconds"] // 3600
    sums: dict[str, list[float]] = {}
    for index in windows:
        sample = dataset[index]
        with torch.no_grad():
            forecast = model.rollout(sample["inputs"][None], sample["forcings"][None],
                                     data.rollout, future=sample["targets"][None])[0]
        last = sample["inputs"][-1].double().numpy()
        for lead in range(data.rollout):
            truth = sample["targets"][lead].double().numpy()
            for c in model.output_channel_index.tolist():
                tag = f"{dataset.summary.channels[c]}/{(lead + 1) * hours}h"
                for kind, guess in (("rmse", forecast[lead, c].double().numpy()),
                                    ("persistence_rmse", last[c])):
                    valid = np.isfinite(truth[c]) & np.isfinite(guess)
                    weight = np.broadcast_to(rows, valid.shape) * valid
                    error = np.where(valid, guess - truth[c], 0.0) ** 2
                    sums.setdefault(f"val/{kind}/{tag}", []).append(
                        float((weight * error).sum() / weight.sum()))
    return {name: float(np.sqrt(np.mean(values))) for name, values in sums.items()}


def test_validation_on_two_ranks_equals_a_brute_force_score(store: Path,
                                                            tmp_path: Path) -> None:
    """2 processes (gloo), 13 validation windows: every window scored exactly once (no padded
    duplicate), by the moving average, over predicted channels with missing truth (sea
    surface temperature over land) left out, with the evaluation module's area weights."""
    import yaml

    config = tiny_config(store, tmp_path / "two", **{
        "optim.ema_decay": 0.5, "val_batches": 100, "model.forcing": []})  # sst prognostic
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    command = ["timeout", "300", sys.executable, "-m", "torch.distributed.run",
               "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "weathermodel", "train", "--config", str(path), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es)" in done.stdout
    got = validation_metrics(tmp_path / "two")
    expected = brute_force_rmse(store, config, list_checkpoints(tmp_path / "two")[-1][1],
                                list(range(13)))
    assert "val/rmse/sea_surface_temperature/6h" in expected
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name


def test_validation_scores_windows_spread_over_the_whole_period(store: Path,
                                                                tmp_path: Path) -> None:
    """val_batches=2 with batches of 2: 4 of the 13 windows, evenly spaced from the first to
    the last part of the period; forcing channels (sea surface temperature) are not scored."""
    config = tiny_config(store, tmp_path / "one", **{"optim.max_steps": 1, "val_every": 1,
                                                      "val_batches": 2})
    metrics = trainer(config).fit()
    windows = [i * 13 // 4 for i in range(4)]
    assert windows == [0, 3, 6, 9]
    expected = brute_force_rmse(store, config, list_checkpoints(tmp_path / "one")[-1][1],
                                windows)
    got = {k: v for k, v in metrics.items() if k.startswith("val/")}
    assert not any("sea_surface_temperature" in name for name in expected)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name


# ---------------------------------------------------------------------------------------------
# 4. speed of the loop (issue 14, item 2)
# ---------------------------------------------------------------------------------------------
def test_batches_hold_the_states_of_the_current_rollout_only(store: Path, tmp_path: Path) -> None:
    """Rollout 1 until step 2, then 2 (``data.rollout`` 2), with 2 micro-batches per step:
    the batches of steps 0-1 hold 1 target state, later ones 2."""
    run = trainer(tiny_config(store, tmp_path / "r", **{"optim.accumulate": 2}))
    batches = run._batches()
    shapes = [tuple(batch[key].shape[1] for key in ("inputs", "targets", "forcings"))
              for batch in (next(batches) for _ in range(8))]
    assert shapes == [(2, 1, 3)] * 4 + [(2, 2, 4)] * 4


def test_resume_with_loader_workers_is_bit_identical(store: Path, tmp_path: Path) -> None:
    """Interrupted with 0 workers after step 5 (checkpoint at 4, rollout 2 from step 3),
    resumed with 2 workers: weights and optimizer state equal, bit for bit, an uninterrupted
    run with 2 workers (the loader options may change between launches; the rest may not)."""
    def config(name: str, workers: int) -> dict:
        return tiny_config(store, tmp_path / name, **{
            "optim.max_steps": 7, "checkpoint_every": 4, "data.validation": None,
            "data.num_workers": workers,
            "rollout_schedule": [{"from_step": 0, "rollout": 1}, {"from_step": 3, "rollout": 2}]})

    reference = trainer(config("a", 2))
    reference.fit()
    trainer(config("b", 0)).fit(stop_after=5)
    resumed = trainer(config("b", 2), resume=True)
    assert resumed.step == 4
    resumed.fit()
    assert_identical(reference.model.state_dict(), resumed.model.state_dict(), "weights")
    assert_identical(reference.optimizer.state_dict(), resumed.optimizer.state_dict(),
                     "optimizer")
    with pytest.raises(Exception, match="different 'data' configuration"):
        trainer(tiny_config(store, tmp_path / "b", **{"data.batch_size": 1}), resume=True)


def test_weight_decay_spares_biases_norms_and_embeddings(store: Path, tmp_path: Path) -> None:
    """Two AdamW groups: weight matrices decayed, every bias (and other 1-d parameter) not.
    A step with zero gradients is decay alone: it shrinks the matrices by ``1 - lr * decay``
    and leaves the biases as they were."""
    from weathermodel.training.loop import parameter_groups

    run = trainer(tiny_config(store, tmp_path / "wd", **{"optim.weight_decay": 0.5}))
    decayed, spared = run.optimizer.param_groups
    assert decayed["weight_decay"] == 0.5 and spared["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert all(name.endswith(".weight") for name in decayed["param_names"])
    assert "network.encoder.edge_mlp.0.weight" in decayed["param_names"]
    biases = [name for name, _ in run.model.named_parameters() if name.endswith(".bias")]
    assert biases and set(biases) <= set(spared["param_names"])
    assert len(decayed["params"]) + len(spared["params"]) == len(list(run.model.parameters()))

    before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    for parameter in run.model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    run.optimizer.step()
    shrink = 1 - decayed["lr"] * 0.5
    assert shrink < 1
    for name, parameter in run.model.named_parameters():
        if name in decayed["param_names"]:
            torch.testing.assert_close(parameter.detach(), before[name] * shrink)
        else:
            assert torch.equal(parameter.detach(), before[name]), name

    # free tables named like embeddings or biases, and embedding and norm layers, are spared
    model = nn.ModuleDict({"table": nn.Embedding(4, 3), "norm": nn.LayerNorm(3),
                           "projection": nn.Linear(3, 3), "patch_embedding": nn.Conv2d(3, 3, 2)})
    model.register_parameter("latitude_embedding", nn.Parameter(torch.zeros(2, 3)))
    model.register_parameter("position_bias_table", nn.Parameter(torch.zeros(2, 3)))
    model.register_parameter("mixing", nn.Parameter(torch.zeros(2, 3)))
    decayed, spared = parameter_groups(model, 0.1)
    assert sorted(decayed["param_names"]) == ["mixing", "patch_embedding.weight",
                                              "projection.weight"]
    assert sorted(spared["param_names"]) == sorted([
        "latitude_embedding", "position_bias_table", "table.weight", "norm.weight", "norm.bias",
        "projection.bias", "patch_embedding.bias"])


def test_optimizer_state_of_one_group_is_regrouped_per_parameter() -> None:
    """A checkpoint written when all parameters shared one AdamW group loads into the two
    groups, each parameter keeping its own moments."""
    from weathermodel.training.loop import load_optimizer_state, parameter_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    old = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    old.step()
    saved = old.state_dict()
    new = torch.optim.AdamW(parameter_groups(model, 0.1), lr=0.5)
    assert load_optimizer_state(new, saved, model)
    assert [g["lr"] for g in new.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]
    for parameter in model.parameters():
        expected = old.state[parameter]
        assert torch.equal(new.state[parameter]["exp_avg"], expected["exp_avg"])
        assert torch.equal(new.state[parameter]["exp_avg_sq"], expected["exp_avg_sq"])
    again = torch.optim.AdamW(parameter_groups(model, 0.1), lr=0.5)
    assert not load_optimizer_state(again, new.state_dict(), model)


def test_non_finite_gradients_are_reported_at_the_logging_step(store: Path,
                                                               tmp_path: Path) -> None:
    """The gradient norm is checked on the device (no wait per step) and a non-finite one is
    reported, with the steps it may have happened at, at the next logging step."""
    from weathermodel.errors import WeatherModelError

    run = trainer(tiny_config(store, tmp_path / "nan", **{
        "log_every": 3, "optim.max_steps": 6, "data.validation": None}))
    with torch.no_grad():
        next(run.model.network.parameters()).fill_(float("inf"))
    with pytest.raises(WeatherModelError, match="between 1 and 3") as error:
        run.fit()
    assert "gradient norm was not finite" in error.value.problem
    assert run.step == 3


def _cxx_compiler() -> str | None:
    import shutil

    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.slow
@pytest.mark.skipif(_cxx_compiler() is None,
                    reason="torch.compile on CPU needs a C++ compiler (none found; set CXX)")
def test_compile_option_trains_and_saves_the_same_parameter_names(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile: true`` trains (about 30 s of CPU time compiling the tiny network's forward
    and backward) and checkpoints carry the parameter names of an uncompiled model."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "compile_threads", 1)  # no pool of compile processes
    run = trainer(tiny_config(store, tmp_path / "c", **{
        "compile": True, "optim.max_steps": 2, "data.validation": None,
        "rollout_schedule": [{"from_step": 0, "rollout": 1}]}))
    assert run.model.network._compiled_call_impl is not None
    metrics = run.fit()
    assert np.isfinite(metrics["train/loss"])
    saved = read_payload(list_checkpoints(tmp_path / "c")[-1][1])["state_dict"]
    plain = trainer(tiny_config(store, tmp_path / "p"))
    assert sorted(saved) == sorted(plain.model.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_are_pinned_and_copied_without_waiting(store: Path, tmp_path: Path) -> None:
    from weathermodel.data.datamodule import to_device

    run = trainer(tiny_config(store, tmp_path / "pin", **{"accelerator": "cuda",
                                                         "devices": "1"}))
    batch = next(iter(run.data.train_dataloader()))
    assert all(value.is_pinned() for value in batch.values())
    assert all(value.device.type == "cuda" for value in next(run._batches()).values())
    big = torch.ones(64, 2**20).pin_memory()  # 256 MiB: some milliseconds to copy
    torch.cuda.synchronize()
    copied = to_device({"x": big}, torch.device("cuda"))["x"]
    assert not torch.cuda.current_stream().query()  # the host did not wait for the copy
    torch.cuda.synchronize()
    assert bool((copied == 1).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_steps_do_not_wait_for_the_device(store: Path, tmp_path: Path) -> None:
    """CUDA's synchronisation warnings during a run of 2 and of 8 steps (logging, validation
    and checkpoints only at the end): as many in both, so none comes from a step."""
    import warnings

    def synchronisations(steps: int) -> int:
        run = trainer(tiny_config(store, tmp_path / f"sync{steps}", **{
            "accelerator": "cuda", "devices": "1", "optim.max_steps": steps,
            "log_every": 100, "checkpoint_every": 100, "data.validation": None,
            "rollout_schedule": [{"from_step": 0, "rollout": 1}]}))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run.fit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert synchronisations(8) == synchronisations(2)

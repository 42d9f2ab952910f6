"""Training: exact resume, topology independence, multi-node launch, skill on real data."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.errors import ConfigError
from weathermodel.data.prepare import prepare
from weathermodel.training.checkpoint import list_checkpoints
from weathermodel.training.config import TrainConfig
from weathermodel.training.loop import Trainer, learning_rate_factor

from conftest import apply_overrides, free_port

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "ncep.zarr"
    return prepare(from_dict(PrepareConfig, {"sources": [{"path": str(ncep_file)}],
                                             "output": str(out)}), progress=False)


@pytest.fixture(autouse=True)
def graph_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path / "cache"))


def small_config(store: Path, run_dir: Path, **overrides) -> dict:
    config = {
        "data": {"store": str(store), "history": 2, "rollout": 2, "batch_size": 4,
                 "train": {"start": "2013-01-01", "end": "2013-02-28T18"},
                 "validation": {"start": "2013-10-01", "end": "2013-10-10"}},
        "model": {"kind": "graph", "history": 2,
                  "graph": {"mesh_refinement": 1, "latent_size": 16, "processor_layers": 2}},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": 12},
        "rollout_schedule": [{"from_step": 0, "rollout": 1}, {"from_step": 8, "rollout": 2}],
        "run_dir": str(run_dir), "checkpoint_every": 4, "log_every": 1, "val_every": 6,
        "val_batches": 2,
    }
    return apply_overrides(config, overrides)


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from the CSV log (the last value where a step was redone)."""
    found = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    found[int(row["step"])] = float(row["train/loss"])
    return found


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    step, path = list_checkpoints(run_dir)[-1]
    return torch.load(path, weights_only=True)["state_dict"]


def test_learning_rate_schedule() -> None:
    config = from_dict(TrainConfig, {"data": {"store": "x"},
                                     "optim": {"warmup_steps": 10, "max_steps": 110,
                                               "min_lr_ratio": 0.1}})
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(9, config) == pytest.approx(1.0)
    assert learning_rate_factor(60, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate_factor(110, config) == pytest.approx(0.1)
    assert config.rollout_at(0) == 1


def test_interrupted_then_resumed_run_is_exact(store: Path, tmp_path: Path) -> None:
    reference = Trainer(from_dict(TrainConfig, small_config(store, tmp_path / "a")),
                        progress=False)
    reference.fit()
    interrupted = Trainer(from_dict(TrainConfig, small_config(store, tmp_path / "b")),
                          progress=False)
    interrupted.fit(stop_after=5)  # the last checkpoint is at step 4: step 5 is redone
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [4]
    resumed = Trainer(from_dict(TrainConfig, small_config(store, tmp_path / "b")),
                      resume=True, progress=False)
    assert resumed.step == 4
    resumed.fit()
    expected, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(expected) == sorted(got) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_resume_continues_every_random_generator_from_the_checkpoint(store: Path,
                                                                      tmp_path: Path) -> None:
    """After a resume, once the first batch is drawn (which draws a loader seed from torch's
    generator, as the uninterrupted run did before its checkpoint), every generator is where
    the checkpoint left it, whatever the new process did to them before."""
    import random

    import numpy as np

    from weathermodel.training.checkpoint import load_latest_checkpoint, rng_state

    Trainer(from_dict(TrainConfig, small_config(store, tmp_path / "c")),
            progress=False).fit(stop_after=5)
    saved = load_latest_checkpoint(tmp_path / "c")["rng"]
    resumed = Trainer(from_dict(TrainConfig, small_config(store, tmp_path / "c")),
                      resume=True, progress=False)
    torch.manual_seed(12345)  # a new process's generators, anywhere but at the checkpoint
    np.random.seed(12345)
    random.seed(12345)
    next(resumed._batches())
    now = rng_state()
    assert torch.equal(now["torch"], saved["torch"])
    assert torch.equal(now["numpy"]["keys"], saved["numpy"]["keys"])
    assert now["numpy"]["position"] == saved["numpy"]["position"]
    assert now["python"] == saved["python"]


def test_resume_refuses_another_configuration(store: Path, tmp_path: Path) -> None:
    Trainer(from_dict(TrainConfig, small_config(store, tmp_path / "r", **{
        "optim.max_steps": 4})), progress=False).fit()
    other = small_config(store, tmp_path / "r", **{"model.graph.latent_size": 8})
    with pytest.raises(Exception, match="different 'model' configuration"):
        Trainer(from_dict(TrainConfig, other), resume=True, progress=False)


def _write_config(config: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(config_path: Path, *, nproc: int, nnodes: int = 1, node_rank: int = 0,
              port: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    command = ["timeout", "600", sys.executable, "-m", "torch.distributed.run",
               f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "weathermodel",
               "train", "--config", str(config_path), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=PROJECT)


def _wait(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=700)
    assert process.returncode == 0, err[-4000:]
    return out


def test_one_process_and_two_ddp_processes_reach_the_same_weights(store: Path,
                                                                  tmp_path: Path) -> None:
    single = small_config(store, tmp_path / "one", **{"data.batch_size": 4})
    double = small_config(store, tmp_path / "two", **{"data.batch_size": 2})
    one = _torchrun(_write_config(single, tmp_path / "one.yaml"), nproc=1, port=free_port())
    _wait(one)
    two = _torchrun(_write_config(double, tmp_path / "two.yaml"), nproc=2, port=free_port())
    out = _wait(two)
    assert "2 process(es)" in out
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-4, atol=2e-5)
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-4)


def test_two_torchrun_agents_as_two_nodes_train_together(store: Path, tmp_path: Path) -> None:
    config = small_config(store, tmp_path / "nodes", **{"data.batch_size": 2,
                                                         "optim.max_steps": 6})
    path = _write_config(config, tmp_path / "nodes.yaml")
    port = free_port()
    agents = [_torchrun(path, nproc=1, nnodes=2, node_rank=rank, port=port) for rank in (0, 1)]
    outputs = [_wait(agent) for agent in agents]
    assert "2 process(es)" in outputs[0]
    assert [s for s, _ in list_checkpoints(tmp_path / "nodes")] == [4, 6]


def test_ranks_with_different_configs_are_refused(store: Path, tmp_path: Path) -> None:
    """Two nodes launched with different overrides: a clear error, not a hang."""
    config = small_config(store, tmp_path / "mismatch", **{"optim.max_steps": 2})
    path = _write_config(config, tmp_path / "m.yaml")
    port = free_port()
    agents = [_torchrun(path, nproc=1, nnodes=2, node_rank=rank, port=port,
                        extra=(f"optim.lr={0.001 * (rank + 1)}",)) for rank in (0, 1)]
    errors = [agent.communicate(timeout=700)[1] for agent in agents]
    assert all(agent.returncode != 0 for agent in agents)
    assert any("different configuration" in err for err in errors)


@pytest.mark.slow
def test_small_model_beats_persistence_on_held_out_months(store: Path, tmp_path: Path) -> None:
    """Train on January-September 2013, validate on October-December: lower RMSE than
    persistence at 6 h and 24 h."""
    config = small_config(store, tmp_path / "skill", **{
        "data.train": {"start": "2013-01-01", "end": "2013-09-30T18"},
        "data.validation": {"start": "2013-10-01", "end": "2013-12-31T18"},
        "data.rollout": 4, "data.batch_size": 8,
        "model.graph": {"mesh_refinement": 2, "latent_size": 32, "processor_layers": 3},
        "optim.max_steps": 300, "optim.warmup_steps": 10, "optim.lr": 3e-3,
        "rollout_schedule": [{"from_step": 0, "rollout": 1}, {"from_step": 150, "rollout": 2},
                             {"from_step": 250, "rollout": 4}],
        "val_every": 300, "val_batches": 20, "checkpoint_every": 300})
    metrics = Trainer(from_dict(TrainConfig, config), progress=False).fit()
    for lead in ("6h", "24h"):
        model = metrics[f"val/rmse/2m_temperature/{lead}"]
        persistence = metrics[f"val/persistence_rmse/2m_temperature/{lead}"]
        assert model < persistence, (lead, model, persistence)
    assert metrics["val/rmse/2m_temperature/6h"] < 0.85 * metrics[
        "val/persistence_rmse/2m_temperature/6h"]


def test_gradient_accumulation_matches_the_full_batch(store: Path, tmp_path: Path) -> None:
    full = small_config(store, tmp_path / "full", **{"data.batch_size": 4,
                                                     "optim.max_steps": 4})
    split = small_config(store, tmp_path / "acc", **{"data.batch_size": 2,
                                                     "optim.accumulate": 2,
                                                     "optim.max_steps": 4})
    Trainer(from_dict(TrainConfig, full), progress=False).fit()
    Trainer(from_dict(TrainConfig, split), progress=False).fit()
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "acc")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_bf16_and_ema_options_train(store: Path, tmp_path: Path) -> None:
    config = small_config(store, tmp_path / "ema", **{"precision": "bf16-mixed",
                                                      "optim.ema_decay": 0.5,
                                                      "optim.max_steps": 4})
    trainer = Trainer(from_dict(TrainConfig, config), progress=False)
    metrics = trainer.fit()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    saved = final_weights(tmp_path / "ema")
    raw = trainer.model.state_dict()
    differs = [name for name in saved if saved[name].dtype.is_floating_point
               and not torch.equal(saved[name], raw[name])]
    assert differs  # the checkpoint holds the average, not the last weights
    for name in differs:
        assert torch.isfinite(saved[name]).all()


def test_init_from_starts_from_another_models_parameters(store: Path, tmp_path: Path) -> None:
    """Fine-tuning: ``init_from`` copies the trained parameters (not the normalisation
    buffers) of a model file; a model of other sizes is refused with a clear error."""
    first = Trainer(from_dict(TrainConfig, small_config(store, tmp_path / "a",
                                                        **{"optim.max_steps": 2})),
                    progress=False)
    first.fit()
    trained = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    # --resume with no checkpoint yet (the first launch of a script that always resumes)
    tuned = Trainer(from_dict(TrainConfig, small_config(
        store, tmp_path / "b", init_from=str(tmp_path / "a" / "model.pt"))), resume=True,
        progress=False)
    fresh = Trainer(from_dict(TrainConfig, small_config(store, tmp_path / "c")), progress=False)
    for name, value in tuned.model.named_parameters():
        assert torch.equal(value.detach().cpu(), trained[name]), name
    assert any(not torch.equal(value.detach().cpu(), trained[name])
               for name, value in fresh.model.named_parameters())
    wider = small_config(store, tmp_path / "d", init_from=str(tmp_path / "a" / "model.pt"),
                         **{"model.graph.latent_size": 8})
    with pytest.raises(ConfigError, match="do not fit"):
        Trainer(from_dict(TrainConfig, wider), progress=False)

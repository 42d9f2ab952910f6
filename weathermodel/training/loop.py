"""``weathermodel train``: data-parallel training on Lightning Fabric, with exact resume.

One code path for a laptop, one GPU node or many nodes: Fabric picks the accelerator and,
under ``torchrun`` or SLURM ``srun``, joins the process group the launcher set up (NCCL on GPUs,
gloo on CPUs). Each rank reads its shard of the shuffled windows; DDP averages gradients, so a
run on N processes with batch B/N each follows the same trajectory as one process with batch B.
Checkpoints record the data position and every RNG state, so ``--resume`` continues exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from weathermodel.configuration import config_to_dict, dump_config
from weathermodel.data.dataset import WindowDataset, read_summary
from weathermodel.errors import ConfigError, WeatherModelError
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.io import save_model
from weathermodel.models.loss import WeightedMSELoss
from weathermodel.models.mesh import cell_area_weights
from weathermodel.training.checkpoint import (load_latest_checkpoint, restore_rng_state,
                                              rng_state, save_checkpoint)
from weathermodel.training.config import TrainConfig


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way through an epoch (exact resume)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def launch_topology(config: TrainConfig) -> tuple[int | str, int]:
    """(devices per node, nodes), read from torchrun or SLURM when they launched us."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:  # torchrun / torch elastic
        local = int(env["LOCAL_WORLD_SIZE"])
        return local, int(env["WORLD_SIZE"]) // local
    if "SLURM_NTASKS" in env and "SLURM_JOB_NUM_NODES" in env and \
            env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        nodes = int(env["SLURM_JOB_NUM_NODES"])
        return int(env["SLURM_NTASKS"]) // nodes, nodes
    devices: int | str = int(config.devices) if config.devices.isdigit() else config.devices
    return devices, max(config.num_nodes, 1)


def make_fabric(config: TrainConfig, loggers: list | None = None) -> Fabric:
    devices, nodes = launch_topology(config)
    distributed = nodes > 1 or (isinstance(devices, int) and devices > 1) or \
        int(os.environ.get("WORLD_SIZE", "1")) > 1
    strategy = (DDPStrategy(timeout=timedelta(seconds=config.process_group_timeout_s))
                if distributed else "auto")
    return Fabric(accelerator=config.accelerator, devices=devices, num_nodes=nodes,
                  strategy=strategy, precision=config.precision, loggers=loggers)


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    optim = config.optim
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    span = max(optim.max_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / span, 1.0)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_ranks_agree(fabric: Fabric, config: TrainConfig, fingerprint: str) -> None:
    """Every rank must run the same configuration on the same store."""
    text = json.dumps(config_to_dict(config), sort_keys=True) + fingerprint
    digest = hashlib.sha256(text.encode()).digest()[:8]
    mine = torch.tensor(list(digest), dtype=torch.int64)
    everyone = fabric.all_gather(mine).reshape(-1, 8)
    differing = [rank for rank in range(everyone.shape[0]) if not torch.equal(everyone[rank],
                                                                              everyone[0])]
    if differing:
        raise ConfigError(f"ranks {differing} run a different configuration or store than rank 0",
                          "launch every rank with the same config file, overrides and store")


class Trainer:
    """Owns the model, optimizer, data and loop of one training run."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.run_dir = Path(config.run_dir)
        # a new version folder per launch: a resumed run never overwrites earlier logs
        loggers = [CSVLogger(str(self.run_dir), name="logs", flush_logs_every_n_steps=1),
                   TensorBoardLogger(str(self.run_dir), name="tensorboard")]
        self.fabric = make_fabric(config, loggers)
        self.fabric.launch()
        self.summary = read_summary(config.data.store)
        _check_ranks_agree(self.fabric, config, self.summary.metadata.get("fingerprint", ""))
        self.fabric.seed_everything(config.seed)
        self.model = Forecaster(config.model, ModelMetadata.from_summary(self.summary),
                                self.summary.statics)
        self.loss = WeightedMSELoss(self.summary.latitude, self.summary.channel_variables,
                                    list(self.summary.channel_levels), self.model.tendency_std,
                                    config.model.loss).to(self.fabric.device)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr,
                                      weight_decay=config.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, config))
        self.module, self.optimizer = self.fabric.setup(self.model, optimizer)
        self.module.mark_forward_method("rollout")  # through DDP's forward: gradients sync
        self.ema = ({k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    if config.optim.ema_decay > 0 else None)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.train_set = WindowDataset(config.data.store, config.data.history,
                                       config.data.rollout, config.data.train,
                                       config.data.fill_missing, summary=self.summary)
        self.sampler = ResumableSampler(self.train_set, num_replicas=self.fabric.world_size,
                                        rank=self.fabric.global_rank, shuffle=True,
                                        seed=config.seed, drop_last=True)
        self._rng_after_resume: dict[str, Any] | None = None
        if resume:
            self._resume()

    # ---------------------------------------------------------------- checkpoints
    def _resume(self) -> None:
        payload = load_latest_checkpoint(self.run_dir)
        if payload is None:
            self.fabric.print(f"no checkpoint in {self.run_dir}: starting from step 0")
            return
        saved = payload["train_config"]
        mine = config_to_dict(self.config)
        for key in ("data", "model", "seed", "rollout_schedule"):
            if saved.get(key) != mine.get(key):
                raise WeatherModelError(
                    f"the checkpoint was written with a different '{key}' configuration",
                    "resume with the configuration of that run, or use a new run_dir",
                    path=payload["path"])
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.step, self.epoch = payload["step"], payload["epoch"]
        self.batch_in_epoch = payload["batch_in_epoch"]
        self.ema = payload.get("ema")
        self._rng_after_resume = payload["rng"]  # restored in _batches, see there
        self.fabric.print(f"resumed from {payload['path']} at step {self.step}")

    def _save(self) -> None:
        state = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "rng": rng_state(), "ema": self.ema,
                 "train_config": config_to_dict(self.config),
                 "store_fingerprint": self.summary.metadata.get("fingerprint", "")}
        if self.fabric.global_rank == 0:
            save_checkpoint(self.run_dir, self._model_for_saving(), state,
                            self.config.keep_last)
        self.fabric.barrier()

    def _model_for_saving(self) -> Forecaster:
        if self.ema is None:
            return self.model
        averaged = Forecaster(self.model.config, self.model.metadata, self.summary.statics)
        averaged.load_state_dict(self.ema)
        return averaged

    # ---------------------------------------------------------------- data
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches forever, epoch after epoch, from the recorded position."""
        data = self.config.data
        while True:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip = self.batch_in_epoch * data.batch_size
            loader = DataLoader(self.train_set, batch_size=data.batch_size,
                                sampler=self.sampler, drop_last=True,
                                num_workers=data.num_workers,
                                prefetch_factor=data.prefetch_factor if data.num_workers else None)
            batches = iter(loader)  # draws a base seed from torch's global generator
            if self._rng_after_resume is not None:
                # resuming: the uninterrupted run drew that seed before its checkpoint, so
                # restore the generators after it, for the exact same random streams
                restore_rng_state(self._rng_after_resume)
                self._rng_after_resume = None
            for batch in batches:
                self.batch_in_epoch += 1  # counted when handed out: a checkpoint after this
                yield {k: v.to(self.fabric.device) for k, v in batch.items()}  # step skips it
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ---------------------------------------------------------------- loop
    def _micro_step(self, batch: dict[str, torch.Tensor], rollout: int) -> torch.Tensor:
        history = self.config.data.history
        prediction = self.module.rollout(batch["inputs"],
                                         batch["forcings"][:, :history + rollout], rollout)
        loss = self.loss(prediction, batch["targets"][:, :rollout])
        self.fabric.backward(loss / self.config.optim.accumulate)
        return loss.detach()

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.config.optim.ema_decay
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                if value.dtype.is_floating_point:
                    self.ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Train to ``optim.max_steps`` (or stop after ``stop_after`` steps, as an
        interruption would, without a final checkpoint); returns the last metrics."""
        config = self.config
        if self.fabric.global_rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(config))
        batches = self._batches()
        bar = tqdm(total=config.optim.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress or self.fabric.global_rank != 0)
        last: dict[str, float] = {}
        started, samples = time.perf_counter(), 0
        while self.step < config.optim.max_steps:
            rollout = config.rollout_at(self.step)
            total = torch.zeros((), device=self.fabric.device)
            for micro in range(config.optim.accumulate):
                batch = next(batches)
                with self.fabric.no_backward_sync(self.module,
                                                  enabled=micro < config.optim.accumulate - 1):
                    total += self._micro_step(batch, rollout)
                samples += batch["inputs"].shape[0] * self.fabric.world_size
            if config.optim.grad_clip > 0:
                self.fabric.clip_gradients(self.module, self.optimizer,
                                           max_norm=config.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self._update_ema()
            self.step += 1
            loss = float(self.fabric.all_reduce(total, reduce_op="mean")) / config.optim.accumulate
            last = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                    "train/rollout": rollout}
            if self.step % config.log_every == 0 or self.step == config.optim.max_steps:
                elapsed = time.perf_counter() - started
                last["train/samples_per_second"] = samples / max(elapsed, 1e-9)
                self.fabric.log_dict(last, step=self.step)
                started, samples = time.perf_counter(), 0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", rollout=rollout)
            if config.data.validation and (self.step % config.val_every == 0
                                           or self.step == config.optim.max_steps):
                last.update(self.validate())
            if self.step % config.checkpoint_every == 0 or self.step == config.optim.max_steps:
                self._save()
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        if self.step >= config.optim.max_steps and self.fabric.global_rank == 0:
            save_model(self._model_for_saving(), self.run_dir / "model.pt")
        for logger in self.fabric.loggers:
            logger.finalize("success")
        return last

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Latitude-weighted RMSE per channel and lead (WeatherBench 2 convention: square root
        of the mean over samples of the area-weighted MSE), next to persistence."""
        config = self.config
        dataset = WindowDataset(config.data.store, config.data.history, config.data.rollout,
                                config.data.validation, config.data.fill_missing,
                                summary=self.summary)
        sampler = DistributedSampler(dataset, num_replicas=self.fabric.world_size,
                                     rank=self.fabric.global_rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=config.data.batch_size, sampler=sampler)
        weights = torch.tensor(cell_area_weights(self.summary.latitude, "cos"),
                               dtype=torch.float32, device=self.fabric.device).view(-1, 1)
        model_sse = persistence_sse = count = None
        was_training = self.model.training
        self.model.eval()
        for index, batch in enumerate(loader):
            if index >= config.val_batches:
                break
            batch = {k: v.to(self.fabric.device) for k, v in batch.items()}
            prediction = self.model.rollout(batch["inputs"], batch["forcings"],
                                            config.data.rollout)
            persistence = batch["inputs"][:, -1:].expand_as(batch["targets"])
            model_part = (((prediction - batch["targets"]) ** 2) * weights).mean((-2, -1)).sum(0)
            persist_part = (((persistence - batch["targets"]) ** 2) * weights).mean((-2, -1)
                                                                                    ).sum(0)
            model_sse = model_part if model_sse is None else model_sse + model_part
            persistence_sse = persist_part if persistence_sse is None else \
                persistence_sse + persist_part
            count = batch["inputs"].shape[0] + (count or 0)
        self.model.train(was_training)
        if model_sse is None:
            return {}
        totals = self.fabric.all_reduce(torch.stack([model_sse, persistence_sse]),
                                        reduce_op="sum")
        n = float(self.fabric.all_reduce(torch.tensor(float(count),
                                                      device=self.fabric.device),
                                         reduce_op="sum"))
        rmse, persistence_rmse = torch.sqrt(totals / n).cpu()
        hours = self.summary.metadata["time_step_seconds"] / 3600
        metrics = {}
        for lead in range(rmse.shape[0]):
            for c, channel in enumerate(self.summary.channels):
                tag = f"{channel}/{int((lead + 1) * hours)}h"
                metrics[f"val/rmse/{tag}"] = float(rmse[lead, c])
                metrics[f"val/persistence_rmse/{tag}"] = float(persistence_rmse[lead, c])
        self.fabric.log_dict(metrics, step=self.step)
        return metrics


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, float]:
    """Run (or resume) training; returns the last logged metrics."""
    trainer = Trainer(config, resume=resume, progress=progress)
    if trainer.fabric.global_rank == 0:
        print("# weathermodel train: effective configuration\n" + dump_config(config),
              flush=True)
        print(f"# {trainer.fabric.world_size} process(es), accelerator "
              f"{trainer.fabric.device.type}, {sum(p.numel() for p in trainer.model.parameters())}"
              " parameters", flush=True)
    metrics = trainer.fit()
    sys.stdout.flush()
    return metrics

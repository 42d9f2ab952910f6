"""``weathermodel train``: data-parallel training on Lightning Fabric, with exact resume.

One code path for a laptop, one GPU node or many nodes: Fabric picks the accelerator and,
under ``torchrun`` or SLURM ``srun``, joins the process group the launcher set up (NCCL on GPUs,
gloo on CPUs). Each rank reads its shard of the shuffled windows; DDP averages gradients, so a
run on N processes with batch B/N each follows the same trajectory as one process with batch B.
Checkpoints record the data position, every RNG state, the training weights and (with
``optim.ema_decay``) their moving average, so ``--resume`` continues exactly.

``precision: bf16-mixed`` runs the forward pass under bfloat16 autocast (matrix products in
bf16, parameters, inputs, residual sums and the loss in float32). Validation scores the moving
average when there is one, on windows spread evenly over the whole validation period, each
scored once across ranks, with the area weights of :mod:`weathermodel.evaluation`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.plugins.precision.amp import MixedPrecision
from lightning.fabric.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from weathermodel.configuration import config_to_dict, dump_config
from weathermodel.data.dataset import WindowDataset, training_summary
from weathermodel.data.weights import latitude_weights
from weathermodel.errors import ConfigError, WeatherModelError
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.io import read_payload, save_model
from weathermodel.models.loss import WeightedMSELoss
from weathermodel.training.checkpoint import (load_latest_checkpoint, restore_rng_state,
                                              rng_state, save_checkpoint)
from weathermodel.training.config import TrainConfig
from weathermodel.training.ema import ExponentialMovingAverage


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


class _AutocastKeepingFloat32Inputs(MixedPrecision):
    """Fabric's mixed precision without its cast of the forward call's inputs.

    ``MixedPrecision`` casts every floating-point argument of the forward call to bf16 before
    running it under autocast. The forecaster adds its predicted tendency to the last input
    state, which in bf16 keeps 8 significant bits (2 m temperature to the nearest 1-2 K), and
    takes forcing channels from the true future states. Autocast alone runs the matrix products
    in bf16 and leaves those sums, the normalisation and the loss in float32.
    """

    def convert_input(self, data: Any) -> Any:
        return data


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
    fabric = Fabric(accelerator=config.accelerator, devices=devices, num_nodes=nodes,
                    strategy=strategy, precision=config.precision, loggers=loggers)
    if type(fabric.strategy.precision) is MixedPrecision:
        # the same plugin object (Fabric and its strategy both hold it), minus the input cast
        fabric.strategy.precision.__class__ = _AutocastKeepingFloat32Inputs
    return fabric


def evenly_spaced(total: int, wanted: int) -> np.ndarray:
    """``wanted`` indices spread evenly over ``range(total)``, the first included; all of them
    when ``wanted`` is 0 or at least ``total``. Index i is ``floor(i * total / wanted)``."""
    if wanted <= 0 or wanted >= total:
        return np.arange(total)
    return (np.arange(wanted) * total) // wanted


def area_weighted_mse(forecast: torch.Tensor, truth: torch.Tensor, row_weights: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-weighted mean squared error of each field, over the points where ``truth`` is
    finite (the weights renormalised over them).

    Parameters
    ----------
    forecast, truth : (..., lat, lon), physical units. A NaN of ``forecast`` where ``truth``
        is finite makes that field's error NaN (a diverged model is not hidden).
    row_weights : (lat, 1) latitude weights.

    Returns
    -------
    mse : (...) in the squared units of the fields; 0 where a field has no finite truth.
    scored : (...) bool, False where a field has no finite truth.
    """
    valid = torch.isfinite(truth)
    squared = torch.where(valid, (forecast - truth) ** 2, 0.0)
    weight = (valid * row_weights).sum((-2, -1))
    scored = weight > 0
    mse = (squared * row_weights).sum((-2, -1)) / torch.where(scored, weight, 1.0)
    return mse, scored


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


def _load_parameters(model: Forecaster, path: str) -> None:
    """Start from the trained parameters of another model file or checkpoint (fine-tuning).
    Only parameters are taken: normalisation buffers stay those of this run's store."""
    state = read_payload(path)["state_dict"]
    mine = dict(model.named_parameters())
    mismatched = sorted(name for name, value in mine.items()
                        if name not in state or state[name].shape != value.shape)
    if mismatched:
        raise ConfigError(f"'init_from' holds a model whose parameters do not fit this "
                          f"configuration ({len(mismatched)} differ, e.g. {mismatched[0]})",
                          "give a model of the same kind, sizes and channels", path=path)
    with torch.no_grad():
        for name, value in mine.items():
            value.copy_(state[name])


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
        # statistics of the training range at the model step: computed once (by rank 0) and
        # cached in the store, then read by every rank
        summary = training_summary(config.data) if self.fabric.global_rank == 0 else None
        self.fabric.barrier()
        self.summary = summary or training_summary(config.data)
        _check_ranks_agree(self.fabric, config, self.summary.metadata.get("fingerprint", ""))
        self.fabric.seed_everything(config.seed)
        self.model = Forecaster(config.model,
                                ModelMetadata.from_summary(self.summary, config.model),
                                self.summary.statics)
        if config.init_from:  # a resumed run then replaces them by its checkpoint's
            _load_parameters(self.model, config.init_from)
        self.loss = WeightedMSELoss.for_model(self.model).to(self.fabric.device)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr,
                                      weight_decay=config.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, config))
        self.module, self.optimizer = self.fabric.setup(self.model, optimizer)
        self.module.mark_forward_method("rollout")  # through DDP's forward: gradients sync
        # created after setup: the average lives on the device of the parameters
        self.ema = (ExponentialMovingAverage(self.model, config.optim.ema_decay)
                    if config.optim.ema_decay > 0 else None)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.train_set = WindowDataset(config.data.store, config.data.history,
                                       config.data.rollout, config.data.train,
                                       summary=self.summary)
        self._validation_set: WindowDataset | None = None
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
        # with a moving average, "state_dict" holds the average (the model to use) and
        # "training_state_dict" the training weights
        averaged = "training_state_dict" in payload
        self.model.load_state_dict(payload["training_state_dict"] if averaged
                                   else payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.step, self.epoch = payload["step"], payload["epoch"]
        self.batch_in_epoch = payload["batch_in_epoch"]
        if not averaged and payload.get("ema") is not None:
            self.fabric.print(f"warning: {payload['path']} holds only the moving average of the "
                              "weights (written before training weights were saved beside it): "
                              "training continues from the average, not exactly as before")
        if self.ema is not None:
            if averaged:
                self.ema.load_state_dict(payload["state_dict"])
            else:
                self.ema.reset()  # the run had no average: it starts here
        self._rng_after_resume = payload["rng"]  # restored in _batches, see there
        self.fabric.print(f"resumed from {payload['path']} at step {self.step}")

    def _save(self) -> None:
        state = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "rng": rng_state(),
                 "train_config": config_to_dict(self.config),
                 "store_fingerprint": self.summary.metadata.get("fingerprint", "")}
        if self.fabric.global_rank == 0:
            if self.ema is not None:
                # copies: on a CPU, .cpu() would return the parameters themselves, which
                # hold the average while the file is written
                state["training_state_dict"] = {name: value.detach().to("cpu", copy=True)
                                                for name, value in self.model.state_dict().items()}
            with self._published_weights():  # the model file part holds the average
                save_checkpoint(self.run_dir, self.model, state, self.config.keep_last)
        self.fabric.barrier()

    def _published_weights(self) -> Any:
        """Context in which the model holds the weights to validate and publish: the moving
        average when there is one, else the training weights."""
        return self.ema.applied() if self.ema is not None else nullcontext()

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
        # Fabric's forward applies the precision only where a strategy wraps the model (DDP):
        # in one process the marked method runs as it is, so autocast is entered here too
        with self.fabric.autocast():
            prediction = self.module.rollout(batch["inputs"],
                                             batch["forcings"][:, :history + rollout], rollout,
                                             batch["targets"])
        loss = self.loss(prediction, batch["targets"][:, :rollout])
        self.fabric.backward(loss / self.config.optim.accumulate)
        return loss.detach()

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
            if self.ema is not None:
                self.ema.update()
            self.step += 1
            stopping = stop_after is not None and self.step >= stop_after
            if self.step % config.log_every == 0 or self.step == config.optim.max_steps \
                    or stopping:  # the loss waits on the device only here
                loss = float(self.fabric.all_reduce(total, reduce_op="mean")
                             ) / config.optim.accumulate
                elapsed = time.perf_counter() - started
                last = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                        "train/rollout": rollout,
                        "train/samples_per_second": samples / max(elapsed, 1e-9)}
                self.fabric.log_dict(last, step=self.step)
                started, samples = time.perf_counter(), 0
                bar.set_postfix(loss=f"{loss:.4f}", rollout=rollout)
            bar.update(1)
            if config.data.validation and (self.step % config.val_every == 0
                                           or self.step == config.optim.max_steps):
                last.update(self.validate())
            if self.step % config.checkpoint_every == 0 or self.step == config.optim.max_steps:
                self._save()
            if stopping:
                break
        bar.close()
        if self.step >= config.optim.max_steps and self.fabric.global_rank == 0:
            with self._published_weights():
                save_model(self.model, self.run_dir / "model.pt")
        for logger in self.fabric.loggers:
            logger.finalize("success")
        return last

    def _validation_windows(self) -> Subset:
        """This rank's share of the validation windows: ``val_batches`` global batches
        (``val_batches * batch_size * world_size`` windows) spread evenly over the whole
        period (every window when ``val_batches`` is 0 or the period has fewer), dealt out
        round-robin, so that every window is scored once (no padding)."""
        config = self.config
        if self._validation_set is None:
            self._validation_set = WindowDataset(config.data.store, config.data.history,
                                                 config.data.rollout, config.data.validation,
                                                 summary=self.summary)
        world = self.fabric.world_size
        chosen = evenly_spaced(len(self._validation_set),
                               config.val_batches * config.data.batch_size * world)
        return Subset(self._validation_set, chosen[self.fabric.global_rank::world].tolist())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Latitude-weighted RMSE per predicted channel and lead, next to persistence.

        WeatherBench 2 convention, with the weights of :mod:`weathermodel.evaluation`
        (:func:`weathermodel.data.weights.latitude_weights`, ``auto``): the square root of the
        mean over windows of the area-weighted MSE, over the points where the truth is not
        missing. The model scored is the moving average when there is one; the windows are
        those of :meth:`_validation_windows`. Forcing channels are not scored.
        """
        config, device = self.config, self.fabric.device
        loader = DataLoader(self._validation_windows(), batch_size=config.data.batch_size,
                            num_workers=config.data.num_workers,
                            generator=torch.Generator())  # leaves the global one alone
        channels = self.model.output_channel_index.to(device)
        row_weights = torch.tensor(latitude_weights(self.summary.latitude), dtype=torch.float32,
                                   device=device).view(-1, 1)
        steps = config.data.rollout
        # [model, persistence] x [sum of per-window MSE, windows scored] per lead and channel
        accumulate = torch.float32 if device.type == "mps" else torch.float64
        totals = torch.zeros(2, 2, steps, channels.numel(), dtype=accumulate, device=device)
        was_training = self.model.training
        self.model.eval()
        with self._published_weights(), self.fabric.autocast():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                truth = batch["targets"][:, :steps].index_select(2, channels)
                forecast = self.model.rollout(batch["inputs"], batch["forcings"], steps,
                                              future=batch["targets"]).float().index_select(
                                                  2, channels)
                last = batch["inputs"][:, -1:].index_select(2, channels).expand_as(truth)
                for kind, (prediction, target) in enumerate((
                        (forecast, truth),
                        (last, torch.where(torch.isnan(last), torch.nan, truth)))):
                    mse, scored = area_weighted_mse(prediction, target, row_weights)
                    totals[kind, 0] += mse.sum(0)
                    totals[kind, 1] += scored.sum(0)
        self.model.train(was_training)
        totals = self.fabric.all_reduce(totals, reduce_op="sum").cpu()
        rmse = torch.sqrt(totals[:, 0] / totals[:, 1])
        hours = self.summary.metadata["time_step_seconds"] / 3600
        metrics = {}
        for lead in range(steps):
            for column, c in enumerate(channels.tolist()):
                if totals[0, 1, lead, column] == 0:
                    continue  # no window has a value of this channel
                tag = f"{self.summary.channels[c]}/{int((lead + 1) * hours)}h"
                metrics[f"val/rmse/{tag}"] = float(rmse[0, lead, column])
                metrics[f"val/persistence_rmse/{tag}"] = float(rmse[1, lead, column])
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

"""``weathermodel train``: data-parallel training on Lightning Fabric, with exact resume.

One code path for a laptop, one GPU node or many nodes: Fabric picks the accelerator and,
under ``torchrun`` or SLURM ``srun``, joins the process group the launcher set up (NCCL on GPUs,
gloo on CPUs). Each rank reads its shard of the shuffled windows; DDP averages gradients, so a
run on N processes with batch B/N each follows the same trajectory as one process with batch B.
Checkpoints record the data position, every RNG state, the training weights and (with
``optim.ema_decay``) their moving average, so ``--resume`` continues exactly (with any number
of loader workers).

Data come from :class:`~weathermodel.data.datamodule.WeatherDataModule`, the one loader path:
each batch holds only the states the rollout of its step needs (``history + rollout`` of the
schedule's current stage, not of its longest), in pinned memory on CUDA devices, copied with
``non_blocking``. The host waits for the device only on logging, validation and checkpoint
steps: the loss is summed on the device, and a non-finite gradient norm is flagged there and
reported at the next logging step. ``compile: true`` compiles the network with
``torch.compile``. Weight decay applies to the weight matrices and kernels of layers only,
not to biases, normalisation gains and learned embedding or position tables
(:func:`parameter_groups`).

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

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.plugins.precision.amp import MixedPrecision
from lightning.fabric.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from weathermodel.configuration import config_to_dict, dump_config
from weathermodel.data.datamodule import WeatherDataModule, to_device
from weathermodel.data.dataset import training_summary
from weathermodel.data.weights import latitude_weights
from weathermodel.errors import ConfigError, WeatherModelError
from weathermodel.host_memory import keep_freed_memory
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.io import read_payload, save_model
from weathermodel.models.loss import WeightedCRPSLoss, WeightedMSELoss
from weathermodel.training.checkpoint import (load_latest_checkpoint, restore_rng_state,
                                              rng_state, save_checkpoint)
from weathermodel.training.config import TrainConfig
from weathermodel.training.ema import ExponentialMovingAverage


#: data options that change how windows are loaded, not which: a run may resume with others
LOADER_ONLY_DATA_KEYS = ("num_workers", "prefetch_factor")

#: parameter names (lower case) that mark a free tensor as an embedding, bias or norm table
_NO_DECAY_NAME_PARTS = ("embedding", "bias", "norm")
_NORMALISATION_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
_DECAYED_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``[decayed, not decayed]``, each with ``param_names``.

    Decayed: the weight matrices and kernels (2 or more dims) of linear and convolution
    layers, and any other parameter of 2 or more dims whose name does not mention
    ``embedding``, ``bias`` or ``norm``. Not decayed (``weight_decay`` 0): every parameter of
    fewer than 2 dims (biases, normalisation gains and shifts), the weights of embedding and
    normalisation layers, and free tables named like an embedding, a bias or a norm (a
    learned latitude embedding, a relative position bias table).
    """
    decayed: list[tuple[str, nn.Parameter]] = []
    kept: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()  # a parameter shared by two modules goes in once
    for module_name, module in model.named_modules():
        for leaf, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            name = f"{module_name}.{leaf}" if module_name else leaf
            if parameter.ndim < 2 or isinstance(module, (nn.Embedding, *_NORMALISATION_LAYERS)):
                decay = False
            elif isinstance(module, _DECAYED_LAYERS):
                decay = True
            else:
                decay = not any(part in name.lower() for part in _NO_DECAY_NAME_PARTS)
            (decayed if decay else kept).append((name, parameter))
    return [{"params": [p for _, p in group], "param_names": [n for n, _ in group],
             "weight_decay": decay}
            for group, decay in ((decayed, weight_decay), (kept, 0.0))]


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                         model: nn.Module) -> bool:
    """Load an optimizer state; one saved with a single parameter group (before biases,
    norms and embeddings were exempted from weight decay) is regrouped parameter by
    parameter. Returns True when it was regrouped."""
    if len(saved["param_groups"]) == len(optimizer.param_groups):
        optimizer.load_state_dict(saved)
        return False
    position = {id(p): i for i, p in enumerate(model.parameters())}  # the old single group
    current = optimizer.state_dict()
    old_group = saved["param_groups"][0]
    for group, ours in zip(current["param_groups"], optimizer.param_groups):
        group.update({k: v for k, v in old_group.items()
                      if k not in ("params", "param_names", "weight_decay")})
    state = {}
    for group, ours in zip(current["param_groups"], optimizer.param_groups):
        for slot, parameter in zip(group["params"], ours["params"]):
            old = old_group["params"][position[id(parameter)]]
            if old in saved["state"]:
                state[slot] = saved["state"][old]
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    return True


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


def _without_loader_options(section: str, values: Any) -> Any:
    """A configuration section as compared on resume: the data section without the options
    that only change how windows are loaded (:data:`LOADER_ONLY_DATA_KEYS`)."""
    if section != "data" or not isinstance(values, dict):
        return values
    return {k: v for k, v in values.items() if k not in LOADER_ONLY_DATA_KEYS}


def _with_noise_columns(state: dict[str, torch.Tensor], mine: dict[str, torch.Tensor],
                        columns: slice) -> dict[str, torch.Tensor]:
    """A deterministic model's parameters widened for a stochastic model's noise inputs: the
    input layer gets zero weights for the noise channels (inserted where the noise enters), so
    fine-tuning with the CRPS starts from the deterministic forecast (AIFS-CRPS does the same)."""
    noise = columns.stop - columns.start
    widened = dict(state)
    for name, value in mine.items():
        old = state.get(name)
        if old is None or old.dim() < 2 or old.shape[1] + noise != value.shape[1] \
                or old.shape[:1] + old.shape[2:] != value.shape[:1] + value.shape[2:]:
            continue
        new = torch.zeros_like(value)
        new[:, :columns.start] = old[:, :columns.start]
        new[:, columns.stop:] = old[:, columns.start:]
        widened[name] = new
    return widened


def _load_parameters(model: Forecaster, path: str) -> None:
    """Start from the trained parameters of another model file or checkpoint (fine-tuning).
    Only parameters are taken: normalisation buffers stay those of this run's store."""
    state = read_payload(path)["state_dict"]
    mine = dict(model.named_parameters())
    if model.is_stochastic:
        state = _with_noise_columns(state, mine, model.noise_input_columns)
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
        keep_freed_memory()  # every step frees and allocates the same sizes: reuse them
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
        if config.compile:  # in place: parameter names and checkpoints stay as they are
            self.model.network.compile()
        self.loss = (WeightedCRPSLoss.for_model(self.model,
                                                alpha=config.model.ensemble.crps_alpha)
                     if self.model.is_stochastic
                     else WeightedMSELoss.for_model(self.model)).to(self.fabric.device)
        optimizer = torch.optim.AdamW(parameter_groups(self.model, config.optim.weight_decay),
                                      lr=config.optim.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, config))
        self.module, self.optimizer = self.fabric.setup(self.model, optimizer)
        self.module.mark_forward_method("rollout")  # through DDP's forward: gradients sync
        # created after setup: the average lives on the device of the parameters
        self.ema = (ExponentialMovingAverage(self.model, config.optim.ema_decay)
                    if config.optim.ema_decay > 0 else None)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.data = WeatherDataModule(config.data, seed=config.seed, summary=self.summary,
                                      rank=self.fabric.global_rank,
                                      world_size=self.fabric.world_size,
                                      pin_memory=self.fabric.device.type == "cuda",
                                      rollout_of_batch=self.rollout_of_batch)
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
            if _without_loader_options(key, saved.get(key)) != \
                    _without_loader_options(key, mine.get(key)):
                raise WeatherModelError(
                    f"the checkpoint was written with a different '{key}' configuration",
                    "resume with the configuration of that run, or use a new run_dir",
                    path=payload["path"])
        # with a moving average, "state_dict" holds the average (the model to use) and
        # "training_state_dict" the training weights
        averaged = "training_state_dict" in payload
        self.model.load_state_dict(payload["training_state_dict"] if averaged
                                   else payload["state_dict"])
        if load_optimizer_state(self.optimizer, payload["optimizer"], self.model):
            self.fabric.print(f"note: {payload['path']} was written when weight decay applied "
                              "to every parameter; from here it skips biases, norms and "
                              "embeddings, so the run does not continue exactly as before")
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
    def rollout_of_batch(self, batch: int) -> int:
        """Rollout steps read for micro-batch number ``batch`` (counted from the start of
        training): that of the optimizer step it belongs to."""
        return self.config.rollout_at(batch // self.config.optim.accumulate)

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches forever, epoch after epoch, from the recorded position, on the
        device."""
        loader = self.data.train_dataloader()
        while True:
            self.data.seek(self.epoch, self.batch_in_epoch)
            # draws a base seed from torch's global generator (with persistent workers, only
            # the first time)
            batches = iter(loader)
            if self._rng_after_resume is not None:
                # resuming: the uninterrupted run drew that seed before its checkpoint, so
                # restore the generators after it, for the exact same random streams
                restore_rng_state(self._rng_after_resume)
                self._rng_after_resume = None
            for batch in batches:
                self.batch_in_epoch += 1  # counted when handed out: a checkpoint after this
                yield to_device(batch, self.fabric.device)  # step skips it
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ---------------------------------------------------------------- loop
    def _micro_step(self, batch: dict[str, torch.Tensor], rollout: int) -> torch.Tensor:
        history = self.config.data.history
        inputs, forcings = batch["inputs"], batch["forcings"][:, :history + rollout]
        targets = batch["targets"][:, :rollout]
        members = self.config.model.ensemble.members if self.model.is_stochastic else 1
        if members > 1:  # each sample repeated: every copy draws its own noise
            inputs, forcings = (x.repeat_interleave(members, 0) for x in (inputs, forcings))
        # Fabric's forward applies the precision only where a strategy wraps the model (DDP):
        # in one process the marked method runs as it is, so autocast is entered here too
        with self.fabric.autocast():
            prediction = self.module.rollout(
                inputs, forcings, rollout,
                targets.repeat_interleave(members, 0) if members > 1 else targets)
        if members > 1:  # (batch, members, steps, channel, lat, lon) for the CRPS
            prediction = prediction.unflatten(0, (-1, members))
        loss = self.loss(prediction, targets)
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
        # set on the device when a step's gradient norm is not finite; read on logging steps
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.fabric.device)
        first_unchecked = self.step + 1
        while self.step < config.optim.max_steps:
            rollout = config.rollout_at(self.step)
            total = torch.zeros((), device=self.fabric.device)
            for micro in range(config.optim.accumulate):
                batch = next(batches)
                with self.fabric.no_backward_sync(self.module,
                                                  enabled=micro < config.optim.accumulate - 1):
                    total += self._micro_step(batch, rollout)
                samples += batch["inputs"].shape[0] * self.fabric.world_size
            if config.optim.grad_clip > 0:  # checked on the device: no wait here
                norm = self.fabric.clip_gradients(self.module, self.optimizer,
                                                  max_norm=config.optim.grad_clip,
                                                  error_if_nonfinite=False)
                nonfinite |= ~torch.isfinite(norm)
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
                if bool(nonfinite):
                    raise WeatherModelError(
                        f"training diverged: the gradient norm was not finite at a step "
                        f"between {first_unchecked} and {self.step} (loss {loss:.4g})",
                        "lower optim.lr or set optim.grad_clip, and resume from the last "
                        "checkpoint before the divergence", path=str(self.run_dir))
                first_unchecked = self.step + 1
                elapsed = time.perf_counter() - started
                last = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                        "train/rollout": rollout,
                        "train/samples_per_second": samples / max(elapsed, 1e-9)}
                self.fabric.log_dict(last, step=self.step)
                started, samples = time.perf_counter(), 0
                bar.set_postfix(loss=f"{loss:.4f}", rollout=rollout)
            bar.update(1)  # host-side only: the bar shows the loss of logging steps
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

    def _validation_loader(self) -> DataLoader:
        """This rank's share of the validation windows: ``val_batches`` global batches
        (``val_batches * batch_size * world_size`` windows) spread evenly over the whole
        period (every window when ``val_batches`` is 0 or the period has fewer), dealt out
        round-robin, so that every window is scored once (no padding)."""
        config = self.config
        return self.data.evaluation_dataloader(
            config.data.validation,
            config.val_batches * config.data.batch_size * self.fabric.world_size)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Latitude-weighted RMSE per predicted channel and lead, next to persistence.

        WeatherBench 2 convention, with the weights of :mod:`weathermodel.evaluation`
        (:func:`weathermodel.data.weights.latitude_weights`, ``auto``): the square root of the
        mean over windows of the area-weighted MSE, over the points where the truth is not
        missing. The model scored is the moving average when there is one; the windows are
        those of :meth:`_validation_loader`. Forcing channels are not scored.
        """
        config, device = self.config, self.fabric.device
        loader = self._validation_loader()  # leaves torch's global generator alone
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
                batch = to_device(batch, device)
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

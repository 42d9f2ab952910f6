"""Configuration of ``weathermodel train`` (printed at start, stored in every checkpoint)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weathermodel.data.config import DataConfig
from weathermodel.errors import ConfigError
from weathermodel.models.config import ModelConfig


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay.

    Attributes
    ----------
    lr : peak learning rate; weight_decay : AdamW decay.
    warmup_steps : optimizer steps of linear warm-up from 0 to ``lr``.
    max_steps : total optimizer steps of the run.
    min_lr_ratio : the cosine ends at ``lr * min_lr_ratio``.
    grad_clip : clip the global gradient norm to this (0: off).
    accumulate : micro-batches per optimizer step (gradient accumulation).
    ema_decay : keep an exponential moving average of the weights (0: off), in float32 on the
        device of the weights; validation, ``model.pt`` and the model part of checkpoints use
        the average, and checkpoints also keep the training weights, so that a resume
        continues both exactly.
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    accumulate: int = 1
    ema_decay: float = 0.0

    def validate(self) -> None:
        if self.max_steps < 1 or self.accumulate < 1 or self.warmup_steps < 0:
            raise ConfigError("max_steps and accumulate must be >= 1, warmup_steps >= 0",
                              "fix the optim section")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("'ema_decay' must lie in [0, 1)", "use e.g. 0.999, or 0 for off")


@dataclass
class RolloutStage:
    """From optimizer step ``from_step`` on, the loss covers ``rollout`` autoregressive steps."""

    from_step: int
    rollout: int


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Attributes
    ----------
    data, model, optim : see their classes. ``data.rollout`` must cover the longest stage.
    rollout_schedule : autoregressive fine-tuning, e.g. 1 step, then 2 from step 400, then 4.
    run_dir : where checkpoints and logs go.
    seed : seeds weights, shuffling and every random generator (same on every rank).
    accelerator : ``auto`` picks CUDA/ROCm/XPU/MPS when present, else CPU.
    devices : processes per node; ``auto`` uses every device (1 on CPU), or torchrun's value.
    num_nodes : nodes; ``0`` reads it from torchrun or SLURM.
    precision : ``32`` or ``bf16-mixed`` (bfloat16 autocast around the forward pass; weights,
        inputs and the loss stay float32). The one precision switch of the package.
    checkpoint_every, keep_last : save every N optimizer steps, keeping the newest K.
    log_every : log the training loss every N optimizer steps (the only steps that wait for
        the device).
    val_every : validate every N optimizer steps (and at the last).
    val_batches : validation scores this many global batches, i.e. ``val_batches *
        data.batch_size * processes`` windows spread evenly over the whole validation period
        (each scored once); 0 or more than the period holds: every window.
    process_group_timeout_s : collective operations fail after this, naming the stuck rank.
    init_from : a model file or checkpoint whose trained parameters start this run (fine-tuning,
        e.g. longer rollouts at a lower learning rate); the model configuration must give the
        same parameter shapes. Normalisation statistics come from this run's store.
    compile : compile the network with ``torch.compile`` (in place: parameter names and
        checkpoints are unchanged). The first steps take longer while it compiles (and again
        when a batch shape changes, e.g. a new rollout stage); on CPUs it needs a C++
        compiler.
    """

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout_schedule: list[RolloutStage] = field(
        default_factory=lambda: [RolloutStage(from_step=0, rollout=1)])
    run_dir: str = "outputs/run"
    seed: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 0
    precision: Literal["32", "bf16-mixed"] = "32"
    checkpoint_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 8
    process_group_timeout_s: int = 600
    init_from: str | None = None
    compile: bool = False

    def validate(self) -> None:
        stages = sorted(self.rollout_schedule, key=lambda s: s.from_step)
        if not stages or stages[0].from_step != 0:
            raise ConfigError("'rollout_schedule' must start at from_step 0",
                              "add {from_step: 0, rollout: 1}")
        longest = max(stage.rollout for stage in stages)
        if longest > self.data.rollout:
            raise ConfigError(f"the rollout schedule reaches {longest} steps but data.rollout "
                              f"is {self.data.rollout}", f"set data.rollout={longest}")
        if self.model.history != self.data.history:
            raise ConfigError(f"model.history ({self.model.history}) differs from data.history "
                              f"({self.data.history})", "set both to the same value")
        if self.checkpoint_every < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint_every and keep_last must be >= 1", "fix them")
        if self.log_every < 1 or self.val_every < 1 or self.val_batches < 0:
            raise ConfigError("log_every and val_every must be >= 1, val_batches >= 0",
                              "fix them (val_batches 0 scores every validation window)")

    def rollout_at(self, step: int) -> int:
        """Rollout steps in the loss at optimizer step ``step``."""
        current = 1
        for stage in sorted(self.rollout_schedule, key=lambda s: s.from_step):
            if step >= stage.from_step:
                current = stage.rollout
        return current

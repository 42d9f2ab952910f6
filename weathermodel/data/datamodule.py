"""The loaders of training, validation and test windows: the one loader path of ``train``.

Sharding: each process gets a disjoint, equally sized share of the shuffled training windows
through a :class:`ResumableSampler` (rank and world size given by the trainer, else from
``torch.distributed`` when it is initialised), which can start part-way through an epoch
(exact resume) and tags every window with the rollout the schedule needs at its batch, so
the dataset reads only those states. Validation and test windows are dealt out round-robin,
each scored once (no padding). Loader workers read whole batches, ``prefetch_factor`` batches
in flight each, and stay alive from epoch to epoch (``persistent_workers``); batches come in
pinned memory when the model is on a CUDA device, for asynchronous copies
(:func:`to_device`). ``weathermodel train`` (Lightning Fabric) uses this module for all its
data; under a Lightning ``Trainer``, turn its own sampler replacement off
(``use_distributed_sampler=False``) so that there is one sharding rule.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from weathermodel.data.config import DataConfig, DateRange
from weathermodel.data.dataset import StoreSummary, WindowDataset, training_summary

#: (optimizer micro-batch number since the start of training) -> rollout steps to read
RolloutOfBatch = Callable[[int], int]


def process_rank_and_count(trainer: L.Trainer | None = None) -> tuple[int, int]:
    """(rank, world size) of this process in data-parallel training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return 0, 1


def evenly_spaced(total: int, wanted: int) -> np.ndarray:
    """``wanted`` indices spread evenly over ``range(total)``, the first included; all of them
    when ``wanted`` is 0 or at least ``total``. Index i is ``floor(i * total / wanted)``."""
    if wanted <= 0 or wanted >= total:
        return np.arange(total)
    return (np.arange(wanted) * total) // wanted


def to_device(batch: dict[str, torch.Tensor], device: torch.device
              ) -> dict[str, torch.Tensor]:
    """The batch on ``device``, copied asynchronously (``non_blocking``): from pinned memory
    the host goes on to the next step while the copy runs; kernels queued after it on the
    same stream see the copied values."""
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


class ResumableSampler(DistributedSampler):
    """This rank's shuffled share of the windows, from any position of an epoch.

    Parameters
    ----------
    dataset : the training windows.
    batch_size : samples per batch on this rank.
    rollout_of_batch : the rollout steps the batch with a given number needs (batches
        counted from the start of training, ``epoch * batches_per_epoch + batch in epoch``);
        each index then comes as ``(index, rollout)`` and the dataset reads only
        ``history + rollout`` states. None: plain indices (the dataset reads its full rollout).
    **kwargs : those of :class:`~torch.utils.data.DistributedSampler`.

    ``skip`` samples of the epoch (a multiple of ``batch_size``: whole batches already
    trained on) are left out, so that a resumed run continues where the checkpoint was taken.
    The order depends on ``seed`` and the epoch only, never on the number of loader workers.
    """

    def __init__(self, dataset: Dataset, batch_size: int,
                 rollout_of_batch: RolloutOfBatch | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size
        self.rollout_of_batch = rollout_of_batch
        self.skip = 0

    @property
    def batches_per_epoch(self) -> int:
        """Whole batches of one epoch on this rank (a partial last batch is dropped)."""
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        indices = list(super().__iter__())[self.skip:]
        if self.rollout_of_batch is None:
            return iter(indices)
        first = self.epoch * self.batches_per_epoch
        return iter([(index, self.rollout_of_batch(first + (self.skip + n) // self.batch_size))
                     for n, index in enumerate(indices)])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class WeatherDataModule(L.LightningDataModule):
    """Loaders of :class:`WindowDataset` windows for each split of a :class:`DataConfig`.

    Parameters
    ----------
    config : the data section.
    seed : seeds the shuffling (the same on every rank).
    summary : the store's summary; default :func:`training_summary` of ``config``, read on
        first use.
    rank, world_size : this process in data-parallel training; default
        :func:`process_rank_and_count`.
    pin_memory : batches in page-locked memory (for asynchronous copies to a CUDA device).
    rollout_of_batch : see :class:`ResumableSampler`; None reads ``config.rollout`` targets.
    """

    def __init__(self, config: DataConfig, seed: int = 0, summary: StoreSummary | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 pin_memory: bool = False,
                 rollout_of_batch: RolloutOfBatch | None = None) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self._summary = summary
        self._rank, self._world_size = rank, world_size
        self.pin_memory = pin_memory
        self.rollout_of_batch = rollout_of_batch
        self._train_loader: DataLoader | None = None
        self._evaluation_loaders: dict[tuple[str, str, int], DataLoader] = {}

    @property
    def summary(self) -> StoreSummary:
        """The store at the model's step, with statistics of the training range (see
        :func:`~weathermodel.data.dataset.training_summary`)."""
        if self._summary is None:
            self._summary = training_summary(self.config)
        return self._summary

    def rank_and_world_size(self) -> tuple[int, int]:
        if self._rank is not None and self._world_size is not None:
            return self._rank, self._world_size
        return process_rank_and_count(self.trainer if self._has_trainer() else None)

    def dataset(self, date_range: DateRange | None) -> WindowDataset:
        return WindowDataset(self.config.store, self.config.history, self.config.rollout,
                             date_range, summary=self.summary)

    def _has_trainer(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def _loader(self, dataset: Dataset, **options: Any) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(dataset, batch_size=self.config.batch_size, num_workers=workers,
                          prefetch_factor=self.config.prefetch_factor if workers else None,
                          persistent_workers=workers > 0, pin_memory=self.pin_memory,
                          **options)

    # ---------------------------------------------------------------- training
    def train_dataloader(self) -> DataLoader:
        """This rank's shuffled training batches (one loader, kept: its workers persist).
        Position it with :meth:`seek` before each ``iter``."""
        if self._train_loader is None:
            dataset = self.dataset(self.config.train)
            rank, world = self.rank_and_world_size()
            sampler = ResumableSampler(dataset, self.config.batch_size, self.rollout_of_batch,
                                       num_replicas=world, rank=rank, shuffle=True,
                                       seed=self.seed, drop_last=True)
            self._train_loader = self._loader(dataset, sampler=sampler, drop_last=True)
        return self._train_loader

    @property
    def train_sampler(self) -> ResumableSampler:
        return self.train_dataloader().sampler

    def seek(self, epoch: int, batch_in_epoch: int) -> None:
        """Make the next ``iter`` of the training loader start at batch ``batch_in_epoch``
        of epoch ``epoch`` (the shuffle of each epoch is fixed by the seed and the epoch)."""
        sampler = self.train_sampler
        sampler.set_epoch(epoch)
        sampler.skip = batch_in_epoch * self.config.batch_size

    # ---------------------------------------------------------------- evaluation
    def evaluation_dataloader(self, date_range: DateRange | None, windows: int = 0
                              ) -> DataLoader:
        """This rank's share of ``windows`` windows spread evenly over ``date_range`` (every
        window when 0 or more than the range holds), dealt out round-robin across ranks so
        that each is read once (no padding), in order, with every rollout state. The loader
        draws nothing from torch's global random generator. Kept for the next call."""
        key = ((date_range.start, date_range.end) if date_range else ("", "")) + (windows,)
        if key not in self._evaluation_loaders:
            dataset = self.dataset(date_range)
            rank, world = self.rank_and_world_size()
            chosen = evenly_spaced(len(dataset), windows)[rank::world].tolist()
            self._evaluation_loaders[key] = self._loader(Subset(dataset, chosen),
                                                         generator=torch.Generator())
        return self._evaluation_loaders[key]

    def val_dataloader(self) -> DataLoader:
        return self.evaluation_dataloader(self.config.validation)

    def test_dataloader(self) -> DataLoader:
        return self.evaluation_dataloader(self.config.test)

"""LightningDataModule over a training store: train/validation/test by date range.

Sharding: each process gets a disjoint, equally sized share of the samples through a
:class:`~torch.utils.data.DistributedSampler` (rank and world size from ``torch.distributed``
when it is initialised, else from the trainer), and each loader worker reads whole batches of
its own, with ``prefetch_factor`` batches in flight. The training code turns Lightning's own
sampler replacement off (``use_distributed_sampler=False``) so there is one sharding rule.
"""
from __future__ import annotations

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from weathermodel.data.config import DataConfig, DateRange
from weathermodel.data.dataset import StoreSummary, WindowDataset, training_summary


def process_rank_and_count(trainer: L.Trainer | None = None) -> tuple[int, int]:
    """(rank, world size) of this process in data-parallel training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return 0, 1


class WeatherDataModule(L.LightningDataModule):
    """Loaders of :class:`WindowDataset` windows for each split of a :class:`DataConfig`."""

    def __init__(self, config: DataConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self._summary: StoreSummary | None = None

    @property
    def summary(self) -> StoreSummary:
        """The store at the model's step, with statistics of the training range (see
        :func:`~weathermodel.data.dataset.training_summary`)."""
        if self._summary is None:
            self._summary = training_summary(self.config)
        return self._summary

    def dataset(self, date_range: DateRange | None) -> WindowDataset:
        return WindowDataset(self.config.store, self.config.history, self.config.rollout,
                             date_range, summary=self.summary)

    def _loader(self, date_range: DateRange | None, shuffle: bool) -> DataLoader:
        dataset = self.dataset(date_range)
        rank, world = process_rank_and_count(self.trainer if self._has_trainer() else None)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                     seed=self.seed, drop_last=shuffle and world > 1)
        workers = self.config.num_workers
        return DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler,
                          num_workers=workers, drop_last=shuffle,
                          prefetch_factor=self.config.prefetch_factor if workers else None,
                          persistent_workers=workers > 0, pin_memory=False)

    def _has_trainer(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.config.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.config.validation, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.config.test, shuffle=False)

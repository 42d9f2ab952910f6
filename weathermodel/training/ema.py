"""Exponential moving average of a model's weights, kept on the weights' device."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

from weathermodel.errors import CheckpointError


class ExponentialMovingAverage:
    """Exponential moving average of a model's parameters, in float32 on their device.

    After every optimizer step, ``average = decay * average + (1 - decay) * parameter`` for all
    parameters at once (one fused ``torch._foreach_lerp_``). Buffers (normalisation
    statistics, graph features) are constants and are not averaged.

    Parameters
    ----------
    model : the trained module; its parameter tensors are followed (not copied) from now on.
    decay : weight of the past average, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self._parameters = [parameter for _, parameter in named]
        self.average = [torch.empty_like(p, dtype=torch.float32) for p in self._parameters]
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current parameters."""
        for average, parameter in zip(self.average, self._parameters):
            average.copy_(parameter)

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the current parameters."""
        current = [p.detach().float() for p in self._parameters]
        torch._foreach_lerp_(self.average, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (float32, on their device)."""
        return dict(zip(self.names, self.average))

    @torch.no_grad()
    def load_state_dict(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Copy saved averages (any device) into this average, which stays on its device.

        Raises
        ------
        CheckpointError : a parameter is missing from ``saved`` or has another shape.
        """
        wrong = [name for name, average in zip(self.names, self.average)
                 if name not in saved or tuple(saved[name].shape) != tuple(average.shape)]
        if wrong:
            raise CheckpointError(f"the saved moving average lacks or misshapes {wrong[:5]}",
                                  "resume with the model configuration of that run")
        for name, average in zip(self.names, self.average):
            average.copy_(saved[name])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model's parameters hold the average; the training weights are
        put back afterwards, bit for bit."""
        with torch.no_grad():
            training = [p.detach().clone() for p in self._parameters]
            for parameter, average in zip(self._parameters, self.average):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, weights in zip(self._parameters, training):
                    parameter.copy_(weights)

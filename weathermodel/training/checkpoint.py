"""Self-describing training checkpoints: plain data, loadable with ``weights_only=True``.

Everything in a checkpoint, the optimizer and scheduler state and the RNG states included, is
tensors, numbers, strings, lists and dicts, so resuming reads it with ``weights_only=True``
(through :func:`weathermodel.models.io.read_payload`, which also applies format migrations)
and never unpickles an object.

A checkpoint is a model file (:mod:`weathermodel.models.io`: configuration, data metadata,
weights; inference needs nothing else) plus what an exact resume needs: optimizer and scheduler
state, step, data position, the RNG states of torch, numpy and Python, and the training
configuration. With an exponential moving average of the weights (``optim.ema_decay``) the
model file part (``state_dict``) holds the average, the model to use, and
``training_state_dict`` the training weights (both complete state dicts, float32). Files are
written atomically by rank 0; the newest ``keep_last`` stay.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weathermodel.errors import CheckpointError
from weathermodel.models.io import model_payload, read_payload, save_atomic

CHECKPOINT_PATTERN = re.compile(r"checkpoint-step(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """RNG states as plain data (no numpy arrays, which weights_only refuses)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "position": int(position), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint-step{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "checkpoints"
    found = []
    for path in folder.glob("checkpoint-step*.pt") if folder.is_dir() else []:
        match = CHECKPOINT_PATTERN.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write ``checkpoint-step<N>.pt`` and ``last.pt`` atomically; prune old ones."""
    payload = {**model_payload(model), "kind": "training_checkpoint", **state}
    path = save_atomic(payload, checkpoint_path(run_dir, state["step"]))
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    for stale in path.parent.glob(".checkpoint-step*.pt.tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of a run, or None when the run has none."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    try:
        payload = read_payload(checkpoints[-1][1])
    except CheckpointError as error:  # never fall back silently: the user decides
        earlier = (f"the previous checkpoint (step {checkpoints[-2][0]})"
                   if len(checkpoints) > 1 else "step 0")
        raise CheckpointError(f"the newest checkpoint cannot be resumed from: {error.problem}",
                              f"move this file out of the run directory to resume from "
                              f"{earlier}, or {error.fix}", path=error.path) from error
    if payload.get("kind") != "training_checkpoint":
        raise CheckpointError("the newest checkpoint is a model file, not a training "
                              "checkpoint", "resume from a training run directory",
                              path=str(checkpoints[-1][1]))
    payload["path"] = str(checkpoints[-1][1])
    return payload

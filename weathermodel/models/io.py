"""Save and load forecasters with their configuration and data metadata; no pickle.

A model file is a ``torch.save`` of plain data only (dicts, lists, strings, numbers, tensors),
so ``torch.load(weights_only=True)`` reads it and nothing else is needed to rebuild the model.
Writes go to a temporary file that replaces the target atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import weathermodel
from weathermodel.configuration import config_to_dict, from_dict
from weathermodel.errors import WeatherModelError
from weathermodel.models.config import ModelConfig
from weathermodel.models.forecaster import Forecaster, ModelMetadata

MODEL_FORMAT_VERSION = 1


class CheckpointError(WeatherModelError):
    """A model or checkpoint file that cannot be used."""


def model_payload(model: Forecaster) -> dict[str, Any]:
    """Plain-data description of a model: config, metadata, statics and weights."""
    return {
        "format_version": MODEL_FORMAT_VERSION,
        "package_version": weathermodel.__version__,
        "model_config": config_to_dict(model.config),
        "metadata": model.metadata.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the file: {error}",
                              "check free space and write permission", path=str(path)) from error
    return path


def save_model(model: Forecaster, path: str | Path) -> Path:
    return save_atomic(model_payload(model), path)


def read_payload(path: str | Path) -> dict[str, Any]:
    """Load a model/checkpoint file safely (weights only), checking its format version."""
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError("no such file", "check the path", path=str(path)) from error
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise CheckpointError(f"not a readable weathermodel checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]})",
                              "the file is corrupt, truncated or not a checkpoint: use another "
                              "checkpoint (only plain tensors and data are ever loaded)",
                              path=str(path)) from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError("the file holds no weathermodel format version",
                              "use a checkpoint written by weathermodel", path=str(path))
    version = payload["format_version"]
    if version != MODEL_FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version} is not supported (this "
                              f"version reads {MODEL_FORMAT_VERSION})",
                              "use the weathermodel version that wrote it, or retrain",
                              path=str(path))
    return payload


def model_from_payload(payload: dict[str, Any], path: str | Path = "<memory>",
                       cache_dir: str | Path | None = None) -> Forecaster:
    config = from_dict(ModelConfig, payload["model_config"])
    metadata = ModelMetadata.from_dict(payload["metadata"])
    # the saved statics are already normalised; the constructor's copy is replaced just below
    # by load_state_dict, so only their shape matters here
    statics = payload["state_dict"]["statics"]
    model = Forecaster(config, metadata, statics.numpy(), cache_dir=cache_dir)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"weights do not fit the configuration stored with them: {error}",
                              "the checkpoint is inconsistent; use another", path=str(path)) \
            from error
    return model


def load_model(path: str | Path, cache_dir: str | Path | None = None) -> Forecaster:
    """Rebuild a saved forecaster (CPU; move it with ``.to(device)``)."""
    return model_from_payload(read_payload(path), path, cache_dir)

"""Save and load forecasters with their configuration and data metadata; no pickle.

A model file is a ``torch.save`` of plain data only (dicts, lists, strings, numbers, tensors),
so ``torch.load(weights_only=True)`` reads it and nothing else is needed to rebuild the model:
a file holding any other object (a pickled class, a function to call) is refused, never
executed. Every file records a digest of its contents (``content_sha256``), checked on loading:
``torch.load`` reads a file whose tensor bytes were damaged without complaint, and such a file
must be refused, not forecast from. Files of an older format version are upgraded by the
registered migrations (:mod:`weathermodel.models.migrations`) or refused with the version
named. Writes go to a temporary file that replaces the target atomically.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

import weathermodel
from weathermodel.configuration import config_to_dict, from_dict
from weathermodel.errors import CheckpointError, storage_error
from weathermodel.models.config import ModelConfig
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.migrations import CURRENT_FORMAT_VERSION, DIGEST_KEY, migrate

MODEL_FORMAT_VERSION = CURRENT_FORMAT_VERSION

__all__ = ["CheckpointError", "MODEL_FORMAT_VERSION", "content_digest", "load_model",
           "model_from_payload", "model_payload", "read_payload", "save_atomic", "save_model"]


def _feed(digest: Any, where: str, value: Any) -> None:
    """Add ``value`` (nested dicts, lists, tuples, tensors, plain scalars) to ``digest``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{where}:tensor:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"{where}:dict:{len(value)}\n".encode())
        for key in sorted(value, key=repr):
            _feed(digest, f"{where}/{key!r}", value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{where}:{type(value).__name__}:{len(value)}\n".encode())
        for index, item in enumerate(value):
            _feed(digest, f"{where}[{index}]", item)
    else:
        digest.update(f"{where}:{type(value).__name__}:{value!r}\n".encode())


def content_digest(payload: dict[str, Any]) -> str:
    """sha256 of everything in a payload but the digest itself: every tensor's dtype, shape
    and bytes and every other value, with where it lies."""
    digest = hashlib.sha256()
    _feed(digest, "", {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return digest.hexdigest()


def model_payload(model: Forecaster) -> dict[str, Any]:
    """Plain-data description of a model: config, metadata, whether it is stochastic, statics
    and weights."""
    return {
        "format_version": MODEL_FORMAT_VERSION,
        "package_version": weathermodel.__version__,
        "model_config": config_to_dict(model.config),
        "metadata": model.metadata.to_dict(),
        # a CRPS-trained model draws noise at each step: each forecast member is one sample
        "stochastic": model.is_stochastic,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename over it.

    The payload is written with the current format version and the digest of its contents.
    """
    payload = {**payload, "format_version": MODEL_FORMAT_VERSION}
    payload[DIGEST_KEY] = content_digest(payload)
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
        raise storage_error(error, str(path), "a file already at that path is unchanged (it is "
                            "replaced only by a complete one)") from error
    return path


def save_model(model: Forecaster, path: str | Path) -> Path:
    return save_atomic(model_payload(model), path)


def _load_error(error: Exception, path: str | Path) -> CheckpointError:
    """Explain why ``torch.load(weights_only=True)`` refused a file."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if "Weights only load failed" in text or refused:
        what = f" ({refused.group(1)})" if refused else ""
        return CheckpointError(
            f"holds objects other than tensors and plain data{what}, which could run code when "
            "unpickled; it was not loaded", "use a model file or checkpoint written by "
            "weathermodel; do not load this file by other means unless you trust its source",
            path=str(path))
    return CheckpointError(f"not a readable weathermodel checkpoint ({type(error).__name__}: "
                           f"{text.splitlines()[0][:200] if text else ''})",
                           "the file is corrupt, truncated or not a checkpoint: use another "
                           "checkpoint, or copy it again from where it came from",
                           path=str(path))


def read_payload(path: str | Path) -> dict[str, Any]:
    """Load a model/checkpoint file (or a checkpoint folder's ``model.pt``) safely (weights
    only), checking its format version."""
    path = model_file(path)
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError("no such file", "check the path", path=str(path)) from error
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise _load_error(error, path) from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError("the file holds no weathermodel format version (e.g. a bare "
                              "state_dict, or a file of another program)",
                              "use a model file or checkpoint written by weathermodel",
                              path=str(path))
    migrated = migrate(payload, str(path))  # refuses versions it cannot read, naming them
    # the digest covers the file as written: checked on the payload before migration
    expected = payload.get(DIGEST_KEY)
    if expected is not None and content_digest(payload) != expected:
        raise CheckpointError("the contents do not match the digest recorded when the file was "
                              "written: the file is damaged (e.g. bytes changed on disk or in "
                              "a copy)", "copy it again from where it came from, or use another "
                              "checkpoint", path=str(path))
    payload = migrated
    missing = [key for key in ("model_config", "metadata", "state_dict") if key not in payload]
    if missing:
        raise CheckpointError(f"the file lacks {missing}", "the file is damaged or not a "
                              "weathermodel checkpoint: use another", path=str(path))
    return payload


def model_from_payload(payload: dict[str, Any], path: str | Path = "<memory>",
                       cache_dir: str | Path | None = None) -> Forecaster:
    config = from_dict(ModelConfig, payload["model_config"])
    metadata = ModelMetadata.from_dict(payload["metadata"])
    # the saved statics are already normalised; the constructor's copy is replaced just below
    # by load_state_dict, so only their shape matters here
    statics = payload["state_dict"]["statics"]
    with torch.random.fork_rng(devices=[]):  # the initial weights are replaced just below:
        # drawing them must not advance the caller's random generator
        model = Forecaster(config, metadata, statics.numpy(), cache_dir=cache_dir)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"weights do not fit the configuration stored with them: {error}",
                              "the checkpoint is inconsistent; use another", path=str(path)) \
            from error
    return model


def model_file(path: str | Path) -> Path:
    """The model file of ``path``: the file itself, or ``model.pt`` in a checkpoint folder
    (e.g. ``checkpoints/ncep_graph_2013``)."""
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def load_model(path: str | Path, cache_dir: str | Path | None = None) -> Forecaster:
    """Rebuild a saved forecaster from a model file, checkpoint or checkpoint folder (CPU;
    move it with ``.to(device)``)."""
    file = model_file(path)
    return model_from_payload(read_payload(file), file, cache_dir)

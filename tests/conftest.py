"""Shared fixtures: where the real sample data lies, and small helpers."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def sample_data_dir() -> Path | None:
    """``$WEATHERMODEL_SAMPLE_DATA`` or ``../shared/data`` beside the project root."""
    candidate = os.environ.get("WEATHERMODEL_SAMPLE_DATA")
    path = Path(candidate) if candidate else PROJECT_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = sample_data_dir()
    if path is None:
        pytest.skip("real sample data not found: set WEATHERMODEL_SAMPLE_DATA to the folder "
                    "holding ncep-air-2013/, cfgrib/, ... (../shared/data by default)")
    return path


@pytest.fixture(scope="session")
def ncep_file(data_dir: Path) -> Path:
    return data_dir / "ncep-air-2013" / "air_temperature_2013.nc"


def free_port() -> int:
    """A free TCP port on loopback, for process groups and servers started by a test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def apply_overrides(config: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``optim.max_steps``) of a nested config dict; returns the dict."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts, lists and tensors equal bit for bit (NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a.cpu(), b.cpu()), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"

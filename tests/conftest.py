"""Shared fixtures: where the real sample data lies, and small helpers."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

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

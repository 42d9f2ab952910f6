"""The data path: ingest (``prepare``), the training store, and torch loading.

Names are imported on first use, so that ``prepare`` does not pay for importing torch.
"""
from importlib import import_module

_EXPORTS = {
    "DataConfig": "config", "DateRange": "config", "PrepareConfig": "config",
    "SourceSpec": "config", "VariableSpec": "config", "WeatherDataModule": "datamodule",
    "WindowDataset": "dataset", "read_summary": "dataset", "training_summary": "dataset",
    "prepare": "prepare",
    "open_store": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'weathermodel.data' has no attribute {name!r}")
    return getattr(import_module(f"weathermodel.data.{_EXPORTS[name]}"), name)

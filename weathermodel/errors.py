"""Errors that explain themselves: every one names where, what, and how to fix it."""
from __future__ import annotations


class WeatherModelError(Exception):
    """Base class of every error ``weathermodel`` raises on purpose.

    Parameters
    ----------
    problem : what is wrong, in one sentence.
    fix : what the user should do about it.
    path : the file, store or URL concerned, if any.
    variable : the variable concerned, if any.
    """

    def __init__(self, problem: str, fix: str, path: str | None = None,
                 variable: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        self.path = path
        self.variable = variable
        where = []
        if path:
            where.append(f"file '{path}'")
        if variable:
            where.append(f"variable '{variable}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(f"{prefix}{problem}\n  fix: {fix}")


class DataError(WeatherModelError):
    """Input data that cannot be ingested as it is (units, grid, time axis, values)."""


class ConfigError(WeatherModelError):
    """A configuration file or override that does not validate."""


class StoreError(WeatherModelError):
    """A training store that is missing, incomplete, or made by another configuration."""

"""Errors that explain themselves: every one names where, what, and how to fix it."""
from __future__ import annotations

import errno


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


class CheckpointError(WeatherModelError):
    """A model or checkpoint file that cannot be used (corrupt, foreign, unsupported version)."""


class OutputError(WeatherModelError):
    """An output that cannot be written: disk full, quota or file-size limit, read-only path."""


#: errno values that can only come from writing, with the words the user sees
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file-size limit is exceeded (ulimit -f, or the file system's maximum)",
    errno.EROFS: "the file system is read-only",
}
#: errno values from a path that cannot be used, for reading or for writing
_ACCESS_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder, not a file",
    errno.EEXIST: "a file is in the way of a folder to create",
}


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` is an ``OSError`` about storage (space, limits, permissions)."""
    return isinstance(error, OSError) and error.errno in {**_WRITE_ERRNOS, **_ACCESS_ERRNOS}


def storage_error(error: OSError, path: str | None, kept: str) -> OutputError:
    """A clear :class:`OutputError` from an ``OSError`` met while writing an output.

    Parameters
    ----------
    error : the operating system's error (``errno`` set).
    path : the output concerned (the path the user gave); the file the operating system
        names, when another, is quoted in the problem.
    kept : one sentence on what survives and how to carry on, e.g. "the store written so far
        is kept: run the same command again to resume".

    Returns
    -------
    OutputError naming the path, the operating system's reason and what to do.
    """
    name = errno.errorcode.get(error.errno or 0, "")
    reason = _WRITE_ERRNOS.get(error.errno) or _ACCESS_ERRNOS.get(error.errno) or \
        (error.strerror or str(error))
    where = str(path or error.filename or "") or None
    inner = f" '{error.filename}'" if error.filename and str(error.filename) != where else ""
    if error.errno in _WRITE_ERRNOS:
        problem = f"cannot write{inner}: {reason} [{name}]"
        fix = "free some space (or raise the limit), or choose another output path (--out)"
    else:
        problem = f"cannot use the path{inner}: {reason} [{name}]"
        fix = ("check the path and its permissions, or choose an output path (--out) in a "
               "folder you can write to")
    return OutputError(problem, f"{fix}; {kept}", path=where)

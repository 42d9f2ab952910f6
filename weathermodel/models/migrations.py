"""Format migrations of model and checkpoint files: old files are upgraded or refused by name.

Every model file and training checkpoint (:mod:`weathermodel.models.io`) records
``format_version``. Loading passes the payload (plain data, read with ``weights_only=True``)
through :func:`migrate`, which applies the registered migrations one version at a time until the
payload has the current layout. A version with no registered migration is refused with the
version named; a version newer than this package reads is refused with "upgrade weathermodel".

Migrations only rename and reshape plain data: they never import or execute anything from the
file.

Layout history
--------------
1
    ``format_version``, ``package_version``, ``model_config``, ``metadata``, ``state_dict``
    (training checkpoints add ``kind``, optimizer, scheduler, RNG, data position, ...).
2
    Version 1 plus ``content_sha256``: a digest of every tensor and value of the payload,
    written by :func:`weathermodel.models.io.save_atomic` and checked on loading, so that a
    file damaged inside its tensor data (which ``torch.load`` reads without complaint) is
    refused instead of giving wrong weights. Version 1 files are migrated with
    ``content_sha256 = None``: they load, unverified.
3 (current)
    Variable roles: ``metadata`` gains ``channel_roles`` and ``channel_has_missing``, and the
    model configuration loses ``bf16`` (training's ``precision`` is the one switch). Version 2
    files are migrated with every channel prognostic and none imputed, as they were trained,
    and with ``graph.edge_normalization: icosahedron_edge`` (the edge features they were
    trained on; new graph models divide each edge set by its own longest edge).

To change the layout: bump ``CURRENT_FORMAT_VERSION``, write the new layout in
``model_payload``, and register a function here that turns a payload of the previous version
into the new one::

    @register_migration(2)
    def _v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
        ...
        return payload
"""
from __future__ import annotations

from typing import Any, Callable

from weathermodel.errors import CheckpointError

#: the layout :func:`weathermodel.models.io.model_payload` writes
CURRENT_FORMAT_VERSION = 3
#: the payload key holding the digest of the contents (from version 2)
DIGEST_KEY = "content_sha256"

Migration = Callable[[dict[str, Any]], dict[str, Any]]
_MIGRATIONS: dict[int, Migration] = {}


def register_migration(from_version: int) -> Callable[[Migration], Migration]:
    """Register ``function(payload) -> payload`` as the upgrade of ``from_version`` to the next.

    Parameters
    ----------
    from_version : the format version the function reads; it must return a payload in the
        layout of ``from_version + 1`` (:func:`migrate` sets ``format_version`` itself).

    Raises
    ------
    ValueError : a migration from that version is already registered, or the version is not
        older than the current one.
    """
    if from_version in _MIGRATIONS:
        raise ValueError(f"a migration from format version {from_version} is already registered")
    if not 0 <= from_version < CURRENT_FORMAT_VERSION:
        raise ValueError(f"format version {from_version} is not older than the current "
                         f"version {CURRENT_FORMAT_VERSION}")

    def decorate(function: Migration) -> Migration:
        _MIGRATIONS[from_version] = function
        return function

    return decorate


def registered_versions() -> list[int]:
    """The format versions that :func:`migrate` can upgrade."""
    return sorted(_MIGRATIONS)


def migrate(payload: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """Bring a loaded payload to :data:`CURRENT_FORMAT_VERSION`.

    Parameters
    ----------
    payload : the plain data of a model file or checkpoint, with ``format_version``.
    path : the file it came from, named in errors.

    Returns
    -------
    The payload in the current layout (a new dict when migrated, the same one otherwise).
    A migrated payload records the version it was read from in ``migrated_from``.

    Raises
    ------
    CheckpointError : the version is not an integer, is newer than this package reads, or is
        older with no registered migration.
    """
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"format version {version!r} is not an integer",
                              "use a checkpoint written by weathermodel", path=path)
    if version > CURRENT_FORMAT_VERSION:
        written_by = payload.get("package_version", "a newer version")
        raise CheckpointError(
            f"checkpoint format version {version} is newer than this weathermodel reads "
            f"(up to {CURRENT_FORMAT_VERSION}); it was written by weathermodel {written_by}",
            "upgrade weathermodel (pip install --upgrade weathermodel) to read it", path=path)
    original = version
    while version < CURRENT_FORMAT_VERSION:
        step = _MIGRATIONS.get(version)
        if step is None:
            raise CheckpointError(
                f"checkpoint format version {version} is older than this weathermodel reads "
                f"({CURRENT_FORMAT_VERSION}) and no migration from version {version} is "
                f"registered (migrations exist from {registered_versions()})",
                "load it with the weathermodel version that wrote it "
                f"({payload.get('package_version', 'unknown')}) and retrain or re-export, or "
                "use a newer checkpoint", path=path)
        try:
            payload = step(dict(payload))
        except (CheckpointError, KeyError, TypeError, ValueError) as error:
            problem = error.problem if isinstance(error, CheckpointError) else repr(error)
            raise CheckpointError(f"cannot migrate from format version {version}: {problem}",
                                  "the file is damaged: use another checkpoint",
                                  path=path) from error
        version += 1
        payload["format_version"] = version
    if version != original:
        payload["migrated_from"] = original
    return payload


@register_migration(1)
def _v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 files carry no digest of their contents: they load unverified."""
    payload[DIGEST_KEY] = None
    return payload


@register_migration(2)
def _v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 2 models treat every channel as prognostic and never impute."""
    config = dict(payload["model_config"])
    config.pop("bf16", None)
    # their graph edge features were divided by the longest multi-mesh edge (mesh format 1)
    config["graph"] = {"edge_normalization": "icosahedron_edge", **config.get("graph", {})}
    payload["model_config"] = config
    metadata = dict(payload["metadata"])
    n_channels = len(metadata["channels"])
    metadata.setdefault("channel_roles", ["prognostic"] * n_channels)
    metadata.setdefault("channel_has_missing", [False] * n_channels)
    payload["metadata"] = metadata
    return payload

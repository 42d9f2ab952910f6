"""Reliability: faults, bad input and untrusted files never lose work or fail silently.

Every fault and bad input here goes through the command line in a real process, on files made
from the real samples. Faults (kill -9, a full disk) run ``python -m weathermodel ...`` itself;
the refusals of bad inputs run ``weathermodel.cli.main`` (what the executable calls) for many
argument lists in one process, which starts the interpreter once instead of twenty times.

1. ``kill -9`` of ``train`` after a checkpoint, then ``--resume``: bit-identical final weights
   and optimizer state; a killed ``prepare`` or ``forecast`` is refused by every reader until
   the same command has finished it (the resumed stores' identity with uninterrupted runs is
   tested in test_prepare_store.py and test_forecast.py).
2. A corpus of bad inputs to ``forecast`` and ``evaluate`` (checkpoints of another
   configuration, truncated, damaged, pickled or of another format version; initial conditions
   flipped, in Celsius, with NaNs, duplicated or missing times, truncated; truths and forecasts
   truncated or on another grid): exit code 2, a message naming the file, the problem and the
   fix, and the output already at ``--out`` unchanged, byte for byte.
3. A full disk (``RLIMIT_FSIZE`` in the child: CPython ignores SIGXFSZ, so writes fail with
   EFBIG), an output larger than the free space, or a path that cannot be written (as root,
   permission bits stop nothing: a path below a regular file, or in sysfs): a clear error
   before work is lost, and the same command resumes.
4. Checkpoints are plain data with a digest of their contents; older format versions are
   migrated (a real checkpoint rewritten in the version 1 layout) or refused by version.

The bad-input corpus of ``prepare`` is in test_bad_inputs.py, whose helpers are reused here.
"""
from __future__ import annotations

import ast
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from weathermodel.cli import main
from weathermodel.data.dataset import read_summary
from weathermodel.data.prepare import prepare
from weathermodel.data.store import load_progress, open_store, read_metadata
from weathermodel.errors import CheckpointError, OutputError, StoreError
from weathermodel.evaluation.evaluate import evaluate
from weathermodel.inference.forecast import ForecastOptions, forecast
from weathermodel.inference.output import done_indices, progress_dir
from weathermodel.models import migrations
from weathermodel.models.forecaster import ModelMetadata
from weathermodel.models.io import load_model, read_payload, save_atomic
from weathermodel.training.checkpoint import list_checkpoints

from test_bad_inputs import assert_cli_refuses, assert_explains, tree_hash
from test_forecast import (INIT, LEAD, VARIABLE, _args, _attrs, _canonical, _make_model,
                           _prepare, assert_same_store, graph_cache, setup)  # noqa: F401
from test_prepare_store import _run_prepare_cli, _tree_digest, make_config
from conftest import assert_identical
from test_training import _write_config, small_config

PROJECT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part",
                                        "ignore::UserWarning")


# --------------------------------------------------------------------------------------------
# running the command
# --------------------------------------------------------------------------------------------
def _file_size_limit(n_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` capping every file the child writes at ``n_bytes``: a write beyond it
    fails with EFBIG, as a full disk fails with ENOSPC."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return apply


def start(args: list[Any], file_size_limit: int | None = None) -> subprocess.Popen:
    """``python -m weathermodel ARGS`` in its own session (so kill -9 reaches it), one thread.

    Its output goes to pipes, which a file-size limit does not cap (the commands here print
    little, so the pipes never fill while a test waits to kill one)."""
    command = ["timeout", str(TIMEOUT_S), sys.executable, "-m", "weathermodel", *map(str, args)]
    return subprocess.Popen(
        command, cwd=PROJECT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_file_size_limit(file_size_limit) if file_size_limit else None)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a process of :func:`start` and collect what it printed."""
    out, err = process.communicate(timeout=TIMEOUT_S + 30)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(args: list[Any], file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    return finish(start(args, file_size_limit))


_DRIVER = """
import contextlib, io, json, sys, traceback
from weathermodel.cli import main
results = {}
for name, argv in json.load(open(sys.argv[1])).items():
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            code = 1
            traceback.print_exc()
    results[name] = [code, stdout.getvalue(), stderr.getvalue()]
json.dump(results, open(sys.argv[2], "w"))
"""


def run_commands(commands: dict[str, list[Any]], folder: Path
                 ) -> dict[str, subprocess.CompletedProcess]:
    """Many commands through ``weathermodel.cli.main``, one after the other in one real
    process (``main`` is what the ``weathermodel`` executable calls; the interpreter starts
    once instead of once per command). Exit code, stdout and stderr by name; an escaping
    exception is printed as a traceback with exit code 1."""
    requests, answers = folder / "commands.json", folder / "results.json"
    requests.write_text(json.dumps({name: list(map(str, args))
                                    for name, args in commands.items()}))
    driver = subprocess.run(["timeout", str(TIMEOUT_S), sys.executable, "-c", _DRIVER,
                             str(requests), str(answers)], cwd=PROJECT, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert driver.returncode == 0, driver.stderr[-3000:]
    return {name: subprocess.CompletedProcess(commands[name], code, out, err)
            for name, (code, out, err) in json.loads(answers.read_text()).items()}


def kill_9_when(process: subprocess.Popen, ready: Callable[[], bool], what: str,
                timeout_s: float = 240) -> None:
    """SIGKILL the process (its whole group when it leads one) as soon as ``ready()``; fail if
    it ends first."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"{what} ended (code {process.returncode}) before it could be killed")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: the awaited progress never came")
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
        process.wait(timeout=30)


def refused(result: subprocess.CompletedProcess, path: str | Path, *problem: str,
            fix: tuple[str, ...] = (), variable: str | None = None) -> str:
    """Exit code 2 with no traceback, and a message naming ``path``, the problem and a fix."""
    message = assert_cli_refuses(result)
    assert_explains(message, path, *problem, variable=variable, fix=fix)
    return message


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file below ``path``: a file rewritten, even identically, differs."""
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# 1. kill -9, then the same command
# --------------------------------------------------------------------------------------------
TRAIN_STEPS = 16


@pytest.fixture(scope="module")
def train_store(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """January and February 2013 of the NCEP record (the training period of small_config)."""
    out = tmp_path_factory.mktemp("train") / "ncep.zarr"
    return prepare(make_config(ncep_file, out, start="2013-01-01", end="2013-02-28T18"),
                   progress=False)


def _train_config(store: Path, run_dir: Path) -> Path:
    config = small_config(store, run_dir, **{"optim.max_steps": TRAIN_STEPS,
                                             "data.validation": None, "log_every": 4})
    return _write_config(config, run_dir.with_suffix(".yaml"))


@pytest.fixture(scope="module")
def training_runs(train_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted ``weathermodel train`` and one killed with SIGKILL after its first
    checkpoint, then resumed with ``--resume``; both run as real processes."""
    root = tmp_path_factory.mktemp("runs")
    reference = start(["train", "--config", _train_config(train_store, root / "reference"),
                       "--no-progress"])
    killed_config = _train_config(train_store, root / "killed")
    killed = start(["train", "--config", killed_config, "--no-progress"])
    kill_9_when(killed, lambda: bool(list_checkpoints(root / "killed")), "weathermodel train")
    at_kill = [step for step, _ in list_checkpoints(root / "killed")]
    resumed = run(["train", "--config", killed_config, "--resume", "--no-progress"])
    return {"root": root, "at_kill": at_kill, "resumed": resumed, "killed_config": killed_config,
            "reference": finish(reference)}


def test_kill_9_during_training_then_resume_gives_bit_identical_weights(
        training_runs: dict) -> None:
    assert training_runs["reference"].returncode == 0, training_runs["reference"].stderr[-3000:]
    resumed = training_runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    at_kill = training_runs["at_kill"]
    assert at_kill and at_kill[-1] < TRAIN_STEPS  # killed after a checkpoint, before the end
    assert f"at step {at_kill[-1]}" in resumed.stdout  # it did resume, not restart
    root = training_runs["root"]
    [(step_a, path_a)] = list_checkpoints(root / "reference")[-1:]
    [(step_b, path_b)] = list_checkpoints(root / "killed")[-1:]
    assert step_a == step_b == TRAIN_STEPS
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    for key in ("state_dict", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch"):
        assert_identical(a[key], b[key], key)
    # and every random generator (torch's global one included: the resumed run restores it
    # after drawing its new loader iterator's base seed, as the uninterrupted run had drawn it)
    assert set(a["rng"]) == set(b["rng"])
    for key in a["rng"]:
        assert_identical(a["rng"][key], b["rng"][key], f"rng/{key}")
    assert not list((root / "killed" / "checkpoints").glob(".*tmp*"))  # no temporary left


def test_training_checkpoints_are_plain_data_with_a_digest(training_runs: dict) -> None:
    """Optimizer, scheduler and RNG states included: everything loads with weights_only=True,
    and a checkpoint's contents are checked against the digest written with them."""
    [(_, path)] = list_checkpoints(training_runs["root"] / "killed")[-1:]
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == "training_checkpoint"
    assert payload["format_version"] == migrations.CURRENT_FORMAT_VERSION
    assert payload["optimizer"]["state"] and isinstance(payload["rng"]["torch"], torch.Tensor)
    assert read_payload(path)[migrations.DIGEST_KEY] == payload[migrations.DIGEST_KEY]


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: proof that a loader executed the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _largest_tensor_offset(path: Path) -> tuple[int, int]:
    """(offset, size) of the bytes of the largest tensor inside a torch.save zip file (its
    entries ``<archive>/data/<key>``; ``data.pkl`` holds the rest)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    header = path.read_bytes()[info.header_offset:info.header_offset + 30]
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def _flip_a_bit(source: Path, target: Path) -> Path:
    """A copy with one bit changed in the middle of the largest tensor: torch loads it
    without complaint."""
    data = bytearray(source.read_bytes())
    offset, size = _largest_tensor_offset(source)
    data[offset + size // 2] ^= 0x10
    target.write_bytes(bytes(data))
    assert torch.load(target, weights_only=True)["format_version"]  # torch sees nothing
    return target


def test_resume_refuses_a_damaged_or_pickled_newest_checkpoint(training_runs: dict,
                                                               tmp_path: Path) -> None:
    """Never a silent fall-back to an older checkpoint, never unpickled code: the newest
    checkpoint of a run with one bit flipped in its weights, or with an object pickled into its
    optimizer state, is refused by ``train --resume``, which says what to do."""
    config = yaml.safe_load(training_runs["killed_config"].read_text())
    marker = tmp_path / "code-was-executed"
    commands, expected = {}, {}
    for damage in ("flipped-bit", "pickled-object"):
        run_dir = tmp_path / damage
        shutil.copytree(training_runs["root"] / "killed", run_dir)
        (previous, _), (_, newest) = list_checkpoints(run_dir)[-2:]
        if damage == "flipped-bit":
            _flip_a_bit(newest, newest)
        else:
            payload = torch.load(newest, weights_only=True)
            payload["optimizer"]["state"][0]["extra"] = _Payload(marker)
            torch.save(payload, newest)
        path = _write_config({**config, "run_dir": str(run_dir)}, tmp_path / f"{damage}.yaml")
        commands[damage] = ["train", "--config", path, "--resume", "--no-progress"]
        expected[damage] = (newest, previous, tree_hash(run_dir / "checkpoints"))
    results = run_commands(commands, tmp_path)
    for damage, (newest, previous, before) in expected.items():
        problem = "digest" if damage == "flipped-bit" else "objects other than tensors"
        refused(results[damage], newest, "cannot be resumed", problem,
                fix=("move this file", f"previous checkpoint (step {previous})"))
        assert tree_hash(newest.parent) == before
    assert not marker.exists()


def test_killed_forecast_is_refused_by_evaluate_until_the_same_command_finishes_it(
        setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "killed.zarr"
    args = _args(setup, out, init="2013-10-01/2013-10-08T06/6h", lead="12h")  # 30 starts
    kill_9_when(start(args), lambda: len(done_indices(out)) >= 1, "weathermodel forecast")
    assert 1 <= len(done_indices(out)) < 30
    assert _attrs(out)["complete"] is False
    scores = tmp_path / "scores.zarr"
    evaluate_args = ["evaluate", f"model={out}", "--truth", str(setup["store"]),
                     "--baselines", "none", "--out", str(scores)]
    refused(run(evaluate_args), out, "incomplete",
            fix=("same 'weathermodel forecast' command",))
    assert not scores.exists()
    assert main(args) == 0  # the same command finishes it ...
    assert _attrs(out)["complete"] is True
    assert main(evaluate_args) == 0  # ... and then it is scored
    assert xr.open_zarr(scores, consolidated=False)[VARIABLE].sizes["prediction_timedelta"] == 2


def test_killed_prepare_store_is_refused_by_every_reader(ncep_file: Path, setup: dict,
                                                         train_store: Path,
                                                         tmp_path: Path) -> None:
    killed = tmp_path / "killed.zarr"
    process = _run_prepare_cli(ncep_file, killed, "--start", "2013-01-01", "--end",
                               "2013-03-31", "--time-block", "1")
    kill_9_when(process, lambda: (killed / "zarr.json").exists() and len(
        load_progress(killed).get("blocks_done", [])) >= 5, "weathermodel prepare")
    assert read_metadata(killed)["complete"] is False
    with pytest.raises(StoreError, match="incomplete"):
        open_store(killed)
    train_config = small_config(killed, tmp_path / "run")
    readers = {
        "forecast": _args(setup, tmp_path / "f.zarr", data=killed, init="2013-01-05"),
        "evaluate": ["evaluate", f"model={setup['reference']}", "--truth", killed,
                     "--baselines", "none"],
        "climatology": ["climatology", killed, "--out", tmp_path / "clim.nc"],
        "train": ["train", "--config", _write_config(train_config, tmp_path / "t.yaml"),
                  "--no-progress"],
        "inspect": ["inspect", killed],
    }
    results = run_commands(readers, tmp_path)
    inspected = results.pop("inspect")
    assert inspected.returncode == 0 and '"complete": false' in inspected.stdout
    for name, result in results.items():
        message = refused(result, killed, "incomplete", fix=("weathermodel prepare",))
        assert "store" in message, (name, message)
    for product in ("f.zarr", "clim.nc"):
        assert not (tmp_path / product).exists(), product


# --------------------------------------------------------------------------------------------
# 2. bad inputs to forecast and evaluate
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad input: the command that gets it, and what its refusal must say."""

    args: list[Any]
    path: Path
    problem: tuple[str, ...]
    fix: tuple[str, ...] = ()
    variable: str | None = None
    out: Path | None = None
    result: subprocess.CompletedProcess | None = None
    before: str = ""
    marker: Path | None = None  # a file that exists only if the input's code was executed


def _with_extra_channel(metadata: ModelMetadata) -> ModelMetadata:
    """Metadata of a model trained on 2 m temperature and mean sea-level pressure."""
    name = "mean_sea_level_pressure"
    return replace(
        metadata, channels=metadata.channels + [name],
        channel_variables=metadata.channel_variables + [name],
        channel_levels=metadata.channel_levels + [float("nan")],
        mean=metadata.mean + [101000.0], std=metadata.std + [1000.0],
        tendency_std=metadata.tendency_std + [100.0],
        channel_roles=metadata.channel_roles + ["prognostic"],
        channel_has_missing=metadata.channel_has_missing + [False],
        variables=metadata.variables + [{"name": name, "units": "Pa", "levels": [],
                                         "standard_name": "air_pressure_at_mean_sea_level"}])


def _rewritten(checkpoint: Path, target: Path, **changes: Any) -> Path:
    """The checkpoint's payload with ``changes`` (None deletes a key), saved by torch alone."""
    payload = read_payload(checkpoint)
    for key, value in changes.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    torch.save(payload, target)
    return target


def _truncated(source: Path, target: Path, fraction: float = 0.6) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[:int(len(data) * fraction)])
    return target


def _canonical_netcdf(setup: dict, path: Path,
                      change: Callable[[xr.Dataset], xr.Dataset]) -> Path:
    """Initial conditions in canonical names (as a WeatherBench 2 file), changed, as netCDF."""
    base = _canonical(setup, path.with_suffix(".base.zarr"))
    with xr.open_zarr(base) as ds:
        change(ds.load()).to_netcdf(path)
    return path


def _nan_patch(ds: xr.Dataset) -> xr.Dataset:
    values = ds[VARIABLE].values.copy()
    at = int(np.flatnonzero(ds["time"].values == np.datetime64("2013-10-01T00"))[0])
    values[at, 5:10, 10:30] = np.nan  # 100 points of the start state
    return ds.assign({VARIABLE: (ds[VARIABLE].dims, values, ds[VARIABLE].attrs)})


@dataclass
class Coarse:
    """The NCEP record on a 5-degree grid: its store, a model made for it, a forecast."""

    store: Path
    model: Path
    forecast: Path


def _coarse(setup: dict, root: Path, ncep_file: Path) -> Coarse:
    with xr.open_dataset(ncep_file) as raw:
        coarse = raw.isel(lat=slice(None, None, 2), lon=slice(None, None, 2))
        coarse.sel(time=slice("2013-09-01", "2013-10-31T18")).to_netcdf(root / "coarse.nc")
    store = _prepare(root / "coarse.nc", root / "coarse.zarr")
    model = _make_model(store, root / "coarse.pt")
    out = root / "coarse_forecast.zarr"
    forecast(ForecastOptions(checkpoint=str(model), data=str(store), init=INIT, lead=LEAD,
                             out=str(out), progress=False))
    return Coarse(store, model, out)


def _checkpoint_cases(setup: dict, root: Path, coarse: Coarse) -> dict[str, Case]:
    """Checkpoints of another grid or variables, damaged, pickled, or of other versions."""
    checkpoint, store = setup["checkpoint"], setup["store"]
    extra = _make_model(store, root / "t2m_msl.pt", metadata=_with_extra_channel(
        ModelMetadata.from_summary(read_summary(store))))
    torch.save(load_model(checkpoint).state_dict(), root / "state_dict.pt")
    marker = root / "executed"
    pickled = _rewritten(checkpoint, root / "pickled.pt", notes=_Payload(marker))

    def case(path: Path, *problem: str, names: Path | None = None, fix: tuple[str, ...] = (),
             variable: str | None = None) -> Case:
        """``path`` as --checkpoint; the message names ``names`` (default: ``path``)."""
        return Case(_args(setup, Path("unset"), checkpoint=path), names or path, problem, fix,
                    variable, marker=marker)

    return {
        "checkpoint-of-another-grid": case(coarse.model, "latitude",
                                           "differs from the checkpoint's grid", names=store,
                                           fix=("regrid",)),
        "checkpoint-of-other-variables": case(extra, "channel", "mean_sea_level_pressure",
                                              "not in the store", names=store,
                                              variable="mean_sea_level_pressure"),
        "checkpoint-truncated": case(_truncated(checkpoint, root / "truncated.pt"),
                                     "not a readable", fix=("another checkpoint",)),
        "checkpoint-with-a-flipped-bit": case(_flip_a_bit(checkpoint, root / "flipped.pt"),
                                              "digest", "damaged", fix=("copy it again",)),
        "checkpoint-with-a-pickled-object": case(pickled, "objects other than tensors",
                                                 "not loaded", fix=("written by weathermodel",)),
        "checkpoint-a-bare-state-dict": case(root / "state_dict.pt", "no weathermodel format "
                                             "version", fix=("written by weathermodel",)),
        "checkpoint-of-a-newer-format": case(_rewritten(checkpoint, root / "v99.pt",
                                                        format_version=99),
                                             "format version 99", "newer",
                                             fix=("upgrade weathermodel",)),
        "checkpoint-of-an-unknown-older-format": case(_rewritten(checkpoint, root / "v0.pt",
                                                                 format_version=0),
                                                      "format version 0", "no migration"),
    }


def _initial_condition_cases(setup: dict, root: Path) -> dict[str, Case]:
    def case(data: Path, *problem: str, fix: tuple[str, ...] = (),
             variable: str | None = None) -> Case:
        return Case(_args(setup, Path("unset"), data=data, init="2013-10-01", lead="12h"),
                    data, problem, fix, variable)

    def netcdf(name: str, change: Callable[[xr.Dataset], xr.Dataset]) -> Path:
        return _canonical_netcdf(setup, root / name, change)

    whole = netcdf("ic.nc", lambda ds: ds)
    return {
        "ic-latitude-flipped": case(_canonical(setup, root / "flipped.zarr", flip=True),
                                    "latitude", "flipped", fix=("prepare",)),
        "ic-celsius-labelled-kelvin": case(
            _canonical(setup, root / "celsius_as_k.zarr", offset=273.15, units="K"),
            "outside the training range", "look like degrees Celsius", fix=("Kelvin",),
            variable=VARIABLE),
        "ic-in-celsius": case(_canonical(setup, root / "degc.zarr", offset=273.15,
                                         units="degC"), "units", "degC",
                              fix=("convert to K",), variable=VARIABLE),
        "ic-with-nans": case(netcdf("nans.nc", _nan_patch), "100 missing (NaN)",
                             "2013-10-01", fix=("fill the missing values",), variable=VARIABLE),
        "ic-variable-missing": case(_canonical(setup, root / "renamed.zarr", name="t2m_x"),
                                    "missing", variable=VARIABLE),
        "ic-duplicated-times": case(netcdf("duplicated.nc", lambda ds: xr.concat(
            [ds, ds.isel(time=slice(0, 4))], dim="time")), "duplicated times",
            fix=("duplicated",)),
        "ic-missing-times": case(netcdf("gap.nc", lambda ds: ds.drop_sel(
            time=[np.datetime64("2013-09-30T18")])), "need states at", "2013-09-30T18",
            fix=("start dates",)),
        "ic-truncated-netcdf": case(_truncated(whole, root / "truncated.nc"), "truncated",
                                    fix=("re-download",)),
    }


def _evaluate_cases(setup: dict, root: Path, ncep_file: Path, coarse: Coarse
                    ) -> dict[str, Case]:
    """Forecasts and truths truncated, in Celsius labelled Kelvin, on another grid."""
    store, reference = setup["store"], setup["reference"]
    as_netcdf = root / "forecast.nc"
    with xr.open_zarr(reference) as ds:
        ds.attrs = {}
        ds.to_netcdf(as_netcdf)
    with xr.open_dataset(ncep_file) as raw:
        celsius = raw.sel(time=slice("2013-10-01", "2013-11-30T18")).load()
    celsius["air"] = (celsius["air"] - 273.15).astype("float32").assign_attrs(units="degK")
    for variable in celsius.variables.values():
        variable.encoding = {}
    celsius.to_netcdf(root / "truth_celsius_as_degK.nc")

    def case(forecast_path: Path, truth: Path, path: Path, *problem: str,
             fix: tuple[str, ...] = ()) -> Case:
        return Case(["evaluate", f"model={forecast_path}", "--truth", truth, "--baselines",
                     "none"], path, problem, fix)

    truncated = _truncated(as_netcdf, root / "forecast_truncated.nc")
    cut_truth = _truncated(ncep_file, root / "truth_truncated.nc")
    return {
        "evaluate-forecast-truncated": case(truncated, store, truncated, "cannot be opened",
                                            "truncated", fix=("write it again",)),
        "evaluate-truth-truncated": case(reference, cut_truth, cut_truth, "truncated",
                                         fix=("re-download",)),
        "evaluate-truth-celsius-labelled-kelvin": case(
            reference, root / "truth_celsius_as_degK.nc", root / "truth_celsius_as_degK.nc",
            "plausible range", "Celsius", fix=("units",)),
        "evaluate-forecast-of-another-grid": case(coarse.forecast, store, coarse.forecast,
                                                  "latitude", "not the truth's",
                                                  fix=("regrid",)),
    }


@pytest.fixture(scope="module")
def corpus(setup: dict, ncep_file: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Case]:
    """Every bad input, each run once against its own copy of a finished output."""
    root = tmp_path_factory.mktemp("corpus")
    coarse = _coarse(setup, root, ncep_file)
    cases = {**_checkpoint_cases(setup, root, coarse), **_initial_condition_cases(setup, root),
             **_evaluate_cases(setup, root, ncep_file, coarse)}
    scores = root / "scores.zarr"
    evaluate({"model": setup["reference"]}, setup["store"], baselines=[], out=scores)
    for name, case in cases.items():
        case.out = root / "outputs" / name / ("scores.zarr" if case.args[0] == "evaluate"
                                               else "forecast.zarr")
        shutil.copytree(scores if case.args[0] == "evaluate" else setup["reference"],
                        case.out)
        case.before = tree_hash(case.out)
        if case.args[0] == "evaluate":
            case.args += ["--out", case.out]
        else:
            case.args[case.args.index("--out") + 1] = str(case.out)
    results = run_commands({name: case.args for name, case in cases.items()}, root)
    for name, case in cases.items():
        case.result = results[name]
    return cases


CASES = ["checkpoint-of-another-grid", "checkpoint-of-other-variables", "checkpoint-truncated",
         "checkpoint-with-a-flipped-bit", "checkpoint-with-a-pickled-object",
         "checkpoint-a-bare-state-dict", "checkpoint-of-a-newer-format",
         "checkpoint-of-an-unknown-older-format", "ic-latitude-flipped",
         "ic-celsius-labelled-kelvin", "ic-in-celsius", "ic-with-nans", "ic-variable-missing",
         "ic-duplicated-times", "ic-missing-times", "ic-truncated-netcdf",
         "evaluate-forecast-truncated", "evaluate-truth-truncated",
         "evaluate-truth-celsius-labelled-kelvin", "evaluate-forecast-of-another-grid"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_and_the_existing_output_is_untouched(corpus: dict[str, Case],
                                                                   name: str) -> None:
    case = corpus[name]
    refused(case.result, case.path, *case.problem, fix=case.fix, variable=case.variable)
    assert tree_hash(case.out) == case.before
    assert not progress_dir(case.out).exists()
    assert case.marker is None or not case.marker.exists()  # no pickled code ever ran
    assert set(CASES) == set(corpus)


# --------------------------------------------------------------------------------------------
# 3. full disks and paths that cannot be written
# --------------------------------------------------------------------------------------------
CHUNK_BYTES = 25 * 53 * 4  # one NCEP field, the size of one chunk of every store here


def test_full_disk_during_forecast_is_reported_and_the_same_command_resumes(
        setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "full.zarr"
    args = _args(setup, out)  # the reference forecast's start dates and leads
    result = run(args, file_size_limit=CHUNK_BYTES - 1)
    refused(result, out, "cannot write", "file-size limit", "EFBIG",
            fix=("free some space", "--out", "start dates finished so far are kept",
                 "same command again"))
    assert _attrs(out)["complete"] is False
    assert main(args) == 0
    assert_same_store(out, setup["reference"])


def test_rerun_of_a_finished_forecast_rewrites_nothing(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "done.zarr"
    args = _args(setup, out, init="2013-10-01", lead="12h")
    assert main(args) == 0
    before = _snapshot(out)
    again = run(args, file_size_limit=CHUNK_BYTES - 1)  # a chunk written would fail
    assert again.returncode == 0, again.stderr[-3000:]
    assert _snapshot(out) == before


def test_forecast_from_a_replaced_checkpoint_is_not_mixed_into_the_old_output(
        setup: dict, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    shutil.copy(setup["checkpoint"], checkpoint)
    out = tmp_path / "out.zarr"
    args = _args(setup, out, init="2013-10-01", lead="12h", checkpoint=checkpoint)
    assert main(args) == 0
    before = tree_hash(out)
    _make_model(setup["store"], checkpoint, seed=1)  # retrained, same path
    refused(run(args), out, "another forecast", fix=("another --out",))
    assert tree_hash(out) == before


def test_forecast_larger_than_the_free_space_is_refused_before_writing(setup: dict,
                                                                       tmp_path: Path) -> None:
    lead_steps = 4 * 365
    chunk_on_disk = -(-CHUNK_BYTES // 4096) * 4096
    members = 2 * shutil.disk_usage(tmp_path).free // (lead_steps * chunk_on_disk) + 2
    out = tmp_path / "huge.zarr"
    result = run(_args(setup, out, "--members", str(members), init="2013-10-01", lead="365d"))
    refused(result, out, "needs about", "free", "nothing was written",
            fix=("free some space", "fewer"))
    assert not out.exists() and not progress_dir(out).exists()


def test_full_disk_during_prepare_is_reported_and_the_same_command_resumes(
        ncep_file: Path, tmp_path: Path) -> None:
    options = ("--start", "2013-01-01", "--end", "2013-01-03T18", "--time-block", "4")
    out = tmp_path / "full.zarr"
    result = run(["prepare", ncep_file, "--out", out, "--no-progress", *options],
                 file_size_limit=CHUNK_BYTES * 3)  # a state chunk fits, forcings do not
    refused(result, out, "cannot write", "EFBIG",
            fix=("free some space", "blocks written so far are kept", "same command again"))
    assert read_metadata(out)["complete"] is False
    # what zarr leaves when a process dies inside a chunk write: the same command removes it
    (out / "state" / "c").mkdir(parents=True, exist_ok=True)
    (out / "state" / "c" / "0.0b4d1dea.partial").write_bytes(b"half a chunk")
    assert main(["prepare", str(ncep_file), "--out", str(out), "--no-progress",
                 *options]) == 0
    reference = prepare(make_config(ncep_file, tmp_path / "reference.zarr", start="2013-01-01",
                                    end="2013-01-03T18", time_block=4), progress=False)
    assert _tree_digest(out) == _tree_digest(reference)
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]


def test_prepare_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path) -> None:
    """A 0.25-degree hourly source (a zarr whose chunks were never written: it costs no disk)
    long enough to need twice the free space."""
    lat, lon = np.linspace(-90, 90, 721), np.arange(1440) * 0.25
    per_step = (1 + 5) * -(-(lat.size * lon.size * 4) // 4096) * 4096  # state and forcings
    steps = int(2 * shutil.disk_usage(tmp_path).free // per_step) + 2
    if steps > 200_000:
        pytest.skip(f"the disk is too large ({steps} steps) to simulate an output beyond it")
    times = np.datetime64("2000-01-01T00", "ns") + np.arange(steps) * np.timedelta64(1, "h")
    values = da.full((steps, lat.size, lon.size), 280.0, dtype="float32",
                     chunks=(64, lat.size, lon.size))
    source = tmp_path / "era5_like.zarr"
    xr.Dataset({"t2m": (("time", "latitude", "longitude"), values, {"units": "K"})},
               coords={"time": times, "latitude": lat, "longitude": lon}
               ).to_zarr(source, compute=False, zarr_format=3, consolidated=False)
    out = tmp_path / "store.zarr"
    with pytest.raises(OutputError) as info:
        prepare(make_config(source, out), progress=False)
    assert_explains(str(info.value), out, "training store needs about", "free",
                    "nothing was written", fix=("free some space", "shorter period"))
    assert not out.exists()


def test_unwritable_output_paths_give_a_clear_error(ncep_file: Path, setup: dict,
                                                    train_store: Path, tmp_path: Path) -> None:
    """As root, permission bits do not stop writes: a path below a regular file (ENOTDIR) and
    one in sysfs (EPERM, or EACCES for another user) really fail."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    in_sysfs = Path("/sys/weathermodel-test/run")
    commands = {
        "prepare": (["prepare", ncep_file, "--out", blocker / "s.zarr", "--end", "2013-01-02",
                     "--no-progress"], blocker, "the blocks written so far"),
        "evaluate": (["evaluate", f"model={setup['reference']}", "--truth", setup["store"],
                      "--baselines", "none", "--out", blocker / "scores.nc"],
                     blocker, "replaced only by a complete one"),
    }
    if Path("/sys/kernel").is_dir():
        config = _write_config(small_config(train_store, in_sysfs), tmp_path / "train.yaml")
        commands["train"] = (["train", "--config", config, "--no-progress"], in_sysfs.parent,
                             "--resume")
    results = run_commands({name: args for name, (args, _, _) in commands.items()},
                           tmp_path)
    for name, (_, path, kept) in commands.items():
        message = assert_cli_refuses(results[name])
        assert "cannot use the path" in message and f"'{path}" in message, (name, message)
        assert "[E" in message and kept in message.split("fix:")[1], (name, message)
    assert blocker.read_text() == "not a folder"


def test_full_disk_while_writing_scores_keeps_the_previous_scores(setup: dict,
                                                                  tmp_path: Path) -> None:
    scores = tmp_path / "scores.nc"
    args = ["evaluate", f"model={setup['reference']}", "--truth", str(setup["store"]),
            "--baselines", "none", "--out", str(scores)]
    assert main(args) == 0
    before = scores.read_bytes()
    result = run(args, file_size_limit=len(before) // 2)
    refused(result, scores, "cannot write", fix=("free space", "intact"))
    assert scores.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.nc"]  # no temporary left


# --------------------------------------------------------------------------------------------
# 4. untrusted and older checkpoint files
# --------------------------------------------------------------------------------------------
def test_checkpoint_of_format_version_1_is_migrated_and_forecasts_the_same(
        setup: dict, tmp_path: Path) -> None:
    """A real checkpoint rewritten in the version 1 layout (no digest) loads through the
    registered migration, and gives the very same forecast."""
    assert migrations.registered_versions() == [1, 2]
    old = _rewritten(setup["checkpoint"], tmp_path / "v1.pt", format_version=1,
                     **{migrations.DIGEST_KEY: None})
    assert torch.load(old, weights_only=True)["format_version"] == 1
    payload = read_payload(old)
    assert payload["format_version"] == migrations.CURRENT_FORMAT_VERSION
    assert payload["migrated_from"] == 1 and payload[migrations.DIGEST_KEY] is None
    original, migrated = load_model(setup["checkpoint"]), load_model(old)
    assert_identical(original.state_dict(), migrated.state_dict())
    out = tmp_path / "from_v1.zarr"
    forecast(ForecastOptions(checkpoint=str(old), data=str(setup["store"]), init=INIT,
                             lead=LEAD, out=str(out), progress=False))
    assert_same_store(out, setup["reference"])
    # saved again, it is in the current layout, with a digest
    resaved = torch.load(save_atomic(payload, tmp_path / "v2.pt"), weights_only=True)
    assert resaved["format_version"] == migrations.CURRENT_FORMAT_VERSION
    assert resaved[migrations.DIGEST_KEY]
    assert read_payload(tmp_path / "v2.pt")[migrations.DIGEST_KEY] == resaved[
        migrations.DIGEST_KEY]


def test_migration_registry_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="already registered"):
        migrations.register_migration(1)(lambda payload: payload)
    with pytest.raises(ValueError, match="not older"):
        migrations.register_migration(migrations.CURRENT_FORMAT_VERSION)(lambda p: p)
    for version in ("2", True, None, 2.0):
        with pytest.raises(CheckpointError, match="not an integer"):
            migrations.migrate({"format_version": version}, path="x.pt")
    current = {"format_version": migrations.CURRENT_FORMAT_VERSION, "state_dict": {}}
    assert migrations.migrate(current) is current  # nothing to do: the very same payload


def test_nothing_in_the_package_unpickles() -> None:
    """Every torch.load passes weights_only=True, every np.load allow_pickle=False, and no
    module calls pickle, marshal or shelve loaders."""
    offenders = []
    for path in sorted((PROJECT / "weathermodel").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            name = f"{owner}.{node.func.attr}"
            safe = {"torch.load": ("weights_only", True), "np.load": ("allow_pickle", False)}
            if name in safe:
                key, wanted = safe[name]
                if not (key in keywords and isinstance(keywords[key], ast.Constant)
                        and keywords[key].value is wanted):
                    offenders.append(f"{path.name}:{node.lineno} {name} without {key}={wanted}")
            elif owner in ("pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib") \
                    and node.func.attr.startswith(("load", "open", "Unpickler")):
                offenders.append(f"{path.name}:{node.lineno} {name}")
    assert not offenders, offenders

"""``weathermodel forecast``: a checkpoint and initial conditions in, a forecast store out.

Start dates are rolled out autoregressively in batches (``batch_starts`` start dates, each
with its members, in one network call); each lead is written as soon as it is computed, on a
background thread while the next lead is computed, so memory does not grow with the lead
time. Under ``torchrun`` (Lightning Fabric, as training) each rank takes every N-th batch and
writes its own chunks of one store (rank 0 creates it, the others wait). Forcings are computed
once per valid time, on the device, and shared by the batch. Each step is checked for NaN/inf
and for values far outside the training statistics (statistics reduced on the device, read
with the lead's values by the writer: no sync per channel or per step).
:func:`rollout_starts` is the one rollout of this command and of the Python API
(:mod:`weathermodel.inference.predictor`). A killed run, restarted with the same command,
skips the start dates already finished; a finished one is left as it is (nothing rewritten).
The run's fingerprint covers the checkpoint's contents, so a retrained model at the same path
never resumes, or passes for, the forecast of the old one.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import xarray as xr
from tqdm.auto import tqdm

import weathermodel
from weathermodel import conventions
from weathermodel.data.config import parse_time, parse_timedelta
from weathermodel.data.forcings import compute_forcings
from weathermodel.data.sources import file_checksum, read_here
from weathermodel.data.store import remove_partial_writes
from weathermodel.errors import ConfigError, DataError, WeatherModelError
from weathermodel.host_memory import keep_freed_memory
from weathermodel.inference import output
from weathermodel.inference.contract import check_value_ranges, open_initial_conditions
from weathermodel.inference.grib import forecast_store_to_grib
from weathermodel.inference.perturbations import (DEFAULT_PERTURBATION, PerturbationSettings,
                                                   initial_members)
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.io import load_model


@dataclass
class ForecastOptions:
    """Options of one forecast run (see ``weathermodel forecast --help``)."""

    checkpoint: str
    data: str
    init: str
    lead: str
    out: str
    output_format: str = "zarr"
    members: int = 1
    #: initial perturbation amplitude (tendency stds); None: 0.1 for a deterministic model, 0
    #: for a stochastic (CRPS-trained) one, whose members come from its own noise
    perturbation: float | None = None
    perturbation_length_km: float | None = None
    perturbation_scale: str = "tendency_std"
    perturbation_symmetric: bool = False
    perturbation_bred_cycles: int = 0
    seed: int = 0
    on_unhealthy: str = "flag"
    health_std: float = 10.0
    progress: bool = True
    #: start dates rolled out together in one batch (each with its ``members``); None:
    #: :func:`automatic_batch_starts`
    batch_starts: int | None = None
    #: write each lead on a background thread while the next one is computed
    overlap_writes: bool = True


def _init_time(text: str, what: str) -> pd.Timestamp:
    """An ISO time in nanoseconds; one that datetime64[ns] cannot hold is refused (converting
    it later would wrap around silently, e.g. 3000-01-01 to 1830-11-23)."""
    try:
        return parse_time(text, what).as_unit("ns")
    except (OverflowError, pd.errors.OutOfBoundsDatetime) as error:
        raise ConfigError(f"'{what}' = {text!r} lies outside the years 1678 to 2261 that "
                          "nanosecond times can hold", "give a time within that range") \
            from error


def parse_init_times(text: str) -> np.ndarray:
    """``START``, or ``START/END/STEP`` (inclusive), or a comma-separated list of those (their
    union, in time order), as datetime64[ns]."""
    if "," in text:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ConfigError(f"--init {text!r} names no start date",
                              "write e.g. 2013-10-01,2013-10-05/2013-10-09/1d")
        return np.unique(np.concatenate([parse_init_times(item) for item in items]))
    parts = text.split("/")
    if len(parts) == 1:
        return np.array([_init_time(parts[0], "init").to_datetime64()], dtype="datetime64[ns]")
    if len(parts) != 3:
        raise ConfigError(f"--init {text!r} is not START or START/END/STEP",
                          "write e.g. 2013-10-01/2013-12-31T18/6h")
    start, end = _init_time(parts[0], "init start"), _init_time(parts[1], "init end")
    step = parse_timedelta(parts[2], "init step")
    if end < start or step <= pd.Timedelta(0):
        raise ConfigError(f"--init {text!r} is empty (end before start, or step <= 0)",
                          "write START/END/STEP with END >= START and a positive STEP")
    return pd.date_range(start, end, freq=step).values.astype("datetime64[ns]")


def lead_steps(lead: str, time_step_seconds: int) -> int:
    seconds = parse_timedelta(lead, "lead").total_seconds()
    steps = seconds / time_step_seconds
    if steps < 1 or abs(steps - round(steps)) > 1e-9:
        raise ConfigError(f"--lead {lead} is not a positive multiple of the model's time step "
                          f"({time_step_seconds / 3600:g} h)", "choose a multiple of the step")
    return int(round(steps))


def _distributed() -> tuple[int, int, torch.device, Any]:
    """(rank, world size, device, fabric). Under torchrun (``WORLD_SIZE`` > 1) Lightning
    Fabric joins the process group and picks each rank's device, as training does (DDP: gloo
    on CPU, NCCL on GPUs); a single process runs on the first GPU, else the CPU, with no
    process group (and without importing Lightning, which takes seconds)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    fabric = Fabric(accelerator="auto", devices=local, num_nodes=max(world // local, 1),
                    strategy=DDPStrategy(timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S)))
    fabric.launch()
    return fabric.global_rank, fabric.world_size, fabric.device, fabric


#: how long a rank waits for the others at a barrier (rank 0 creates the store first)
PROCESS_GROUP_TIMEOUT_S = 1800


#: options that change how a forecast is computed, not what it is (batching and overlap
#: change results by float rounding at most: bit for bit for the graph network on CPU)
_NOT_IN_FINGERPRINT = ("progress", "out", "batch_starts", "overlap_writes")


def forecast_fingerprint(options: ForecastOptions) -> str:
    """What identifies a forecast run: every option but ``out`` and ``progress``, the package
    version and the checkpoint's contents, not only its path (a retrained model at the same
    path makes another forecast, which must not be mixed into, or mistaken for, this one)."""
    fields = {k: v for k, v in vars(options).items() if k not in _NOT_IN_FINGERPRINT}
    text = (json.dumps(fields, sort_keys=True) + weathermodel.__version__
            + file_checksum(options.checkpoint)[0])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stored_fingerprint(store: Path) -> str | None:
    """The fingerprint of the run that created the forecast store ``store`` (None when there
    is no readable forecast store there)."""
    try:
        attrs = xr.open_zarr(store, consolidated=False).attrs.get("weathermodel_forecast", {})
    except Exception:  # noqa: BLE001 - anything unreadable is "not our forecast"
        return None
    return attrs.get("fingerprint")


def _initial_states(state: xr.DataArray, inits: np.ndarray, history: int,
                    step: np.timedelta64, where: str) -> np.ndarray:
    """The ``history`` states ending at each start date, read in one call:
    (start, history, channel, lat, lon)."""
    inits = np.atleast_1d(np.asarray(inits, dtype="datetime64[ns]"))
    wanted = (inits[:, None] - np.arange(history - 1, -1, -1)[None] * step
              ).astype("datetime64[ns]")
    absent = ~np.isin(wanted, state["time"].values)
    if absent.any():
        start = int(np.argmax(absent.any(1)))
        missing = [str(t) for t in wanted[start][absent[start]]]
        raise DataError(f"initial conditions for start {inits[start]} need states at "
                        f"{missing}, which the data does not have",
                        "choose start dates the data covers", path=where)
    times, positions = np.unique(wanted.ravel(), return_inverse=True)
    values = read_here(state.sel(time=times))[:, 0]  # (time, channel, lat, lon)
    return values[positions.reshape(wanted.shape)]


def _initial_state(state: xr.DataArray, init: np.datetime64, history: int,
                   step: np.timedelta64, where: str) -> np.ndarray:
    """The ``history`` states ending at ``init``: (history, channel, lat, lon)."""
    return _initial_states(state, np.asarray([init]), history, step, where)[0]


def health_statistics(prediction: torch.Tensor, model: Forecaster) -> torch.Tensor:
    """Health of the predicted channels of one step, computed on the device without a sync:
    (start, 2, predicted channel) holding whether every value is finite (1.0 or 0.0) and the
    largest distance from the training mean in training std, over members and grid.

    prediction : (start, member, channel, lat, lon), physical units.
    """
    index = model.output_channel_index
    values = prediction[:, :, index]
    finite = torch.isfinite(values).flatten(3).all(-1).all(1)
    z = ((torch.nan_to_num(values) - model.mean[:, index]) / model.std[:, index]).abs()
    largest = z.flatten(3).amax(-1).amax(1)
    return torch.stack([finite.to(largest.dtype), largest], dim=1)


def health_problems(statistics: np.ndarray, metadata: ModelMetadata, limit: float
                    ) -> list[str]:
    """The problems of one start date's step from its :func:`health_statistics` (2, predicted
    channel): NaN/inf, or values more than ``limit`` training std from the training mean."""
    problems = []
    for position, channel in enumerate(metadata.role_index(conventions.PROGNOSTIC,
                                                              conventions.DIAGNOSTIC)):
        name = metadata.channels[channel]
        if not statistics[0, position]:
            problems.append(f"{name}: NaN or inf")
        elif statistics[1, position] > limit:
            problems.append(f"{name}: {statistics[1, position]:.1f} std from the training mean")
    return problems


class ForcingCache:
    """The computed forcings (TOA radiation, time encodings) on the device, computed once per
    valid time and shared by every start date and member of a batch and by the ``history + 1``
    consecutive steps whose windows hold that time."""

    def __init__(self, latitude: np.ndarray, longitude: np.ndarray,
                 device: torch.device) -> None:
        self.latitude, self.longitude = np.asarray(latitude), np.asarray(longitude)
        self.device = device
        self.values: dict[np.datetime64, torch.Tensor] = {}

    def at(self, times: np.ndarray) -> torch.Tensor:
        """Forcings (len(times), forcing, lat, lon) at ``times`` (datetime64[ns])."""
        times = np.asarray(times, dtype="datetime64[ns]")
        new = np.array([t for t in np.unique(times) if t not in self.values],
                       dtype="datetime64[ns]")
        if new.size:
            computed = torch.from_numpy(compute_forcings(new, self.latitude, self.longitude))
            computed = computed.to(self.device)
            self.values.update(zip(new, computed))
        return torch.stack([self.values[t] for t in times])

    def forget_before(self, time: np.datetime64) -> None:
        """Drop the forcings of valid times before ``time`` (no window needs them again)."""
        for key in [key for key in self.values if key < time]:
            del self.values[key]


def _forcing_channels_at(state: xr.DataArray, model: Forecaster, times: np.ndarray
                         ) -> dict[np.datetime64, torch.Tensor]:
    """The data's forcing channels (e.g. sea surface temperature) at those of ``times`` the
    data reaches, each (channel, lat, lon) on the model's device; times beyond the data are
    absent (their forcing channels are persisted from the last input). One read for all."""
    index = model.forcing_channel_index.tolist()
    if not index:
        return {}
    present = [t for t in np.unique(times) if t in state.indexes["time"]]
    if not present:
        return {}
    values = read_here(state.isel(channel=index).sel(time=present))[:, 0]  # (time, ch, y, x)
    device = model.forcing_channel_index.device
    return dict(zip(present, torch.from_numpy(values).to(device)))


def _predict(model: Forecaster, members: torch.Tensor, forcings: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of every member of every start date, (start, member, channel, lat, lon).

    The controls (member 0) of all start dates run as one batch of their own: CPU and GPU
    kernels are not always bit-identical across batch sizes (vectorised tails, GEMM
    blocking), and the control must equal the deterministic forecast of the same start
    dates exactly. ``generator``: of a stochastic model's noise.
    """
    starts, n_members = members.shape[:2]
    if n_members == 1:
        return model(members[:, 0], forcings[:, 0], generator)[:, None]
    control = model(members[:, 0], forcings[:, 0], generator)
    perturbed = model(members[:, 1:].flatten(0, 1), forcings[:, 1:].flatten(0, 1), generator)
    return torch.cat([control[:, None], perturbed.unflatten(0, (starts, n_members - 1))], 1)


def _initial_members(initial: np.ndarray, model: Forecaster, options: ForecastOptions,
                     index: int, device: torch.device, init: np.datetime64 | None = None,
                     analysis_at: Callable[[np.datetime64], np.ndarray] | None = None
                     ) -> torch.Tensor:
    """The ensemble's initial states (member, history, channel, lat, lon) of one start date
    (``index``: its position in the run's start dates, which seeds its perturbations): member
    0 is the control, the others add correlated random fields (or bred vectors, which need
    ``init`` and ``analysis_at``), the same on every history state
    (:mod:`weathermodel.inference.perturbations`). A stochastic model's members are not
    perturbed unless ``options.perturbation`` asks for it: they differ by the model's noise."""
    amplitude = options.perturbation
    if amplitude is None:
        amplitude = 0.0 if model.is_stochastic else DEFAULT_PERTURBATION
    settings = PerturbationSettings(
        amplitude=amplitude, length_scale_km=options.perturbation_length_km,
        scale=options.perturbation_scale, symmetric=options.perturbation_symmetric,
        bred_cycles=options.perturbation_bred_cycles)
    states = initial_members(model, initial, options.members, settings,
                             seed=options.seed * 1_000_003 + index, init=init,
                             analysis_at=analysis_at)
    return torch.from_numpy(states).to(device)


@dataclass
class LeadBatch:
    """One lead of a batch of start dates, as the rollout yields it (tensors on the device).

    indices : the start dates' positions in the run's list of start dates.
    lead : the lead's index (0 = one model step).
    values : (start, member, channel, lat, lon), physical units; missing (NaN) where the
        initial state was missing (the imputer's inverse), forcing channels taken from the
        data where it reaches, persisted beyond.
    health : (start, 2, predicted channel), see :func:`health_statistics`.
    """

    indices: list[int]
    lead: int
    values: torch.Tensor
    health: torch.Tensor


def rollout_starts(model: Forecaster, options: ForecastOptions, state: xr.DataArray,
                   inits: np.ndarray, indices: list[int], n_leads: int, device: torch.device,
                   forcings: ForcingCache | None = None) -> Iterator[LeadBatch]:
    """Roll a batch of start dates out together, one lead at a time: the one rollout of
    ``weathermodel forecast`` and of :class:`weathermodel.inference.predictor.Predictor`.

    Parameters
    ----------
    model : the forecaster, on ``device``, in eval mode.
    options : members and perturbations (``members``, ``perturbation``, ``seed``, ...) and
        ``data`` (named in errors).
    state : (time, number, channel, lat, lon) checked initial conditions
        (:mod:`weathermodel.inference.contract`).
    inits : every start date of the run (datetime64[ns]).
    indices : the positions in ``inits`` of this batch's start dates (they seed the
        perturbations, so a start date's ensemble does not depend on its batch).
    n_leads : model steps to roll out.
    forcings : a cache of computed forcings shared between batches (default: a new one).

    Yields
    ------
    LeadBatch : lead 0, 1, ... ``n_leads - 1``; memory does not grow with the lead.

    Raises
    ------
    DataError : the data lacks a history state, or an initial value is missing or outside
        the training range.
    """
    keep_freed_memory()  # the same tensor sizes every step: reuse, don't page-fault
    metadata = model.metadata
    step = np.timedelta64(metadata.time_step_seconds, "s")
    history = model.history
    starts = np.asarray(inits)[indices].astype("datetime64[ns]")
    members, missing = [], []
    initial_states = _initial_states(state, starts, history, step, options.data)
    for index, init, initial in zip(indices, starts, initial_states):
        check_value_ranges(initial, metadata, options.data, init)
        members.append(_initial_members(initial, model, options, index, device, init,
                                        lambda time: _initial_state(state, time, history, step,
                                                                    options.data)))
        missing.append(np.isnan(initial[-1]))
    ensemble = torch.stack(members)  # (start, member, history, channel, lat, lon)
    generator = None  # the model's noise: reproducible per batch of start dates, and drawn
    if model.is_stochastic:  # without touching torch's global generator (the caller's)
        generator = torch.Generator(device).manual_seed(options.seed * 1_000_003 + indices[0])
    # the imputer's inverse (Anemoi): outputs are missing where the initial state was
    missing_at_start = torch.from_numpy(np.stack(missing) & np.asarray(
        metadata.channel_has_missing)[:, None, None])[:, None].to(device)
    forcings = forcings or ForcingCache(metadata.latitude, metadata.longitude, device)
    forcing_index = model.forcing_channel_index
    window_offsets = np.arange(-history + 1, 2) * step
    shape = (len(indices), history + 1)
    with torch.no_grad():
        for lead in range(n_leads):
            times = (starts[:, None] + window_offsets[None] + lead * step)  # (start, h + 1)
            window = forcings.at(times.ravel()).unflatten(0, shape)
            window = window[:, None].expand(-1, options.members, -1, -1, -1, -1)
            prediction = _predict(model, ensemble, window, generator)
            observed = _forcing_channels_at(state, model, times[:, -1])
            for position, valid in enumerate(times[:, -1]):
                if valid in observed:
                    prediction[position, :, forcing_index] = observed[valid]
            yield LeadBatch(indices, lead,
                            prediction.masked_fill(missing_at_start, float("nan")),
                            health_statistics(prediction, model))
            ensemble = torch.cat([ensemble[:, :, 1:], prediction[:, :, None]], dim=2)
            forcings.forget_before(times.min())


class BackgroundWriter:
    """Hands each lead to ``consume`` on a background thread, so that writing overlaps the
    next step; at most ``depth`` leads wait (memory stays bounded). With ``depth`` 0 leads
    are consumed in the calling thread. An error of ``consume`` is raised in the caller at its
    next :meth:`put` or at :meth:`close`.

    The lead's tensors are copied to the host asynchronously (pinned memory on CUDA); the
    background thread waits for the copy, so the rollout never synchronises with the device.
    """

    def __init__(self, consume: Callable[[LeadBatch], None], depth: int = 2) -> None:
        self.consume, self.depth = consume, depth
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.thread = None
        if depth > 0:
            self.thread = threading.Thread(target=self._run, name="forecast-writer",
                                           daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                lead, event = item
                try:
                    if event is not None:
                        event.synchronize()
                    self.consume(lead)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                    self.error = error

    def put(self, lead: LeadBatch) -> None:
        self._raise()
        host = LeadBatch(lead.indices, lead.lead, _to_host(lead.values),
                         _to_host(lead.health))
        event = None
        if lead.values.device.type == "cuda":  # marks the end of the copies to the host
            event = torch.cuda.Event()
            event.record()
        if self.thread is None:
            if event is not None:
                event.synchronize()
            self.consume(host)
            return
        self.queue.put((host, event))

    def close(self, raise_error: bool = True) -> None:
        """Wait for every lead to be consumed; raise the first error of ``consume`` (unless
        ``raise_error`` is False: the caller is already failing)."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host: itself on CPU, else an asynchronous copy into pinned memory."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def health_report(indices: list[int], lead: int, statistics: np.ndarray, inits: np.ndarray,
                  metadata: ModelMetadata, options: ForecastOptions) -> list[dict[str, Any]]:
    """The health report entries of one lead of a batch of start dates (``statistics``:
    (start, 2, predicted channel) from :func:`health_statistics`).

    Raises
    ------
    WeatherModelError : a problem, with ``options.on_unhealthy == "stop"``.
    """
    hours = (lead + 1) * metadata.time_step_seconds / 3600
    entries = []
    for position, index in enumerate(indices):
        problems = health_problems(statistics[position], metadata, options.health_std)
        if not problems:
            continue
        entries.append({"init": str(inits[index]), "lead_hours": hours, "problems": problems})
        if options.on_unhealthy == "stop":
            raise WeatherModelError(f"unhealthy rollout from {inits[index]} at lead {hours:g} "
                                    f"h: {problems}", "inspect the model and inputs, or pass "
                                    "--on-unhealthy flag to continue and flag",
                                    path=options.out)
    return entries


def start_batches(n_inits: int, batch_starts: int, rank: int = 0, world: int = 1,
                  done: set[int] = frozenset()) -> list[list[int]]:
    """The batches of start-date positions a rank rolls out: consecutive groups of
    ``batch_starts``, every ``world``-th group to each rank (the same groups whatever the
    number of ranks), less the start dates already ``done``."""
    groups = [list(range(first, min(first + batch_starts, n_inits)))
              for first in range(0, n_inits, batch_starts)]
    mine = [[i for i in group if i not in done] for number, group in enumerate(groups)
            if number % world == rank]
    return [group for group in mine if group]


#: an automatic batch keeps the largest tensor of one network call under this many bytes...
AUTOMATIC_BATCH_BYTES = 64 * 2**20
#: ... and holds at most this many samples (start dates x members): on two CPU threads the
#: demo's graph runs 8 samples per call 10-15 % faster per sample than 4; 16 were faster still,
#: but glibc's heap, which keeps freed memory (``host_memory``), fragmented more with their
#: larger blocks (peak RSS +24 % at 40 days' lead against +8 % with 8; memory in use flat)
AUTOMATIC_BATCH_SAMPLES = 8


def automatic_batch_starts(model: Forecaster, members: int) -> int:
    """Start dates per batch when ``batch_starts`` is not given: as many samples (start
    dates x ``members``) as keep the network's largest float32 tensor of one call under
    ``AUTOMATIC_BATCH_BYTES``, at most ``AUTOMATIC_BATCH_SAMPLES``, and at least one start
    date. Small grids get large batches (the demo: 8 start dates); a 1-degree GraphCast-size
    graph gets 1."""
    per_sample = 4 * model.network.largest_activation()
    samples = min(AUTOMATIC_BATCH_SAMPLES, AUTOMATIC_BATCH_BYTES // max(per_sample, 1))
    return max(1, samples // members)


def batch_starts_of(options: ForecastOptions, model: Forecaster) -> int:
    """Start dates per batch: ``options.batch_starts``, else :func:`automatic_batch_starts`."""
    return options.batch_starts or automatic_batch_starts(model, options.members)


def forecast(options: ForecastOptions) -> Path:
    """Run the forecast; returns the output path (store or netCDF file)."""
    rank, world, device, fabric = _distributed()
    model = load_model(options.checkpoint).to(device).eval()
    metadata = model.metadata
    state = open_initial_conditions(options.data, metadata)
    inits = parse_init_times(options.init)
    n_leads = lead_steps(options.lead, metadata.time_step_seconds)
    if options.members < 1:
        raise ConfigError("--members must be at least 1", "give 1 or more")
    if options.batch_starts is not None and options.batch_starts < 1:
        raise ConfigError("--batch-starts must be at least 1", "give 1 or more")
    final = Path(options.out)
    store = final if options.output_format == "zarr" else final.with_name(final.name + ".zarr")
    fingerprint = forecast_fingerprint(options)
    if rank == 0:
        # check the first start date's inputs before anything is written
        step = np.timedelta64(metadata.time_step_seconds, "s")
        check_value_ranges(_initial_state(state, inits[0], model.history, step, options.data),
                           metadata, options.data, inits[0])
        _prepare_output(store, final, fingerprint, metadata, inits, n_leads, options)
    if fabric is not None:
        fabric.barrier()
    if output.is_complete(store):  # the same command, already finished: nothing is rewritten
        if rank == 0 and options.output_format == "netcdf":
            _to_netcdf(store, final)
        if rank == 0 and options.output_format == "grib":
            forecast_store_to_grib(store, final, remove_store=True)
        if fabric is not None:
            fabric.barrier()
        return final
    batches = start_batches(inits.size, batch_starts_of(options, model), rank, world,
                            output.done_indices(store))
    report = _roll_out_and_write(model, options, state, inits, batches, n_leads, store, device,
                                 rank)
    reports = [report]
    if fabric is not None:  # Fabric gathers tensors only: the reports are objects
        reports = [None] * world
        dist.all_gather_object(reports, report)
        fabric.barrier()
    if rank == 0:
        missing = set(range(inits.size)) - output.done_indices(store)
        if missing:
            raise WeatherModelError(f"{len(missing)} start dates did not finish",
                                    "run the same command again to complete them",
                                    path=str(store))
        output.finalise(store, [entry for part in reports for entry in part])
        if options.output_format == "netcdf":
            _to_netcdf(store, final)
        if options.output_format == "grib":
            forecast_store_to_grib(store, final, remove_store=True)
    if fabric is not None:
        fabric.barrier()
    return final


def _roll_out_and_write(model: Forecaster, options: ForecastOptions, state: xr.DataArray,
                        inits: np.ndarray, batches: list[list[int]], n_leads: int, store: Path,
                        device: torch.device, rank: int) -> list[dict[str, Any]]:
    """Roll out ``batches`` of start dates into ``store``: each lead is checked and written
    on a background thread (``options.overlap_writes``) while the next one is computed, and a
    start date is marked done once all its leads are written. Returns the health report."""
    metadata = model.metadata
    writer = output.LeadWriter(store, metadata, options.members)
    report: list[dict[str, Any]] = []
    bar = tqdm(total=sum(map(len, batches)), desc=f"forecast (rank {rank})",
               disable=not options.progress)

    def check_and_write(lead: LeadBatch) -> None:
        report.extend(health_report(lead.indices, lead.lead, lead.health.numpy(), inits,
                                    metadata, options))
        writer.write_starts(lead.indices, lead.lead, lead.values.float().numpy())
        if lead.lead == n_leads - 1:
            for index in lead.indices:
                output.mark_done(store, index)
            bar.update(len(lead.indices))

    background = BackgroundWriter(check_and_write, depth=2 if options.overlap_writes else 0)
    forcings = ForcingCache(metadata.latitude, metadata.longitude, device)
    try:
        for batch in batches:
            for lead in rollout_starts(model, options, state, inits, batch, n_leads, device,
                                       forcings):
                background.put(lead)
    except BaseException:
        background.close(raise_error=False)
        raise
    finally:
        bar.close()
    background.close()
    return report


def _prepare_output(store: Path, final: Path, fingerprint: str, metadata, inits: np.ndarray,
                    n_leads: int, options: ForecastOptions) -> None:
    if store.exists():
        if stored_fingerprint(store) != fingerprint:
            raise WeatherModelError("the output path holds another forecast or other data; it "
                                    "is left untouched", "choose another --out, or delete it",
                                    path=str(store))
        # same command: resume, without the temporary files of chunk writes a kill cut short
        # (only rank 0 runs this, before the other ranks pass the barrier and write)
        remove_partial_writes(store)
        return
    if options.output_format != "zarr" and final.exists():
        raise WeatherModelError("the output file exists; it is left untouched",
                                "choose another --out, or delete it", path=str(final))
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        probe = store.parent / f".weathermodel-write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as error:
        raise WeatherModelError(f"cannot write to the output folder: {error}",
                                "choose a writable --out with free space", path=str(store)) \
            from error
    attrs = {"fingerprint": fingerprint, "complete": False, "checkpoint": options.checkpoint,
             "data": options.data, "members": options.members,
             "package_version": weathermodel.__version__, "lead": options.lead}
    output.create_forecast_store(store, metadata, inits, n_leads, options.members, attrs)


def _to_netcdf(store: Path, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.tmp")
    dataset = xr.open_zarr(store)
    # netCDF attributes cannot hold dicts: the run's record goes in as a JSON string
    dataset.attrs = {key: json.dumps(value) if isinstance(value, dict) else value
                     for key, value in dataset.attrs.items()}
    dataset.to_netcdf(tmp, engine="netcdf4", format="NETCDF4")
    os.replace(tmp, final)
    shutil.rmtree(store)

"""``weathermodel forecast``: a checkpoint and initial conditions in, a forecast store out.

Every start date is rolled out autoregressively; each lead is written as soon as it is
computed, so memory does not grow with the lead time. Under ``torchrun`` or SLURM each rank
takes every N-th start date and writes its own chunks of one store (rank 0 creates it, the
others wait). Forcings are computed for each valid time. Each step is checked for NaN/inf and
for values far outside the training statistics. A killed run, restarted with the same command,
skips the start dates already finished; a finished one is left as it is (nothing rewritten).
The run's fingerprint covers the checkpoint's contents, so a retrained model at the same path
never resumes, or passes for, the forecast of the old one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import xarray as xr
from tqdm.auto import tqdm

import weathermodel
from weathermodel.data.config import parse_time, parse_timedelta
from weathermodel.data.forcings import compute_forcings
from weathermodel.data.sources import file_checksum
from weathermodel.data.store import remove_partial_writes
from weathermodel.errors import ConfigError, DataError, WeatherModelError
from weathermodel.inference import output as out
from weathermodel.inference.contract import check_value_ranges, open_initial_conditions
from weathermodel.models.forecaster import Forecaster
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
    perturbation: float = 0.1
    seed: int = 0
    on_unhealthy: str = "flag"
    health_std: float = 10.0
    progress: bool = True


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
    """``START``, or ``START/END/STEP`` (inclusive), as datetime64[ns]."""
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


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group torchrun/SLURM set up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def forecast_fingerprint(options: ForecastOptions) -> str:
    """What identifies a forecast run: every option but ``out`` and ``progress``, the package
    version and the checkpoint's contents, not only its path (a retrained model at the same
    path makes another forecast, which must not be mixed into, or mistaken for, this one)."""
    fields = {k: v for k, v in vars(options).items() if k not in ("progress", "out")}
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


def _initial_state(state: xr.DataArray, init: np.datetime64, history: int,
                   step: np.timedelta64, where: str) -> np.ndarray:
    wanted = (init - np.arange(history - 1, -1, -1) * step).astype("datetime64[ns]")
    missing = [str(t) for t in wanted[~np.isin(wanted, state["time"].values)]]
    if missing:
        raise DataError(f"initial conditions for start {init} need states at {missing}, which "
                        "the data does not have", "choose start dates the data covers",
                        path=where)
    values = state.sel(time=wanted).values  # (history, number, channel, lat, lon)
    return values[:, 0]


def _health(state: torch.Tensor, model: Forecaster, limit: float) -> list[str]:
    """Problems of the predicted channels of one step: NaN/inf, or values more than ``limit``
    training std from the training mean (one device-to-host copy for all channels)."""
    index = model.output_channel_index
    values = state[:, index]
    finite = torch.isfinite(values).flatten(2).all(-1).all(0)
    z = ((torch.nan_to_num(values) - model.mean[:, index]) / model.std[:, index]).abs()
    largest = z.flatten(2).amax(-1).amax(0)
    finite, largest = finite.cpu().tolist(), largest.cpu().tolist()
    problems = []
    for position, channel in enumerate(index.tolist()):
        name = model.metadata.channels[channel]
        if not finite[position]:
            problems.append(f"{name}: NaN or inf")
        elif largest[position] > limit:
            problems.append(f"{name}: {largest[position]:.1f} std from the training mean")
    return problems


def _forcing_channels_at(state: xr.DataArray, model: Forecaster, time: np.datetime64
                         ) -> np.ndarray | None:
    """The data's forcing channels (e.g. sea surface temperature) at ``time``
    (channel, lat, lon), or None when the data does not reach that time (they are then
    persisted from the last input)."""
    index = model.forcing_channel_index.tolist()
    if not index or time not in state.indexes["time"]:
        return None
    return state.isel(channel=index).sel(time=time).values[0]


def _predict(model: Forecaster, members: torch.Tensor, forcings: torch.Tensor) -> torch.Tensor:
    """One step of every member. The control (member 0) runs as a batch of one: CPU and GPU
    kernels are not bit-identical across batch sizes (vectorised tails, GEMM blocking), and the
    control must equal the deterministic forecast exactly."""
    if members.shape[0] == 1:
        return model(members, forcings)
    return torch.cat([model(members[:1], forcings[:1]), model(members[1:], forcings[1:])])


def _rollout_one(model: Forecaster, options: ForecastOptions, state: xr.DataArray,
                 init: np.datetime64, index: int, n_leads: int, writer: out.LeadWriter,
                 device: torch.device) -> list[dict[str, Any]]:
    metadata = model.metadata
    step = np.timedelta64(metadata.time_step_seconds, "s")
    history = model.history
    initial = _initial_state(state, init, history, step, options.data)
    check_value_ranges(initial, metadata, options.data, init)
    members = torch.from_numpy(np.repeat(initial[None], options.members, axis=0)).to(device)
    if options.members > 1:  # member 0 is the control; the others get IC perturbations
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + index)
        noise = torch.randn(members.shape, generator=generator).to(device)
        noise[0] = 0
        members = members + options.perturbation * noise * model.tendency_std.view(1, 1, -1, 1, 1)
    lat, lon = np.asarray(metadata.latitude), np.asarray(metadata.longitude)
    # the imputer's inverse (Anemoi): outputs are missing where the initial state was
    missing_at_start = torch.from_numpy(np.isnan(initial[-1]) & np.asarray(
        metadata.channel_has_missing)[:, None, None]).to(device)
    forcing_index = model.forcing_channel_index
    report = []
    with torch.no_grad():
        for lead in range(n_leads):
            times = init + (np.arange(-history + 1, 2) + lead) * step
            forcings = torch.from_numpy(compute_forcings(times.astype("datetime64[ns]"), lat,
                                                         lon)).to(device)
            forcings = forcings[None].expand(options.members, -1, -1, -1, -1)
            prediction = _predict(model, members, forcings)
            observed = _forcing_channels_at(state, model, times[-1].astype("datetime64[ns]"))
            if observed is not None:
                prediction[:, forcing_index] = torch.from_numpy(observed).to(device)
            problems = _health(prediction, model, options.health_std)
            if problems:
                entry = {"init": str(init), "lead_hours": (lead + 1) * metadata.time_step_seconds
                         / 3600, "problems": problems}
                report.append(entry)
                if options.on_unhealthy == "stop":
                    raise WeatherModelError(f"unhealthy rollout from {init} at lead "
                                            f"{entry['lead_hours']:g} h: {problems}",
                                            "inspect the model and inputs, or pass "
                                            "--on-unhealthy flag to continue and flag",
                                            path=options.out)
            written = prediction.masked_fill(missing_at_start, float("nan"))
            writer.write(index, lead, written.float().cpu().numpy())
            members = torch.cat([members[:, 1:], prediction[:, None]], dim=1)
    return report


def forecast(options: ForecastOptions) -> Path:
    """Run the forecast; returns the output path (store or netCDF file)."""
    rank, world, device = _distributed()
    model = load_model(options.checkpoint).to(device).eval()
    metadata = model.metadata
    state = open_initial_conditions(options.data, metadata)
    inits = parse_init_times(options.init)
    n_leads = lead_steps(options.lead, metadata.time_step_seconds)
    if options.members < 1:
        raise ConfigError("--members must be at least 1", "give 1 or more")
    final = Path(options.out)
    store = final if options.output_format == "zarr" else final.with_name(final.name + ".zarr")
    fingerprint = forecast_fingerprint(options)
    if rank == 0:
        # check the first start date's inputs before anything is written
        step = np.timedelta64(metadata.time_step_seconds, "s")
        check_value_ranges(_initial_state(state, inits[0], model.history, step, options.data),
                           metadata, options.data, inits[0])
        _prepare_output(store, final, fingerprint, metadata, inits, n_leads, options)
    if world > 1:
        dist.barrier()
    if out.is_complete(store):  # the same command, already finished: nothing is rewritten
        if rank == 0 and options.output_format == "netcdf":
            _to_netcdf(store, final)
        if world > 1:
            dist.barrier()
        return final
    existing = out.done_indices(store)
    writer = out.LeadWriter(store, metadata, options.members)
    mine = [i for i in range(inits.size) if i % world == rank and i not in existing]
    report: list[dict[str, Any]] = []
    for index in tqdm(mine, desc=f"forecast (rank {rank})", disable=not options.progress):
        report += _rollout_one(model, options, state, inits[index], index, n_leads, writer,
                               device)
        out.mark_done(store, index)
    reports = [report]
    if world > 1:
        reports = [None] * world
        dist.all_gather_object(reports, report)
        dist.barrier()
    if rank == 0:
        missing = set(range(inits.size)) - out.done_indices(store)
        if missing:
            raise WeatherModelError(f"{len(missing)} start dates did not finish",
                                    "run the same command again to complete them",
                                    path=str(store))
        out.finalise(store, [entry for part in reports for entry in part])
        if options.output_format == "netcdf":
            _to_netcdf(store, final)
    if world > 1:
        dist.barrier()
    return final


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
    if options.output_format == "netcdf" and final.exists():
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
    out.create_forecast_store(store, metadata, inits, n_leads, options.members, attrs)


def _to_netcdf(store: Path, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.tmp")
    dataset = xr.open_zarr(store)
    # netCDF attributes cannot hold dicts: the run's record goes in as a JSON string
    dataset.attrs = {key: json.dumps(value) if isinstance(value, dict) else value
                     for key, value in dataset.attrs.items()}
    dataset.to_netcdf(tmp, engine="netcdf4", format="NETCDF4")
    os.replace(tmp, final)
    shutil.rmtree(store)

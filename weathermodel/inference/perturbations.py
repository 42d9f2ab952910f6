"""Initial-condition perturbations of ensemble forecasts: correlated random fields on the sphere.

An ensemble member starts from the analysis plus a perturbation that a forecaster accepts:

* **spatially correlated**: each channel's perturbation is a Gaussian random field on the sphere
  with the isotropic correlation ``rho(d) ~= exp(-d^2 / (2 L^2))`` of great-circle distance
  ``d``, ``L`` the *correlation length scale* (km). It is synthesised from spherical harmonics
  with the heat-kernel spectrum ``C_l ~ exp(-l (l + 1) (L / R)^2 / 2)`` (R = 6371 km) and
  evaluated at the grid points themselves, so regular, Gaussian and regional latitude-longitude
  grids are all exact: a regional grid samples the global field where it lies (no edge effects,
  no periodicity assumed). White noise, which the network smooths away at once, is not offered;
* **the same on every history state**: a perturbation that differs between the states at
  t - 6 h and t would be a fake tendency;
* **per channel amplitude**: ``amplitude * reference_c`` for channel ``c``, the reference being
  the channel's 6-hour tendency standard deviation (default) or its state standard deviation,
  both from the model's normalisation statistics; only prognostic channels are perturbed
  (forcings such as sea surface temperature and diagnostics such as precipitation are not);
* optionally **bred vectors** (Toth and Kalnay 1993): the random perturbation is grown by the
  model itself over ``cycles`` breeding cycles ending at the start date (each: run perturbed
  and control from the analysis, take the difference, rescale it per channel to the target
  area-weighted RMS, add it to the next analysis), so it projects on the growing directions;
* optionally **symmetric pairs**: members 2k - 1 and 2k get +p and -p (ensemble mean unbiased).

Member 0 is always the unperturbed control. Fields have mean zero and, at every point, variance
``(amplitude * reference_c)^2`` in expectation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from weathermodel import conventions
from weathermodel.data.forcings import compute_forcings
from weathermodel.data.weights import cell_area_weights
from weathermodel.errors import ConfigError

EARTH_RADIUS_KM = 6371.0
#: spectral coefficients beyond the degree where C_l (2 l + 1) falls below this fraction of its
#: largest value are left out (their share of the variance is negligible)
_SPECTRUM_CUTOFF = 1e-10
#: the largest Legendre table (degrees x orders x latitudes) built: about 400 MB of float64
_MAX_TABLE_ENTRIES = 50_000_000
SCALES = ("tendency_std", "std")


#: perturbation amplitude of a deterministic model's ensemble when none is given (tendency stds)
DEFAULT_PERTURBATION = 0.1


@dataclass
class PerturbationSettings:
    """How initial conditions are perturbed (``weathermodel forecast --perturbation...``).

    Attributes
    ----------
    amplitude : standard deviation of the perturbation of each prognostic channel, in units of
        its reference standard deviation (``scale``); 0 gives identical members.
    length_scale_km : correlation length scale L in km (correlation exp(-d^2 / 2L^2) at
        great-circle distance d); None: twice the grid's latitude spacing, at least 250 km.
    scale : ``tendency_std`` (the channel's 6-hour tendency std, default) or ``std`` (its
        state std), from the checkpoint's statistics.
    channel_factors : optional extra factor per channel or per variable name (a channel's own
        entry wins), e.g. {"specific_humidity": 0.5}; channels not named get 1.
    symmetric : members 2k - 1 and 2k get opposite perturbations (+p, -p).
    bred_cycles : number of breeding cycles before the start date (0: plain random fields).
    bred_steps : model steps per breeding cycle.
    """

    amplitude: float = DEFAULT_PERTURBATION
    length_scale_km: float | None = None
    scale: str = "tendency_std"
    channel_factors: dict[str, float] = field(default_factory=dict)
    symmetric: bool = False
    bred_cycles: int = 0
    bred_steps: int = 1

    def __post_init__(self) -> None:
        if not np.isfinite(self.amplitude) or self.amplitude < 0:
            raise ConfigError(f"the perturbation amplitude {self.amplitude} is not a finite "
                              "number >= 0", "give e.g. --perturbation 0.1")
        if self.length_scale_km is not None and not (self.length_scale_km > 0):
            raise ConfigError(f"the perturbation length scale {self.length_scale_km} km is not "
                              "positive", "give e.g. --perturbation-length-scale 1000 (km)")
        if self.scale not in SCALES:
            raise ConfigError(f"perturbation scale {self.scale!r} is unknown",
                              f"choose one of {SCALES}")
        if self.bred_cycles < 0 or self.bred_steps < 1:
            raise ConfigError(f"bred_cycles {self.bred_cycles} / bred_steps {self.bred_steps} "
                              "out of range", "give bred_cycles >= 0 and bred_steps >= 1")
        bad = {k: v for k, v in self.channel_factors.items() if not (float(v) >= 0)}
        if bad:
            raise ConfigError(f"perturbation channel factors {bad} are not numbers >= 0",
                              "give factors >= 0")


# --------------------------------------------------------------------------------------------
# Gaussian random fields on the sphere
# --------------------------------------------------------------------------------------------
def great_circle_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray,
                    lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance (km) between points given in degrees (broadcasting)."""
    p1, p2 = np.deg2rad(lat1), np.deg2rad(lat2)
    dlon = np.deg2rad(np.asarray(lon2) - np.asarray(lon1))
    half = (np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2)
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(half, 0.0, 1.0)))


def heat_kernel_spectrum(length_scale_km: float, radius_km: float = EARTH_RADIUS_KM
                         ) -> np.ndarray:
    """Angular power spectrum C_l (l = 0..lmax) of a unit-variance isotropic field whose
    correlation is ~exp(-d^2 / 2L^2): C_l proportional to exp(-l (l + 1) t), t = (L/R)^2 / 2,
    normalised so that sum_l (2 l + 1) C_l / (4 pi) = 1 (the point variance); lmax is where
    (2 l + 1) C_l drops below 1e-10 of its largest value."""
    t = 0.5 * (length_scale_km / radius_km) ** 2
    degree = np.arange(0, 100_000, dtype=np.float64)
    weight = (2 * degree + 1) * np.exp(-degree * (degree + 1) * t)
    lmax = int(np.nonzero(weight >= _SPECTRUM_CUTOFF * weight.max())[0].max())
    spectrum = np.exp(-degree[:lmax + 1] * (degree[:lmax + 1] + 1) * t)
    return spectrum / np.sum((2 * degree[:lmax + 1] + 1) * spectrum / (4 * np.pi))


def normalised_legendre(lmax: int, latitude: np.ndarray) -> list[np.ndarray]:
    """Orthonormal associated Legendre functions: element m is (lmax - m + 1, n_lat) holding
    P_lm(sin(latitude)) for l = m..lmax, with Y_lm = P_lm e^{i m lon} orthonormal on the unit
    sphere (so sum_m |Y_lm|^2 = (2 l + 1) / (4 pi) at every point). Stable three-term
    recursion in l from P_mm."""
    x = np.sin(np.deg2rad(np.asarray(latitude, dtype=np.float64)))
    sine = np.sqrt(np.clip(1.0 - x * x, 0.0, None))
    table = []
    diagonal = np.full_like(x, np.sqrt(1.0 / (4.0 * np.pi)))
    for m in range(lmax + 1):
        if m > 0:
            diagonal = diagonal * sine * np.sqrt((2.0 * m + 1.0) / (2.0 * m))
        column = np.empty((lmax - m + 1, x.size))
        column[0] = diagonal
        if m < lmax:
            column[1] = x * np.sqrt(2.0 * m + 3.0) * diagonal
        for l in range(m + 2, lmax + 1):
            a = np.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
            b = np.sqrt(((l - 1.0) ** 2 - m * m) / (4.0 * (l - 1.0) ** 2 - 1.0))
            column[l - m] = a * (x * column[l - m - 1] - b * column[l - m - 2])
        table.append(column)
    return table


class SphericalRandomField:
    """Unit-variance Gaussian random fields with correlation length ``length_scale_km`` at the
    points of a latitude-longitude grid (any latitudes: regular, Gaussian, regional; any
    longitudes), by spherical-harmonic synthesis evaluated at those points.

    Parameters
    ----------
    latitude, longitude : 1-D grid coordinates in degrees.
    length_scale_km : correlation length scale L (km).
    """

    def __init__(self, latitude: np.ndarray, longitude: np.ndarray,
                 length_scale_km: float) -> None:
        self.latitude = np.asarray(latitude, dtype=np.float64)
        self.longitude = np.asarray(longitude, dtype=np.float64)
        self.length_scale_km = float(length_scale_km)
        self.spectrum = heat_kernel_spectrum(self.length_scale_km)
        self.lmax = self.spectrum.size - 1
        entries = (self.lmax + 1) * (self.lmax + 2) // 2 * self.latitude.size
        if entries > _MAX_TABLE_ENTRIES:
            raise ConfigError(
                f"a perturbation length scale of {self.length_scale_km:g} km needs spherical "
                f"harmonics to degree {self.lmax}, too many for {self.latitude.size} latitudes",
                "choose a larger length scale (--perturbation-length-scale, km)")
        self._legendre = normalised_legendre(self.lmax, self.latitude)
        orders = np.arange(self.lmax + 1)[:, None]
        angle = orders * np.deg2rad(self.longitude)[None]
        factor = np.where(orders == 0, 1.0, np.sqrt(2.0))  # real harmonics
        self._cos, self._sin = factor * np.cos(angle), factor * np.sin(angle)

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` independent fields (count, n_lat, n_lon), float64."""
        amplitude = np.sqrt(self.spectrum)
        cos_profiles = np.empty((count, self.lmax + 1, self.latitude.size))
        sin_profiles = np.empty_like(cos_profiles)
        for m, column in enumerate(self._legendre):  # column: (lmax - m + 1, n_lat)
            scale = amplitude[m:]
            cos_profiles[:, m] = (rng.standard_normal((count, scale.size)) * scale) @ column
            sin_profiles[:, m] = (rng.standard_normal((count, scale.size)) * scale) @ column
        return (np.einsum("nml,mk->nlk", cos_profiles, self._cos)
                + np.einsum("nml,mk->nlk", sin_profiles, self._sin))


@lru_cache(maxsize=8)
def _field_for(latitude: tuple[float, ...], longitude: tuple[float, ...],
               length_scale_km: float) -> SphericalRandomField:
    return SphericalRandomField(np.array(latitude), np.array(longitude), length_scale_km)


def random_field(latitude: np.ndarray, longitude: np.ndarray,
                 length_scale_km: float) -> SphericalRandomField:
    """The (cached) :class:`SphericalRandomField` of a grid and length scale."""
    return _field_for(tuple(np.asarray(latitude, dtype=float).tolist()),
                      tuple(np.asarray(longitude, dtype=float).tolist()),
                      float(length_scale_km))


def default_length_scale_km(latitude: np.ndarray) -> float:
    """Twice the grid's median latitude spacing, in km, at least 250 km."""
    spacing = float(np.median(np.abs(np.diff(np.asarray(latitude, dtype=float)))))
    return max(250.0, 2.0 * np.deg2rad(spacing) * EARTH_RADIUS_KM)


# --------------------------------------------------------------------------------------------
# per-channel amplitudes and members
# --------------------------------------------------------------------------------------------
def channel_amplitudes(metadata, settings: PerturbationSettings) -> np.ndarray:
    """(C,) perturbation standard deviation of each channel in physical units: amplitude x
    reference std x factor for prognostic channels, 0 for forcing and diagnostic channels.

    ``metadata`` is the model's :class:`~weathermodel.models.forecaster.ModelMetadata`.
    """
    reference = np.nan_to_num(np.asarray(getattr(metadata, settings.scale), dtype=np.float64))
    unknown = set(settings.channel_factors) - set(metadata.channels) \
        - set(metadata.channel_variables)
    if unknown:
        raise ConfigError(f"perturbation factors name {sorted(unknown)}, which are neither "
                          "channels nor variables of the model",
                          f"use names among {metadata.channels}")
    factors = np.array([float(settings.channel_factors.get(
        channel, settings.channel_factors.get(variable, 1.0)))
        for channel, variable in zip(metadata.channels, metadata.channel_variables)])
    prognostic = np.array([role == conventions.PROGNOSTIC for role in metadata.channel_roles])
    return np.where(prognostic, settings.amplitude * reference * factors, 0.0)


def field_perturbations(metadata, settings: PerturbationSettings, count: int,
                        rng: np.random.Generator) -> np.ndarray:
    """``count`` perturbations (count, C, lat, lon) in physical units: independent unit
    random fields per channel times :func:`channel_amplitudes` (0 in channels not perturbed);
    with ``settings.symmetric`` consecutive pairs are +p, -p."""
    amplitudes = channel_amplitudes(metadata, settings)
    latitude, longitude = np.asarray(metadata.latitude), np.asarray(metadata.longitude)
    length = settings.length_scale_km or default_length_scale_km(latitude)
    perturbed = np.nonzero(amplitudes > 0)[0]
    result = np.zeros((count, amplitudes.size, latitude.size, longitude.size))
    if not perturbed.size or count == 0:
        return result
    draws = (count + 1) // 2 if settings.symmetric else count
    fields = random_field(latitude, longitude, length).sample(draws * perturbed.size, rng)
    fields = fields.reshape(draws, perturbed.size, latitude.size, longitude.size)
    fields *= amplitudes[perturbed][None, :, None, None]
    if settings.symmetric:
        fields = np.stack([fields, -fields], axis=1).reshape(-1, *fields.shape[1:])[:count]
    result[:, perturbed] = fields
    return result


def area_rms(values: np.ndarray, latitude: np.ndarray) -> np.ndarray:
    """Area-weighted RMS over (lat, lon), the last two axes (cell-edge weights)."""
    weights = cell_area_weights(np.asarray(latitude), "edges")[:, None]
    return np.sqrt(np.mean(weights * values ** 2, axis=(-2, -1)))


def _rollout(model, states: torch.Tensor, times: np.ndarray, steps: int) -> torch.Tensor:
    """The last state after ``steps`` model steps from ``states`` (B, history, C, lat, lon)
    whose last state is at ``times[-1]``; computed forcings, persisted forcing channels."""
    metadata = model.metadata
    step = np.timedelta64(metadata.time_step_seconds, "s")
    history = model.history
    for lead in range(steps):
        window = times[-1] + (np.arange(-history + 1, 2) + lead) * step
        forcings = torch.from_numpy(compute_forcings(
            window.astype("datetime64[ns]"), np.asarray(metadata.latitude),
            np.asarray(metadata.longitude))).to(states.device, states.dtype)
        prediction = model(states, forcings[None].expand(states.shape[0], -1, -1, -1, -1))
        states = torch.cat([states[:, 1:], prediction[:, None]], dim=1)
    return states[:, -1]


def bred_perturbations(model, settings: PerturbationSettings, count: int,
                       rng: np.random.Generator, init: np.datetime64,
                       analysis_at: Callable[[np.datetime64], np.ndarray]) -> np.ndarray:
    """Bred vectors (count, C, lat, lon): random fields grown by ``settings.bred_cycles``
    cycles of ``settings.bred_steps`` model steps ending at ``init``, rescaled after each cycle
    to the area-weighted RMS of :func:`channel_amplitudes` per channel.

    ``analysis_at(time)`` returns the analysis window (history, C, lat, lon) ending at
    ``time``, as the forecast reads initial conditions.
    """
    metadata = model.metadata
    amplitudes = channel_amplitudes(metadata, settings)
    latitude = np.asarray(metadata.latitude)
    draws = (count + 1) // 2 if settings.symmetric else count
    plain = PerturbationSettings(**{**vars(settings), "symmetric": False})
    perturbation = field_perturbations(metadata, plain, draws, rng)
    step = np.timedelta64(metadata.time_step_seconds, "s")
    cycle = settings.bred_steps * step
    device = next(model.parameters()).device
    for index in range(settings.bred_cycles, 0, -1):
        start = init - index * cycle
        analysis = analysis_at(start)
        times = (start - np.arange(model.history - 1, -1, -1) * step)
        base = torch.from_numpy(analysis[None]).to(device)
        perturbed = base + torch.from_numpy(perturbation[:, None]).to(device, base.dtype)
        with torch.no_grad():
            final = _rollout(model, torch.cat([base, perturbed]), times, settings.bred_steps)
        difference = (final[1:] - final[:1]).double().cpu().numpy()
        difference = np.nan_to_num(difference) * (amplitudes > 0)[None, :, None, None]
        rms = area_rms(difference, latitude)
        perturbation = difference * np.divide(amplitudes, rms, out=np.zeros_like(rms),
                                              where=rms > 0)[..., None, None]
    if settings.symmetric:
        perturbation = np.stack([perturbation, -perturbation], axis=1).reshape(
            -1, *perturbation.shape[1:])[:count]
    return perturbation


def initial_members(model, initial: np.ndarray, members: int, settings: PerturbationSettings,
                    seed: int, init: np.datetime64 | None = None,
                    analysis_at: Callable[[np.datetime64], np.ndarray] | None = None
                    ) -> np.ndarray:
    """The initial states of every member (members, history, C, lat, lon).

    Member 0 is ``initial`` (history, C, lat, lon) unchanged (the control); every other member
    adds one perturbation (:func:`field_perturbations`, or :func:`bred_perturbations` when
    ``settings.bred_cycles`` > 0, which needs ``init`` and ``analysis_at``) to all of its
    history states alike. Missing values (NaN) stay missing. ``seed`` makes it reproducible.
    """
    states = np.repeat(np.asarray(initial)[None], members, axis=0)
    if members < 2 or settings.amplitude == 0:
        return states
    rng = np.random.default_rng(seed)
    if settings.bred_cycles:
        if analysis_at is None or init is None:
            raise ConfigError("bred vectors need the analyses before the start date",
                              "forecast from a store that holds them, or use bred_cycles 0")
        perturbation = bred_perturbations(model, settings, members - 1, rng, init, analysis_at)
    else:
        perturbation = field_perturbations(model.metadata, settings, members - 1, rng)
    states[1:] += perturbation[:, None].astype(states.dtype)
    return states

"""Zonal energy spectra of gridded fields (WeatherBench 2 ``ZonalEnergySpectrum``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from weathermodel import conventions
from weathermodel.errors import DataError
from weathermodel.evaluation.alignment import Data, as_dataset

ZONAL_WAVENUMBER = "zonal_wavenumber"
#: WB2's Earth radius (mean of the equatorial and polar radii), m, used by the spectra.
EARTH_RADIUS_M = 1000.0 * (6357.0 + 6378.0) / 2.0


def _uniform_longitude_spacing(longitude: np.ndarray) -> float:
    steps = np.mod(np.diff(np.asarray(longitude, dtype=np.float64)), 360.0)
    if steps.size == 0 or np.max(np.abs(steps - steps[0])) > 1e-3:
        raise DataError("the zonal spectrum needs uniformly spaced longitudes",
                        "regrid to a regular longitude spacing")
    return float(steps[0])


def _zonal_power(values: np.ndarray) -> np.ndarray:
    """|F_k|^2 with F = rfft(f) / L, doubled for k > 0 (negative frequencies), as WB2."""
    coefficients = np.fft.rfft(values, axis=-1, norm="forward")
    power = np.abs(coefficients) ** 2
    power[..., 1:] *= 2.0
    return power


def zonal_energy_spectrum(data: Data, average_dims: Sequence[str] | None = None) -> xr.Dataset:
    """Power spectrum along longitude on each latitude circle (WB2 ``ZonalEnergySpectrum``),
    averaged over init times and members.

    With f[l], l = 0..L-1, the values on one latitude row and F[k] = (1/L) sum_l f[l]
    exp(-2 pi i k l / L), the spectrum is S[0] = D |F[0]|^2 and S[k] = 2 D |F[k]|^2 for
    k = 1..L//2, where D = L * dx is the length (m) of the row: dx = R cos(lat) * dlon (in
    radians), R = 6 367 500 m (WB2's Earth radius). On a global grid D is the circumference of
    the latitude circle, k the zonal (planetary) wavenumber and, up to the Nyquist term that
    WB2 also doubles for even L, sum_k S[k] = dx sum_l f[l]^2 (Parseval). On a regional grid
    the row is treated as periodic with period D (k = cycles per row). Units: m times the
    variable's units squared (m^3 s^-2 for a wind).

    Parameters
    ----------
    data : any fields with ``latitude`` and ``longitude`` (uniform spacing), e.g. a forecast
        (time, [number], prediction_timedelta, [level], latitude, longitude) or aligned truth.
    average_dims : dims to average over; default ``time`` and ``number`` where present.

    Returns
    -------
    Dataset per variable with dims (..., latitude, zonal_wavenumber) and coordinates
    ``frequency`` (latitude, zonal_wavenumber; 1/m) and ``wavelength`` (m; inf for k = 0).
    """
    data = as_dataset(data)
    longitude = data[conventions.LONGITUDE].values
    spacing = _uniform_longitude_spacing(longitude)
    n_lon = longitude.size
    dx = EARTH_RADIUS_M * np.cos(np.deg2rad(data[conventions.LATITUDE])) * np.deg2rad(spacing)
    row_length = dx * n_lon
    spectrum = xr.apply_ufunc(
        _zonal_power, data.chunk({conventions.LONGITUDE: -1}) if data.chunks else data,
        input_core_dims=[[conventions.LONGITUDE]], output_core_dims=[[ZONAL_WAVENUMBER]],
        dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {ZONAL_WAVENUMBER: n_lon // 2 + 1}})
    spectrum = spectrum * row_length
    dims = [conventions.TIME, conventions.MEMBER] if average_dims is None else list(average_dims)
    spectrum = spectrum.mean([d for d in dims if d in spectrum.dims])
    wavenumber = np.arange(n_lon // 2 + 1)
    frequency = xr.DataArray(wavenumber, dims=ZONAL_WAVENUMBER) / row_length
    with np.errstate(divide="ignore"):
        wavelength = 1.0 / frequency
    spectrum = spectrum.assign_coords({
        ZONAL_WAVENUMBER: wavenumber,
        "frequency": frequency.assign_attrs(units="1 / m"),
        "wavelength": wavelength.assign_attrs(units="m")})
    for name in spectrum.data_vars:
        units = str(data[name].attrs.get("units", ""))
        spectrum[name].attrs = {"units": f"m ({units})2" if units else "m",
                                "metric": "zonal_energy_spectrum"}
    return spectrum

"""Plots of an evaluation: every figure is written as a real PNG, what is drawn equals the
scores (lines, scorecard numbers against a brute-force relative difference, colours by the
sign convention), a pure zonal wave has all its energy at its wavenumber, and maps are drawn
offline from the shipped Natural Earth coastlines."""
from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from weathermodel.cli import main
from weathermodel.errors import ConfigError, WeatherModelError
from weathermodel.evaluation.spectra import EARTH_RADIUS_M
from weathermodel.evaluation.evaluate import energy_spectra, evaluate
from weathermodel.evaluation.layout import rank_histograms
from weathermodel.evaluation.plots import (plot_lead_time, plot_maps, plot_rank_histogram,
                                           plot_scorecard, plot_spectra, plot_spread_skill,
                                           shipped_coastline_dir, use_shipped_coastlines,
                                           write_evaluation_plots)

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")

SYSTEMS = ["model", "persistence", "climatology"]
METRICS = ["rmse", "acc", "mse"]
LEADS = pd.to_timedelta(["6h", "12h", "1d", "2d"]).values
LEVELS = [500.0, 850.0]
NCEP_LATITUDE = np.arange(75.0, 14.9, -2.5)  # descending, as in the NCEP file
NCEP_LONGITUDE = np.arange(200.0, 330.1, 2.5)
COASTLINE = ("shapefiles", "natural_earth", "physical", "ne_110m_coastline.shp")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header, after checking the signature."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def assert_plausible_png(path: Path, min_bytes: int = 8_000) -> None:
    assert path.is_file(), path
    assert path.stat().st_size > min_bytes, (path, path.stat().st_size)
    width, height = png_size(path)
    assert 300 <= width <= 3000 and 150 <= height <= 3000, (path, width, height)


@pytest.fixture(scope="module")
def scores() -> xr.Dataset:
    """A score Dataset in the schema of ``evaluate``: positive scores, acc in (0, 1)."""
    rng = np.random.default_rng(7)
    shape = (len(SYSTEMS), len(METRICS), LEADS.size)
    surface = rng.uniform(0.5, 3.0, size=shape)
    upper = rng.uniform(50.0, 400.0, size=(*shape, len(LEVELS)))
    acc = METRICS.index("acc")
    surface[:, acc] = rng.uniform(0.3, 0.99, size=surface[:, acc].shape)
    upper[:, acc] = rng.uniform(0.3, 0.99, size=upper[:, acc].shape)
    coords = {"system": SYSTEMS, "metric": METRICS, "prediction_timedelta": LEADS}
    return xr.Dataset(
        {"2m_temperature": (("system", "metric", "prediction_timedelta"), surface,
                            {"units": "K"}),
         "geopotential": (("system", "metric", "prediction_timedelta", "level"), upper,
                          {"units": "m2 s-2"})},
        coords={**coords, "level": LEVELS})


def brute_relative(scores: xr.Dataset, system: str, reference: str, metric: str) -> dict:
    """{(row label, lead index): 100 (s - r) / r}, one number at a time."""
    out = {}
    for name in scores.data_vars:
        array = scores[name]
        levels = LEVELS if "level" in array.dims else [None]
        for level in levels:
            label = name if level is None else f"{name} {level:g} hPa"
            for j in range(LEADS.size):
                point = {"metric": metric, "prediction_timedelta": LEADS[j]}
                if level is not None:
                    point["level"] = level
                s = float(array.sel(system=system, **point))
                r = float(array.sel(system=reference, **point))
                out[(label, j)] = 100.0 * (s - r) / r
    return out


def ncep_pair(seed: int = 3, members: int = 0) -> tuple[xr.Dataset, xr.Dataset]:
    """A forecast (WB2 layout) and truth on the regional NCEP grid, latitude descending."""
    rng = np.random.default_rng(seed)
    inits = pd.date_range("2013-10-01", periods=3, freq="6h")
    truth_times = pd.date_range("2013-10-01", periods=12, freq="6h")
    leads = pd.to_timedelta(["6h", "12h"]).values
    grid = {"latitude": NCEP_LATITUDE, "longitude": NCEP_LONGITUDE}
    space = (NCEP_LATITUDE.size, NCEP_LONGITUDE.size)
    truth = xr.Dataset({"2m_temperature": (("time", "latitude", "longitude"),
                                           280.0 + 5 * rng.normal(size=(12, *space)),
                                           {"units": "K"})},
                       coords={"time": truth_times, **grid})
    dims = ("time", "prediction_timedelta", "latitude", "longitude")
    shape = (3, 2, *space)
    if members:
        dims, shape = ("time", "number", *dims[1:]), (3, members, *shape[1:])
    forecast = xr.Dataset({"2m_temperature": (dims, 280.0 + 5 * rng.normal(size=shape))},
                          coords={"time": inits, "prediction_timedelta": leads, **grid,
                                  **({"number": np.arange(members)} if members else {})})
    return forecast, truth


# --------------------------------------------------------------------------------------------
# lead-time curves
# --------------------------------------------------------------------------------------------
def test_lead_time_plot_draws_the_scores(scores: xr.Dataset, tmp_path: Path) -> None:
    out = tmp_path / "lead.png"
    figure = plot_lead_time(scores, "rmse", out=out)
    assert_plausible_png(out)
    panels = figure.axes
    assert [a.get_title() for a in panels] == ["2m_temperature", "geopotential 500 hPa",
                                               "geopotential 850 hPa"]
    assert panels[0].get_ylabel() == "rmse [K]" and panels[1].get_ylabel() == "rmse [m2 s-2]"
    hours = np.array([6.0, 12.0, 24.0, 48.0])
    for axes, (name, level) in zip(panels, [("2m_temperature", None), ("geopotential", 500.0),
                                            ("geopotential", 850.0)]):
        lines = {line.get_label(): line for line in axes.get_lines()}
        assert sorted(lines) == sorted(SYSTEMS)
        assert len({line.get_marker() for line in lines.values()}) == len(SYSTEMS)
        for system, line in lines.items():
            expected = scores[name].sel(system=system, metric="rmse")
            expected = expected if level is None else expected.sel(level=level)
            np.testing.assert_array_equal(line.get_xdata(), hours)
            np.testing.assert_array_equal(line.get_ydata(), expected.values)
    mse = plot_lead_time(scores, "mse", variables=["geopotential"])
    assert len(mse.axes) == 2 and mse.axes[0].get_ylabel() == "mse [(m2 s-2)2]"
    assert plot_lead_time(scores, "acc").axes[0].get_ylabel() == "acc [1]"


# --------------------------------------------------------------------------------------------
# scorecard
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["rmse", "acc"])
def test_scorecard_numbers_equal_brute_force(scores: xr.Dataset, tmp_path: Path,
                                             metric: str) -> None:
    out = tmp_path / f"card_{metric}.png"
    figure = plot_scorecard(scores, reference="persistence", metric=metric, out=out)
    assert_plausible_png(out)
    card = figure.scorecard_values
    assert list(card["system"].values) == ["model", "climatology"]
    rows = list(card["row"].values)
    assert rows == ["2m_temperature", "geopotential 500 hPa", "geopotential 850 hPa"]
    heat_maps = [a for a in figure.axes if a.images]
    assert len(heat_maps) == 2
    for axes, system in zip(heat_maps, ["model", "climatology"]):
        expected = brute_relative(scores, system, "persistence", metric)
        image = axes.images[0]
        texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
                 for t in axes.texts}
        for (label, j), value in expected.items():
            i = rows.index(label)
            got = float(card.sel(system=system, row=label).isel(prediction_timedelta=j))
            assert got == pytest.approx(value, rel=1e-12, abs=1e-12)
            assert texts[(i, j)] == f"{value:+.1f}"  # the number printed in the cell
            # blue means better: lower rmse, higher acc
            red, _, blue, _ = image.to_rgba(np.array([[value]]))[0, 0]
            better = value > 0 if metric == "acc" else value < 0
            if abs(value) > 0.5:
                assert (blue > red) == better, (metric, system, label, j, value)
        low, high = image.get_clim()
        assert low == -high  # centred at 0


def test_scorecard_without_the_reference_names_the_systems(scores: xr.Dataset) -> None:
    with pytest.raises(ConfigError) as caught:
        plot_scorecard(scores, reference="hres")
    message = str(caught.value)
    assert "'hres'" in message and "fix:" in message
    for system in SYSTEMS:
        assert system in message


# --------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------
def test_pure_zonal_wave_has_all_its_energy_at_its_wavenumber(tmp_path: Path) -> None:
    """f = A_t cos(k l) on every row: S[k] = 2 D (A_t / 2)^2 (D the row length), 0 at other
    wavenumbers; averaged over the valid (init, lead) pairs and the rows."""
    latitude = np.array([-60.0, -30.0, 0.0, 30.0, 60.0])
    longitude = np.arange(0.0, 360.0, 10.0)
    inits = pd.date_range("2020-01-01", periods=3, freq="6h")
    # the valid time 2020-01-02T00 (third init + 12 h) is missing from the truth
    truth_times = pd.date_range("2020-01-01", periods=8, freq="6h").delete(4)
    leads = pd.to_timedelta(["6h", "12h"]).values
    amplitudes, k_model, k_truth, truth_amplitude = np.array([1.0, 2.0, 3.0]), 3, 5, 2.0
    wave = np.cos(k_model * np.deg2rad(longitude))
    values = amplitudes[:, None, None, None] * np.broadcast_to(wave, (3, 2, 5, 36))
    truth_wave = truth_amplitude * np.sin(k_truth * np.deg2rad(longitude) + 0.4)
    forecast = xr.Dataset(
        {"u": (("time", "prediction_timedelta", "latitude", "longitude"), values,
               {"units": "m s-1"})},
        coords={"time": inits, "prediction_timedelta": leads, "latitude": latitude,
                "longitude": longitude})
    truth = xr.Dataset(
        {"u": (("time", "latitude", "longitude"),
               np.broadcast_to(truth_wave, (7, latitude.size, longitude.size)).copy(),
               {"units": "m s-1"})},
        coords={"time": truth_times, "latitude": latitude, "longitude": longitude})
    spectra = energy_spectra({"model": forecast}, truth)
    assert list(spectra["system"].values) == ["model", "truth"]
    assert spectra["u"].dims == ("system", "prediction_timedelta", "zonal_wavenumber")
    assert spectra["u"].attrs["units"] == "m (m s-1)2"
    row_length = 2 * np.pi * EARTH_RADIUS_M * np.cos(np.deg2rad(latitude))
    squares = {  # mean of A^2 over the scored pairs, per lead
        "model": [np.mean(amplitudes ** 2), np.mean(amplitudes[:2] ** 2)],
        "truth": [truth_amplitude ** 2] * 2}
    for system, k in (("model", k_model), ("truth", k_truth)):
        for lead in range(2):
            expected = np.zeros(longitude.size // 2 + 1)
            expected[k] = squares[system][lead] / 2 * row_length.mean()
            np.testing.assert_allclose(spectra["u"].sel(system=system).values[lead], expected,
                                       rtol=1e-10, atol=1e-12 * expected.max())
    wavelength = spectra["wavelength"].values
    assert np.isinf(wavelength[0])
    np.testing.assert_allclose(wavelength[1:], row_length.mean() / np.arange(1, 19))
    # a latitude band: the mean over its rows only
    band = energy_spectra({"model": forecast}, truth, leads=["6h"], latitudes=(0.0, 60.0))
    assert band.sizes["prediction_timedelta"] == 1
    assert float(band["u"].sel(system="model")[0, k_model]) == pytest.approx(
        np.mean(amplitudes ** 2) / 2 * row_length[2:].mean(), rel=1e-10)

    out = tmp_path / "spectra.png"
    figure = plot_spectra(spectra, "u", lead="12h", out=out)
    assert_plausible_png(out)
    (axes,) = figure.axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert sorted(lines) == ["model", "truth"]
    np.testing.assert_allclose(lines["model"].get_xdata(), wavelength[1:] / 1000.0)
    np.testing.assert_array_equal(lines["truth"].get_ydata(),
                                  spectra["u"].sel(system="truth").values[1, 1:])
    assert axes.get_xscale() == "log" and axes.get_yscale() == "log"
    with pytest.raises(ConfigError, match="lead"):
        plot_spectra(spectra, "u", lead="5d")


# --------------------------------------------------------------------------------------------
# maps, offline
# --------------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """cartopy with an empty data_dir and no network; returns the Natural Earth files that
    cartopy resolves while drawing."""
    import cartopy
    import cartopy.feature
    import cartopy.io.shapereader as shapereader

    def refuse(*args, **kwargs):
        raise OSError("network access is forbidden in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    (tmp_path / "cartopy-data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setitem(cartopy.config, "data_dir", tmp_path / "cartopy-data")
    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir", tmp_path / "elsewhere")
    # geometries read earlier in this process must not hide where they come from
    monkeypatch.setattr(cartopy.feature, "_NATURAL_EARTH_GEOM_CACHE", {})
    resolved: list[Path] = []
    original = shapereader.natural_earth

    def recording(*args, **kwargs):
        path = original(*args, **kwargs)
        resolved.append(Path(path))
        return path

    monkeypatch.setattr(shapereader, "natural_earth", recording)
    return resolved


def test_maps_are_drawn_offline_from_the_shipped_coastlines(offline: list[Path],
                                                             tmp_path: Path) -> None:
    import cartopy.crs as ccrs
    import cartopy.feature
    import cartopy.io.shapereader as shapereader
    from cartopy.mpl.geoaxes import GeoAxes
    from matplotlib.collections import QuadMesh

    forecast, truth = ncep_pair()
    out = tmp_path / "map.png"
    figure = plot_maps(forecast, truth, "2m_temperature", "2013-10-01T06", "12h", out=out)
    assert_plausible_png(out, min_bytes=30_000)
    shipped = shipped_coastline_dir().joinpath(*COASTLINE)
    assert offline and all(path == shipped for path in offline), offline
    assert not any((tmp_path / "cartopy-data").iterdir())  # nothing downloaded
    drawn = cartopy.feature._NATURAL_EARTH_GEOM_CACHE[("coastline", "physical", "110m")]
    on_disk = list(shapereader.Reader(str(shipped)).geometries())
    assert len(drawn) == len(on_disk) == 134
    assert all(a.equals(b) for a, b in zip(drawn, on_disk))

    maps = [a for a in figure.axes if isinstance(a, GeoAxes)]
    assert len(maps) == 3
    # brute force: the values at valid time 2013-10-01T18, latitude flipped to ascending
    expected_forecast = forecast["2m_temperature"].values[1, 1, ::-1]
    expected_truth = truth["2m_temperature"].values[3, ::-1]
    meshes = [next(c for c in a.collections if isinstance(c, QuadMesh)) for a in maps]
    panels = [np.asarray(m.get_array()).reshape(expected_truth.shape) for m in meshes]
    np.testing.assert_allclose(panels[0], expected_forecast)
    np.testing.assert_allclose(panels[1], expected_truth)
    np.testing.assert_allclose(panels[2], expected_forecast - expected_truth)
    assert meshes[0].get_clim() == meshes[1].get_clim() == (
        min(expected_forecast.min(), expected_truth.min()),
        max(expected_forecast.max(), expected_truth.max()))
    low, high = meshes[2].get_clim()
    assert low == -high == -np.abs(expected_forecast - expected_truth).max()
    extent = maps[0].get_extent(crs=ccrs.PlateCarree())
    np.testing.assert_allclose(np.mod(extent[:2], 360.0), [198.75, 331.25], atol=1e-6)
    np.testing.assert_allclose(extent[2:], [13.75, 76.25], atol=1e-6)
    titles = " ".join([figure.get_suptitle()] + [a.get_title() for a in maps])
    for text in ("2013-10-01 06:00 UTC", "12 h", "2013-10-01 18:00 UTC"):
        assert text in titles, titles
    labels = [figure.axes[i].get_xlabel() for i in range(len(figure.axes))]
    assert "2m_temperature [K]" in labels and "error [K]" in labels


def test_maps_of_a_global_ensemble_on_levels(offline: list[Path], tmp_path: Path) -> None:
    from matplotlib.collections import QuadMesh

    latitude, longitude = np.arange(-90.0, 90.1, 10.0), np.arange(-180.0, 180.0, 10.0)
    grid = {"level": [500.0, 850.0], "latitude": latitude, "longitude": longitude}
    inits = pd.date_range("2013-10-01", periods=3, freq="6h")
    rng = np.random.default_rng(1)
    forecast = xr.Dataset(
        {"temperature": (("time", "number", "prediction_timedelta", "level", "latitude",
                          "longitude"), 280 + rng.normal(size=(3, 2, 2, 2, 19, 36)))},
        coords={"time": inits, "number": [0, 1],
                "prediction_timedelta": pd.to_timedelta(["6h", "12h"]).values, **grid})
    truth = xr.Dataset(
        {"temperature": (("time", "level", "latitude", "longitude"),
                         280 + rng.normal(size=(12, 2, 19, 36)), {"units": "K"})},
        coords={"time": pd.date_range("2013-10-01", periods=12, freq="6h"), **grid})
    out = tmp_path / "global.png"
    figure = plot_maps(forecast, truth, "temperature", "2013-10-01", "6h", level=850,
                       member=1, out=out)
    assert_plausible_png(out, min_bytes=30_000)
    assert offline and not any((tmp_path / "cartopy-data").iterdir())
    west, east, south, north = figure.axes[0].get_extent()
    assert east - west == pytest.approx(360.0) and (south, north) == (-90.0, 90.0)
    assert "temperature 850 hPa, member 1" in figure.get_suptitle()
    mesh = next(c for c in figure.axes[0].collections if isinstance(c, QuadMesh))
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(19, 36),
                               forecast["temperature"].values[0, 1, 0, 1])
    mean = plot_maps(forecast, truth, "temperature", "2013-10-01", "6h", level=500)
    assert "temperature 500 hPa, ensemble mean" in mean.get_suptitle()
    for bad, words in (({"member": 5}, "member 5 is not available"),
                       ({"level": 700}, "level 700.0 is not available"),
                       ({"init_time": "2014-01-01"}, "initialisation time 2014-01-01"),
                       ({"lead": "1d"}, "lead 1 days")):
        arguments = {"init_time": "2013-10-01", "lead": "6h", **bad}
        with pytest.raises(ConfigError, match=words):
            plot_maps(forecast, truth, "temperature", **arguments)


def test_use_shipped_coastlines_points_cartopy_at_the_package(monkeypatch) -> None:
    import cartopy

    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir", Path("/nowhere"))
    folder = use_shipped_coastlines()
    assert cartopy.config["pre_existing_data_dir"] == folder
    assert folder.joinpath(*COASTLINE).stat().st_size > 50_000
    for suffix in (".shx", ".dbf", ".prj"):
        assert folder.joinpath(*COASTLINE).with_suffix(suffix).is_file()


def test_missing_matplotlib_names_the_fix(monkeypatch, scores: xr.Dataset) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with pytest.raises(WeatherModelError, match=r"pip install matplotlib cartopy"):
        plot_lead_time(scores)


def test_netcdf_then_map_exits_cleanly(tmp_path: Path) -> None:
    """netCDF4 and pyproj bundle two libcurl/OpenSSL builds: reading a netCDF file before
    pyproj was loaded, then drawing a map, crashed the interpreter at exit (double free).
    ``import weathermodel`` loads pyproj first; this runs the sequence in a fresh process."""
    script = tmp_path / "sequence.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np, xarray as xr
        import weathermodel
        xr.Dataset({{"t": ("x", np.arange(3.0))}}).to_netcdf({str(tmp_path / "a.nc")!r})
        xr.open_dataset({str(tmp_path / "a.nc")!r}).load()
        from weathermodel.evaluation.plots import use_shipped_coastlines
        use_shipped_coastlines()
        import cartopy.feature, pyproj
        pyproj.CRS("EPSG:4326").to_wkt()
        list(cartopy.feature.COASTLINE.with_scale("110m").geometries())
        print("finished")
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "finished"


# --------------------------------------------------------------------------------------------
# everything at once, and the command line
# --------------------------------------------------------------------------------------------
def test_write_evaluation_plots_writes_every_figure(scores: xr.Dataset, offline: list[Path],
                                                    tmp_path: Path) -> None:
    forecast, truth = ncep_pair()
    spectra = energy_spectra({"model": forecast}, truth)
    paths = write_evaluation_plots(scores, tmp_path / "plots", forecast=forecast, truth=truth,
                                   spectra=spectra)
    names = [p.name for p in paths]
    assert names == ["lead_time_rmse.png", "scorecard_rmse.png", "lead_time_acc.png",
                     "scorecard_acc.png", "spectra_2m_temperature.png",
                     "map_2m_temperature.png"]
    for path in paths:
        assert_plausible_png(path)
    # no reference: no scorecard, the rest is written
    alone = write_evaluation_plots(scores.sel(system=["model"]), tmp_path / "alone")
    assert [p.name for p in alone] == ["lead_time_rmse.png", "lead_time_acc.png"]


def _zarr(dataset: xr.Dataset, path: Path) -> str:
    dataset.to_zarr(path, mode="w", consolidated=True)
    return str(path)


def ncep_ensemble_stores(folder: Path, members: int = 5) -> tuple[str, str]:
    """(forecast, truth) zarr stores of an ensemble on the NCEP grid."""
    forecast, truth = ncep_pair(members=members)
    grid_attrs = {"latitude": {"units": "degrees_north"}, "longitude": {"units": "degrees_east"}}
    for dataset in (forecast, truth):
        for name, attrs in grid_attrs.items():
            dataset[name].attrs = attrs
    return _zarr(forecast, folder / "ensemble.zarr"), _zarr(truth, folder / "truth.zarr")


@pytest.fixture(scope="module")
def ensemble_scores(tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    """Scores of a 5-member ensemble and persistence, by ``evaluate``."""
    forecast_path, truth_path = ncep_ensemble_stores(tmp_path_factory.mktemp("ensemble"))
    return evaluate({"ensemble": forecast_path}, truth_path, baselines=["persistence"],
                    weighting="edges")


def test_spread_skill_curves_draw_the_skill_and_the_corrected_spread(
        ensemble_scores: xr.Dataset, tmp_path: Path) -> None:
    out = tmp_path / "spread_skill.png"
    figure = plot_spread_skill(ensemble_scores, out=out)
    assert_plausible_png(out)
    (axes,) = figure.axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert sorted(lines) == ["ensemble skill", "ensemble spread"]  # persistence has no spread
    values = ensemble_scores["2m_temperature"].sel(system="ensemble")
    np.testing.assert_array_equal(lines["ensemble skill"].get_xdata(), [6.0, 12.0])
    np.testing.assert_array_equal(lines["ensemble skill"].get_ydata(),
                                  values.sel(metric="ensemble_mean_rmse").values)
    np.testing.assert_array_equal(lines["ensemble spread"].get_ydata(),
                                  values.sel(metric="corrected_spread").values)
    np.testing.assert_allclose(values.sel(metric="corrected_spread").values,
                               values.sel(metric="spread").values * np.sqrt(6 / 5), rtol=1e-12)
    assert lines["ensemble spread"].get_linestyle() == "--"
    with pytest.raises(ConfigError, match="ensemble_mean_rmse"):
        plot_spread_skill(ensemble_scores.sel(system=["persistence"], metric=["rmse"]))


def test_rank_histogram_bars_are_the_frequencies(ensemble_scores: xr.Dataset,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "rank.png"
    figure = plot_rank_histogram(ensemble_scores, "2m_temperature", "6h", out=out)
    assert_plausible_png(out)
    (axes,) = figure.axes
    heights = [patch.get_height() for patch in axes.patches]
    expected = rank_histograms(ensemble_scores)["2m_temperature"].sel(
        system="ensemble", prediction_timedelta=np.timedelta64(6, "h"))
    assert expected.sizes["rank"] == 6
    np.testing.assert_allclose(heights, expected.values, rtol=1e-12)
    assert sum(heights) == pytest.approx(1.0, rel=1e-12)
    assert axes.get_lines()[0].get_ydata()[0] == pytest.approx(1 / 6)  # calibrated: flat
    assert figure.get_suptitle() == "rank histogram, lead 6 h"
    with pytest.raises(WeatherModelError, match="no rank histogram"):
        plot_rank_histogram(ensemble_scores.sel(metric=["rmse"]), "2m_temperature")


def test_evaluate_command_on_an_ensemble_prints_and_plots_its_calibration(
        tmp_path: Path, offline: list[Path], capsys) -> None:
    forecast_path, truth_path = ncep_ensemble_stores(tmp_path)
    code = main(["evaluate", f"ens={forecast_path}", "--truth", truth_path, "--weighting",
                 "edges", "--table-metrics", "crps,corrected_spread_skill_ratio,rank_histogram",
                 "--plots", str(tmp_path / "plots")])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "corrected_spread_skill_ratio:ens" in printed and "crps:ens" in printed
    assert "2m_temperature rank histogram of ens (frequency of each rank)" in printed
    assert "r5" in printed and "r6" not in printed
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    for name in ["rank_histogram_2m_temperature_6h.png", "rank_histogram_2m_temperature_12h.png",
                 "spread_skill.png"]:
        assert name in written
        assert_plausible_png(tmp_path / "plots" / name)


def test_evaluate_command_writes_plots(tmp_path: Path, offline: list[Path], capsys) -> None:
    forecast, truth = ncep_pair()
    grid_attrs = {"latitude": {"units": "degrees_north"}, "longitude": {"units": "degrees_east"}}
    for dataset in (forecast, truth):
        for name, attrs in grid_attrs.items():
            dataset[name].attrs = attrs
    truth_path = _zarr(truth, tmp_path / "truth.zarr")
    forecast_path = _zarr(forecast, tmp_path / "model.zarr")
    code = main(["evaluate", f"graph={forecast_path}", "--truth", truth_path,
                 "--weighting", "edges", "--plots", str(tmp_path / "plots")])
    assert code == 0, capsys.readouterr().err
    assert "4 plots written" in capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["lead_time_rmse.png", "map_2m_temperature.png", "scorecard_rmse.png",
                       "spectra_2m_temperature.png"]
    for name in written:
        assert_plausible_png(tmp_path / "plots" / name)

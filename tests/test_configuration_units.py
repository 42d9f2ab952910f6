"""The configuration system, the unit registry and the variable registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from weathermodel import conventions
from weathermodel.configuration import (apply_overrides, config_to_dict, dump_config, from_dict,
                                        load_config)
from weathermodel.data.config import DataConfig, PrepareConfig
from weathermodel.errors import ConfigError
from weathermodel.units import find_conversion, normalise_units

PROJECT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (PROJECT / "configs").glob("prepare_*")))
def test_shipped_prepare_configs_validate(name: str) -> None:
    config = load_config(PrepareConfig, PROJECT / "configs" / name)
    assert config.sources and config.output


@pytest.mark.parametrize("name", sorted(p.name for p in (PROJECT / "configs").glob("model_*")))
def test_shipped_model_configs_validate(name: str) -> None:
    from weathermodel.models.config import ModelConfig

    config = load_config(ModelConfig, PROJECT / "configs" / name)
    assert config.kind in name


def test_round_trip_through_yaml() -> None:
    config = from_dict(PrepareConfig, {
        "sources": [{"path": "a.nc", "variables": {"t": {"name": "temperature", "units": "K"}}}],
        "output": "o.zarr", "levels": [500, 850], "on_gap": "skip"})
    again = from_dict(PrepareConfig, yaml.safe_load(dump_config(config)))
    assert again == config
    assert config.levels == [500.0, 850.0] and isinstance(config.levels[0], float)


@pytest.mark.parametrize("data, needle", [
    ({"sources": [{"path": "a"}], "output": "o", "colour": 1}, "colour"),
    ({"sources": [{"path": "a"}]}, "output"),
    ({"sources": [{"path": "a"}], "output": "o", "time_block": "many"}, "time_block"),
    ({"sources": [{"path": "a"}], "output": "o", "on_gap": "ignore"}, "on_gap"),
    ({"sources": [{"path": "a", "variables": {"x": {"name": "temp"}}}], "output": "o"}, "temp"),
    ({"sources": [{"path": "a"}], "output": "o", "start": "yesterday-ish"}, "start"),
    ({"sources": [], "output": "o"}, "sources"),
])
def test_invalid_configs_name_the_option(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        from_dict(PrepareConfig, data)
    assert "fix:" in str(info.value)


def test_overrides_reach_nested_options() -> None:
    data = apply_overrides({"store": "s"}, ["batch_size=8", "train.start=2013-01-01",
                                            "train.end=2013-09-30T18"])
    config = from_dict(DataConfig, data)
    assert config.batch_size == 8 and config.train.end == "2013-09-30T18"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["batch_size"])


@dataclass
class _Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class _Outer:
    count: int = 1
    flag: bool = False
    inner: _Inner = field(default_factory=_Inner)


_scalars = st.one_of(st.integers(-10**6, 10**6), st.booleans(),
                     st.text(st.characters(codec="ascii", exclude_characters="\n\r=:#'\"{}[],&*!|>%@`\\"),
                             min_size=1, max_size=8).filter(lambda s: s.strip() == s))


@settings(max_examples=80, deadline=None)
@given(count=st.integers(-1000, 1000), flag=st.booleans(),
       rate=st.floats(-1e6, 1e6, allow_nan=False),
       names=st.lists(st.text("abcxyz_", min_size=1, max_size=6), max_size=4))
def test_parser_round_trips_any_valid_config(count, flag, rate, names) -> None:
    config = _Outer(count, flag, _Inner(rate, names))
    assert from_dict(_Outer, yaml.safe_load(dump_config(config))) == config
    overrides = [f"count={count}", f"flag={str(flag).lower()}", f"inner.rate={rate!r}"]
    assert from_dict(_Outer, apply_overrides({}, overrides)).inner.rate == rate


@settings(max_examples=80, deadline=None)
@given(value=_scalars)
def test_parser_never_accepts_a_wrong_type_silently(value) -> None:
    data = {"count": value}
    if isinstance(value, int) and not isinstance(value, bool):
        assert from_dict(_Outer, data).count == value
    else:
        with pytest.raises(ConfigError, match="count"):
            from_dict(_Outer, data)


def test_config_to_dict_is_plain_data() -> None:
    plain = config_to_dict(_Outer())
    assert plain == {"count": 1, "flag": False, "inner": {"rate": 0.1, "names": []}}


@pytest.mark.parametrize("spelling, canonical", [
    ("m**2 s**-2", "m2 s-2"), ("m^2/s^2", "m2 s-2"), ("m2/s2", "m2 s-2"), ("degK", "K"),
    ("kelvin", "K"), ("m s**-1", "m s-1"), ("m/s", "m s-1"), ("kg kg**-1", "kg kg-1"),
    ("millibars", "hPa"), ("mb", "hPa"), ("(0 - 1)", "1"), ("J m**-2", "J m-2"),
    ("degC", "degC"), ("Celsius", "degC"), ("gpm", "m")])
def test_unit_spellings(spelling: str, canonical: str) -> None:
    assert normalise_units(spelling) == canonical
    assert normalise_units(canonical) == canonical  # idempotent


@pytest.mark.parametrize("source, target, value, expected", [
    ("degC", "K", 0.0, 273.15), ("degC", "K", -40.0, 233.15), ("hPa", "Pa", 1013.25, 101325.0),
    ("mb", "Pa", 500.0, 50000.0), ("gpm", "m**2 s**-2", 5500.0, 5500.0 * 9.80665),
    ("dam", "m2 s-2", 550.0, 5500.0 * 9.80665), ("mm", "m", 12.0, 0.012), ("%", "1", 50.0, 0.5),
    ("K", "degK", 280.0, 280.0)])
def test_exact_conversions(source: str, target: str, value: float, expected: float) -> None:
    conversion = find_conversion(source, target)
    assert conversion is not None
    assert value * conversion.scale + conversion.offset == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("source, target", [("K", "Pa"), ("m s-1", "K"), ("furlongs", "m"),
                                            ("degF", "K")])
def test_ambiguous_or_unknown_conversions_are_refused(source: str, target: str) -> None:
    assert find_conversion(source, target) is None


def test_registry_resolves_aliases_found_in_real_files() -> None:
    assert conventions.lookup_variable("t2m").name == "2m_temperature"
    assert conventions.lookup_variable("2t").name == "2m_temperature"
    assert conventions.lookup_variable("air", has_levels=False).name == "2m_temperature"
    assert conventions.lookup_variable("air", has_levels=True).name == "temperature"
    assert conventions.lookup_variable("air") is None  # ambiguous without the level information
    assert conventions.lookup_variable("z", has_levels=True).name == "geopotential"
    assert conventions.lookup_variable("z", has_levels=False).name == "geopotential_at_surface"
    assert conventions.lookup_variable("msl").name == "mean_sea_level_pressure"
    assert conventions.lookup_variable("gh").name == "geopotential_height"
    assert conventions.lookup_variable("no_such_thing") is None


def test_registry_is_consistent() -> None:
    aliases = {}
    for info in conventions.VARIABLES.values():
        assert normalise_units(info.units) == info.units, info.name
        low, high = info.plausible_range
        assert low < high
        for alias in info.aliases:
            aliases.setdefault(alias, []).append(info)
    for alias, infos in aliases.items():  # a shared alias must be told apart by levels
        assert len({i.has_levels for i in infos}) == len(infos), alias
    assert conventions.channel_name("temperature", 850.0) == "temperature_850"
    assert conventions.channel_name("2m_temperature", None) == "2m_temperature"
    assert len(set(conventions.FORCING_NAMES)) == len(conventions.FORCING_NAMES)
    assert np.isclose(conventions.STANDARD_GRAVITY, 9.80665)


@pytest.mark.parametrize("text, hours", [("5d", 120), ("1d12h", 36), ("5 d", 120), ("2days", 48),
                                         ("10D", 240), ("6h", 6), ("90min", 1.5)])
def test_durations_in_days_parse_without_pandas_deprecation(text: str, hours: float) -> None:
    """pandas deprecates the lowercase 'd' unit; the help texts use it, so it is mapped."""
    import warnings

    from weathermodel.data.config import parse_timedelta

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_timedelta(text).total_seconds() == hours * 3600

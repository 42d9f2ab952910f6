"""Unit spellings and the few conversions that are unambiguous.

Units are checked, never guessed: a unit string is first normalised to one spelling
(``m**2 s**-2``, ``m^2/s^2`` and ``m2 s-2`` are the same), then compared with the canonical
units of :mod:`weathermodel.conventions`. Only the conversions listed in ``_CONVERSIONS`` are
applied (each is exact and logged by the caller); anything else is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from weathermodel.conventions import STANDARD_GRAVITY

_SYNONYMS: dict[str, str] = {
    "k": "K", "degk": "K", "deg k": "K", "kelvin": "K", "degrees kelvin": "K", "kelvins": "K",
    "degc": "degC", "deg c": "degC", "c": "degC", "celsius": "degC", "degrees celsius": "degC",
    "°c": "degC", "degree_celsius": "degC", "degrees_celsius": "degC",
    "pa": "Pa", "pascal": "Pa", "pascals": "Pa",
    "hpa": "hPa", "mb": "hPa", "mbar": "hPa", "millibar": "hPa", "millibars": "hPa",
    "m": "m", "gpm": "m", "metre": "m", "meter": "m", "metres": "m", "meters": "m",
    "dam": "dam", "gpdm": "dam",
    "mm": "mm",
    "1": "1", "(0 - 1)": "1", "0-1": "1", "(0-1)": "1", "~": "1", "fraction": "1", "": "1",
    "%": "%", "percent": "%",
}


def normalise_units(units: str) -> str:
    """Return one canonical spelling for a unit string found in a file.

    ``m**2 s**-2``, ``m^2 s^-2``, ``m2/s2`` -> ``m2 s-2``; ``degK`` -> ``K``; ``millibars`` -> ``hPa``.
    Unknown strings are returned with only whitespace and exponent markers normalised.
    """
    text = units.strip()
    key = text.lower()
    if key in _SYNONYMS:
        return _SYNONYMS[key]
    text = text.replace("**", "").replace("^", "")
    text = re.sub(r"\s+", " ", text)
    # a/b/c -> a b-1 c-1
    if "/" in text:
        head, *tail = text.split("/")
        parts = head.split()
        for factor in tail:
            for token in factor.split():
                match = re.fullmatch(r"([A-Za-z%]+)(-?\d*)", token)
                if match:
                    power = -int(match.group(2) or 1)
                    parts.append(f"{match.group(1)}{power}")
                else:
                    parts.append(token)
        text = " ".join(parts)
    return text


@dataclass(frozen=True)
class Conversion:
    """An exact affine conversion ``canonical = value * scale + offset``."""

    source_units: str
    target_units: str
    scale: float
    offset: float
    description: str


_CONVERSIONS: tuple[Conversion, ...] = (
    Conversion("degC", "K", 1.0, 273.15, "degrees Celsius to Kelvin (+273.15)"),
    Conversion("hPa", "Pa", 100.0, 0.0, "hPa to Pa (x100)"),
    Conversion("mm", "m", 1e-3, 0.0, "mm to m (x0.001)"),
    Conversion("%", "1", 0.01, 0.0, "percent to fraction (x0.01)"),
)

#: Geopotential height (m) -> geopotential (m2 s-2): multiply by standard gravity.
GEOPOTENTIAL_FROM_HEIGHT = Conversion(
    "m", "m2 s-2", STANDARD_GRAVITY, 0.0,
    f"geopotential height (m) to geopotential (x g = {STANDARD_GRAVITY} m s-2)")
GEOPOTENTIAL_FROM_DAM = Conversion(
    "dam", "m2 s-2", 10.0 * STANDARD_GRAVITY, 0.0,
    f"geopotential height (dam) to geopotential (x 10 g = {10 * STANDARD_GRAVITY} m s-2)")


def find_conversion(source_units: str, target_units: str) -> Conversion | None:
    """The exact conversion from ``source_units`` to ``target_units``, or None if there is none.

    Both arguments may be in any spelling; identity returns a unit conversion (scale 1).
    """
    src, dst = normalise_units(source_units), normalise_units(target_units)
    if src == dst:
        return Conversion(src, dst, 1.0, 0.0, "none")
    for conversion in (*_CONVERSIONS, GEOPOTENTIAL_FROM_HEIGHT, GEOPOTENTIAL_FROM_DAM):
        if conversion.source_units == src and conversion.target_units == dst:
            return conversion
    return None

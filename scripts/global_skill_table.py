"""Skill table of a global forecast: RMSE of z500, t850, t2m, u850 and q700 at every lead,
model against persistence and a day-of-year climatology, from the scores that
``weathermodel evaluate`` wrote (WeatherBench 2 conventions).

    python scripts/global_skill_table.py SCORES.nc [--system NAME] > skill.md

Prints a markdown table and, last, whether the model beats both baselines at every lead.
"""
from __future__ import annotations

import argparse

import numpy as np
import xarray as xr

HEADLINE = [("geopotential", 500, "z500", "m2 s-2", 1.0),
            ("temperature", 850, "t850", "K", 1.0),
            ("2m_temperature", None, "t2m", "K", 1.0),
            ("u_component_of_wind", 850, "u850", "m s-1", 1.0),
            ("specific_humidity", 700, "q700", "g kg-1", 1000.0)]
TABLE_LEADS_HOURS = (6, 24, 48, 72, 96, 120)


def headline_rmse(scores: xr.Dataset) -> dict[str, xr.DataArray]:
    """RMSE (system, prediction_timedelta) of each headline variable, in table units."""
    found = {}
    for variable, level, short, _, factor in HEADLINE:
        if variable not in scores:
            continue
        rmse = scores[variable].sel(metric="rmse")
        if level is not None:
            rmse = rmse.sel(level=level)
        for dim in [d for d in rmse.dims if d not in ("system", "prediction_timedelta")]:
            rmse = rmse.isel({dim: 0})
        found[short] = rmse * factor
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scores")
    parser.add_argument("--system", default="model", help="the model's system name")
    args = parser.parse_args()
    scores = xr.open_dataset(args.scores)
    units = {short: unit for _, _, short, unit, _ in HEADLINE}
    rows = headline_rmse(scores)
    leads = scores["prediction_timedelta"].values
    print("| variable | system | " + " | ".join(f"{h} h" for h in TABLE_LEADS_HOURS) + " |")
    print("|---|---|" + "---|" * len(TABLE_LEADS_HOURS))
    beaten_everywhere = True
    for short, rmse in rows.items():
        for system in [str(s) for s in rmse["system"].values]:
            cells = []
            for hours in TABLE_LEADS_HOURS:
                lead = np.timedelta64(hours, "h")
                value = float(rmse.sel(system=system, prediction_timedelta=lead)) \
                    if lead in leads else np.nan
                cells.append("-" if np.isnan(value) else f"{value:.3g}")
            print(f"| {short} [{units[short]}] | {system} | " + " | ".join(cells) + " |")
        model = rmse.sel(system=args.system)
        for baseline in ("persistence", "climatology"):
            if baseline in rmse["system"].values:
                worse = (model >= rmse.sel(system=baseline)).values
                if worse.any():
                    beaten_everywhere = False
                    hours = leads[worse].astype("timedelta64[h]").astype(int).tolist()
                    print(f"\n{short}: not better than {baseline} at {hours} h")
    print(f"\nmodel better than persistence and climatology at every lead for every headline "
          f"variable: {'yes' if beaten_everywhere else 'no'}")


if __name__ == "__main__":
    main()

"""Ensemble skill table of issue 15: CRPS and spread-skill ratio of ensemble systems against
the MAE of the deterministic model, for z500 and t850 at 24, 72 and 120 h, from the scores
that ``weathermodel evaluate`` wrote (WeatherBench 2 conventions: fair CRPS; the spread-skill
ratio with the (M+1)/M finite-ensemble correction, 1 for a calibrated ensemble).

    python scripts/ensemble_skill_table.py SCORES.nc --ensembles crps,perturbed \\
        --perturbed perturbed --deterministic deterministic [--figures DIR] > skill.md

Prints a markdown table and, last, each goal with whether it is met. With ``--figures``, also
draws the rank histograms of z500 and t850 at 72 and 120 h.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import xarray as xr

import weathermodel  # noqa: F401  (loads pyproj before netCDF4; see docs/architecture.md)

HEADLINE = [("geopotential", 500.0, "z500", "m2 s-2"), ("temperature", 850.0, "t850", "K")]
LEADS_HOURS = (24, 72, 120)


def score(scores: xr.Dataset, variable: str, level: float, system: str, metric: str,
          hours: int) -> float:
    values = scores[variable].sel(system=system, metric=metric, level=level,
                                  prediction_timedelta=np.timedelta64(hours, "h"))
    if "region" in values.dims:
        values = values.isel(region=0)
    return float(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores")
    parser.add_argument("--ensembles", required=True, help="comma-separated ensemble systems")
    parser.add_argument("--perturbed", required=True,
                        help="the calibrated perturbed-initial-condition ensemble of the "
                             "deterministic model (the goals compare the first ensemble to it)")
    parser.add_argument("--deterministic", required=True, help="the deterministic system")
    parser.add_argument("--figures", help="folder for rank-histogram PNGs")
    args = parser.parse_args()
    scores = xr.open_dataset(args.scores)
    ensembles = args.ensembles.split(",")
    header = ["variable", "lead"] + [f"CRPS {name}" for name in ensembles] \
        + [f"MAE {args.deterministic}"] + [f"SSR {name}" for name in ensembles]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    goals: list[tuple[str, bool]] = []
    first = ensembles[0]
    for variable, level, short, units in HEADLINE:
        for hours in LEADS_HOURS:
            crps = {name: score(scores, variable, level, name, "crps", hours)
                    for name in ensembles}
            mae = score(scores, variable, level, args.deterministic, "mae", hours)
            ssr = {name: score(scores, variable, level, name, "corrected_spread_skill_ratio",
                               hours) for name in ensembles}
            cells = [f"{short} ({units})", f"{hours} h"] + [f"{crps[n]:.4g}" for n in ensembles] \
                + [f"{mae:.4g}"] + [f"{ssr[n]:.2f}" for n in ensembles]
            print("| " + " | ".join(cells) + " |")
            perturbed = args.perturbed
            goals.append((f"{short} {hours} h: CRPS of {first} ({crps[first]:.4g}) below "
                          f"{perturbed}'s ({crps[perturbed]:.4g}) and the deterministic MAE "
                          f"({mae:.4g})", crps[first] < min(crps[perturbed], mae)))
            if hours >= 72:
                goals.append((f"{short} {hours} h: SSR of {first} in [0.8, 1.2] "
                              f"({ssr[first]:.2f})", 0.8 <= ssr[first] <= 1.2))
            if hours == 72:
                goals.append((f"{short} 72 h: SSR of {perturbed} in [0.7, 1.3] "
                              f"({ssr[perturbed]:.2f})", 0.7 <= ssr[perturbed] <= 1.3))
    print()
    for goal, met in goals:
        print(f"- {'met' if met else 'NOT met'}: {goal}")
    if args.figures:
        from weathermodel.evaluation.plots import plot_rank_histogram

        folder = Path(args.figures)
        folder.mkdir(parents=True, exist_ok=True)
        for variable, *_ in HEADLINE:  # one panel per level
            for hours in (72, 120):
                plot_rank_histogram(scores, variable, f"{hours}h",
                                    out=folder / f"rank_histogram_{variable}_{hours}h.png")


if __name__ == "__main__":
    main()

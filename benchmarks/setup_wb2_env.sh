#!/usr/bin/env bash
# Creates .venv-wb2: an environment holding our package next to Google's WeatherBench 2 (WB2),
# for benchmarks/bench_evaluate_vs_wb2.py, which times both evaluations in this one environment
# (same numpy, xarray, dask and zarr for both).
#
# WB2 is not on PyPI; it is installed from a local checkout:
#   WB2_SOURCE=/path/to/weatherbench2   a checkout (a folder holding setup.py), used as it is;
#   otherwise a `git archive` of the mirror at $WB2_MIRROR (default
#   /work/.mirror/google-research+weatherbench2/repo) when it exists;
#   otherwise pip's git+https://github.com/google-research/weatherbench2.
# WB2's own requirements (apache-beam, xarray-beam, jax[cpu], scikit-learn, ...) come from PyPI.
# torch is pinned by constraints-cpu.txt on every pip call (our package needs it; nothing of
# WB2 does), so pip never pulls a CUDA build.
#
# Idempotent: rerunning skips what is installed. WB2_REINSTALL=1 reinstalls WB2 from its source.
#
#   bash benchmarks/setup_wb2_env.sh
#   .venv/bin/python benchmarks/bench_evaluate_vs_wb2.py --quick   # finds .venv-wb2 itself
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_WB2:-$ROOT/.venv-wb2}"
CONSTRAINTS="$ROOT/constraints-cpu.txt"
WB2_MIRROR="${WB2_MIRROR:-/work/.mirror/google-research+weatherbench2/repo}"
WB2_URL="git+https://github.com/google-research/weatherbench2"
source "$ROOT/benchmarks/_peer_venv.sh"

echo "== torch 2.13.0 (CPU, pinned by $CONSTRAINTS) and weathermodel (editable, no extras)"
if have weathermodel && have torch; then
    echo "   already installed"
else
    "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" -e "$ROOT"
fi

echo "== weatherbench2 and its requirements (apache-beam, xarray-beam, jax[cpu], ...)"
if have weatherbench2 && [ -z "${WB2_REINSTALL:-}" ]; then
    echo "   already installed"
else
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    if [ -n "${WB2_SOURCE:-}" ]; then
        if [ ! -f "$WB2_SOURCE/setup.py" ]; then
            echo "WB2_SOURCE=$WB2_SOURCE holds no setup.py" >&2
            exit 1
        fi
        SOURCE="$WB2_SOURCE"
        echo "   from WB2_SOURCE=$SOURCE"
    elif [ -d "$WB2_MIRROR" ]; then
        SOURCE="$TMP/weatherbench2"
        mkdir -p "$SOURCE"
        git --git-dir="$WB2_MIRROR" archive --format=tar HEAD | tar -x -C "$SOURCE"
        COMMIT="$(git --git-dir="$WB2_MIRROR" rev-parse HEAD)"
        echo "$COMMIT" > "$VENV/weatherbench2-commit.txt"
        echo "   from a git archive of $WB2_MIRROR at $COMMIT"
    else
        SOURCE="$WB2_URL"
        echo "   from $SOURCE"
    fi
    "${PIP[@]}" "$SOURCE"
fi

echo "== check"
"$PY" -I - <<'PYEOF'
import importlib.metadata as md
import warnings

warnings.filterwarnings("ignore")
import torch

assert torch.__version__ == "2.13.0+cpu", f"expected CPU torch 2.13.0, found {torch.__version__}"
from weatherbench2 import config, evaluation, metrics  # noqa: F401  (imports apache_beam)
import weathermodel.evaluation.evaluate  # noqa: F401

for name in ("weatherbench2", "weathermodel", "apache-beam", "xarray-beam", "jax", "xarray",
             "dask", "zarr", "numcodecs", "numpy", "pandas", "scipy", "torch"):
    try:
        print(f"   {name:14s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"   {name:14s} not installed")
PYEOF
echo "ready: .venv/bin/python benchmarks/bench_evaluate_vs_wb2.py [--quick]"

#!/usr/bin/env bash
# Creates .venv-bench: an environment holding our package next to NVIDIA PhysicsNeMo's GraphCastNet
# and ECMWF Anemoi's graph models, for benchmarks/bench_graph_vs_physicsnemo.py and
# benchmarks/bench_graph_vs_anemoi.py. CPU only: torch is pinned by constraints-cpu.txt
# (torch==2.13.0, whose CPU wheel lies on the build machines' disk) on every pip call, so pip never
# pulls a CUDA torch. PhysicsNeMo's GraphCastNet runs on its PyG backend here (torch-geometric,
# scikit-learn for its graph builder, torch-scatter/torch-sparse from the prebuilt CPU wheels in
# ../shared/wheels); DGL is not needed.
#
# torchvision: PhysicsNeMo requires it (through timm), and the only torchvision wheels on this
# machine's indexes are CUDA builds whose C++ extension cannot load beside the CPU torch, so a plain
# `import torchvision` fails with "operator torchvision::nms does not exist". GraphCastNet never
# calls torchvision; bench_graph_vs_physicsnemo.py declares the two missing operator schemas
# before importing PhysicsNeMo (see import_graphcastnet there). torch itself is never replaced.
#
# Anemoi: anemoi-models and anemoi-graphs releases cap torch below 2.11 but run on 2.13, so they are
# installed with --no-deps, and beside them only the pure-Python packages that their imports need
# (anemoi-utils, also --no-deps: its anemoi-transform extra pulls earthkit; pydantic, rich, ...).
#
# Idempotent: rerunning skips what is installed at the right version.
#
#   bash benchmarks/setup_peer_env.sh
#   .venv-bench/bin/python benchmarks/bench_graph_vs_physicsnemo.py
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_BENCH:-$ROOT/.venv-bench}"
CONSTRAINTS="$ROOT/constraints-cpu.txt"
WHEELS="${WHEELS_DIR:-$ROOT/../shared/wheels}"
PHYSICSNEMO_VERSION="2.2.2"
ANEMOI_MODELS_VERSION="0.19.0"
ANEMOI_GRAPHS_VERSION="0.9.8"
source "$ROOT/benchmarks/_peer_venv.sh"

echo "== torch 2.13.0 (CPU, pinned by $CONSTRAINTS)"
if have torch 2.13.0+cpu; then echo "   already installed"; else "${PIP[@]}" "torch==2.13.0"; fi

echo "== nvidia-physicsnemo==$PHYSICSNEMO_VERSION, torch-geometric, scikit-learn"
if have nvidia-physicsnemo "$PHYSICSNEMO_VERSION" && have torch-geometric && have scikit-learn; then
    echo "   already installed"
else
    "${PIP[@]}" "nvidia-physicsnemo==$PHYSICSNEMO_VERSION" torch-geometric scikit-learn
fi

echo "== torch-scatter / torch-sparse (prebuilt CPU wheels for torch 2.13.0, from $WHEELS)"
if have torch-scatter 2.1.2 && have torch-sparse 0.6.18; then
    echo "   already installed"
else
    shopt -s nullglob
    wheels=("$WHEELS"/torch_scatter-*.whl "$WHEELS"/torch_sparse-*.whl)
    shopt -u nullglob
    if [ "${#wheels[@]}" -ne 2 ]; then
        echo "missing prebuilt wheels in $WHEELS (torch_scatter-*.whl, torch_sparse-*.whl)" >&2
        exit 1
    fi
    # torch-sparse needs scipy at run time; --no-deps keeps pip away from torch.
    "${PIP[@]}" scipy
    "${PIP[@]}" --no-deps "${wheels[@]}"
fi

echo "== anemoi-models==$ANEMOI_MODELS_VERSION, anemoi-graphs==$ANEMOI_GRAPHS_VERSION (--no-deps)"
if have anemoi-models "$ANEMOI_MODELS_VERSION" && have anemoi-graphs "$ANEMOI_GRAPHS_VERSION" \
        && have anemoi-utils && have pydantic-settings; then
    echo "   already installed"
else
    "${PIP[@]}" --no-deps "anemoi-models==$ANEMOI_MODELS_VERSION" \
        "anemoi-graphs==$ANEMOI_GRAPHS_VERSION" anemoi-utils
    # what their imports need (torch-geometric, scipy, hydra-core come with PhysicsNeMo above)
    "${PIP[@]}" einops networkx typeguard aniso8601 deprecation entrypoints multiurl peekle \
        "pydantic>=2.9" "pydantic-settings>=2.14.1" rich pyyaml tqdm filelock
fi

echo "== weathermodel (editable, no extras)"
if have weathermodel; then echo "   already installed"; else "${PIP[@]}" -e "$ROOT"; fi

echo "== check"
"$PY" -I - "$ROOT/benchmarks" <<'PYEOF'
import importlib.metadata as md
import sys
import warnings

warnings.filterwarnings("ignore")
import torch

assert torch.__version__ == "2.13.0+cpu", f"expected the CPU torch 2.13.0, found {torch.__version__}"
import torch_geometric, torch_scatter, torch_sparse  # noqa: F401
sys.dont_write_bytecode = True  # no __pycache__ in benchmarks/
sys.path.insert(0, sys.argv[1])
from bench_graph_vs_physicsnemo import import_graphcastnet

import_graphcastnet()
from anemoi.models.layers.mapper import GraphTransformerForwardMapper  # noqa: F401
from anemoi.models.layers.processor import GNNProcessor  # noqa: F401
import weathermodel

print(f"   weathermodel from {weathermodel.__file__}")

for name in ("torch", "nvidia-physicsnemo", "torch-geometric", "torch-scatter", "torch-sparse",
             "scikit-learn", "scipy", "numpy", "torchvision", "dgl", "anemoi-models",
             "anemoi-graphs", "anemoi-utils", "weathermodel"):
    try:
        print(f"   {name:20s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"   {name:20s} not installed")
PYEOF
echo "ready: $VENV/bin/python benchmarks/bench_graph_vs_physicsnemo.py (or bench_graph_vs_anemoi.py)"

# Shared by the setup scripts of benchmark-only environments (sourced, not run). The caller sets
# VENV and CONSTRAINTS; this defines PY, PIP (torch pinned on every call) and `have`, checks the
# torch pin and creates the virtual environment if it is missing.
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off -c "$CONSTRAINTS")

# have NAME [VERSION]: NAME is installed (at VERSION if given). -I: not the egg-info in the cwd.
have() {
    "$PY" -I - "$1" "${2:-}" <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
try:
    version = md.version(sys.argv[1])
except md.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if not sys.argv[2] or version == sys.argv[2] else 1)
PYEOF
}

grep -q '^torch==2.13.0$' "$CONSTRAINTS" || { echo "expected torch==2.13.0 in $CONSTRAINTS" >&2; exit 1; }
if [ ! -x "$PY" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
fi

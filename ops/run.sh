#!/usr/bin/env bash
# Set up once (a virtualenv in .venv with the package and its test tools), then run.
#   bash ops/run.sh demo      the main job, on the embedded Redis unless REDIS_URL is set
#   bash ops/run.sh test      the whole test suite (ruff, mypy, then pytest)
#   bash ops/run.sh ARGS...   any other cachesaver-dist command
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "ops/run.sh: Python 3.10 or newer is needed (set PYTHON=/path/to/python3)" >&2
  exit 2
fi
if [ ! -x .venv/bin/cachesaver-dist ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "ops/run.sh: installing into .venv ..." >&2
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.installed
fi

case "${1:-demo}" in
  demo) shift || true; exec .venv/bin/cachesaver-dist demo "$@" ;;
  test) shift; .venv/bin/ruff check . && .venv/bin/mypy && exec .venv/bin/pytest "$@" ;;
  *) exec .venv/bin/cachesaver-dist "$@" ;;
esac

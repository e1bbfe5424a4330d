#!/usr/bin/env bash
# Run every benchmark study of issue #4, one after another (each takes under ~3 minutes
# and rewrites its own section of bench/RESULTS.md). Usage: bash bench/run_all.sh [study...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
"$PY" bench/original_env.py          # bench/.venv-original (cachesaver==0.0.6), bench/.venv-tools
studies=("$@")
if [ ${#studies[@]} -eq 0 ]; then
  studies=(hit_path placement dropin miss_backlog multiprocess scaling sharding memory savings_study)
fi
failed=()
for s in "${studies[@]}"; do
  echo "=== $s ==="
  start=$(date +%s)
  if ! timeout 600 "$PY" "bench/$s.py"; then
    failed+=("$s")
  fi
  echo "=== $s: $(( $(date +%s) - start )) s ==="
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
echo "all studies done: see bench/RESULTS.md"

#!/usr/bin/env bash
# Run every benchmarks/*.py (files starting with _ are helpers, not benchmarks); each writes
# benchmarks/results/<name>.json and prints a table. All run even when one fails; the exit
# code is non-zero if any failed. Expects the local stack up (make bench arranges that).
set -uo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob

failed=()
ran=0
for bench in benchmarks/*.py; do
    [[ $(basename "$bench") == _* ]] && continue
    echo "=== $bench"
    ran=$((ran + 1))
    .venv/bin/python "$bench" || failed+=("$bench")
done
if ((ran == 0)); then
    echo "no benchmarks yet (benchmarks/*.py)"
elif ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi

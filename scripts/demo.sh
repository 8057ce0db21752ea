#!/usr/bin/env bash
# Sets up .venv if needed, then detects anomalies in the bundled sample with the bundled default
# model. Outputs go to out/sample/ (or the folder given as the first argument).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
out="${1:-out/sample}"
.venv/bin/simpleslicenet detect Resources/Samples/sample_t1_lesion.nii.gz --output-dir "$out"
echo
echo "Done. Open $out/sample_t1_lesion_overlay.png, or load $out/sample_t1_lesion_heatmap.nii.gz over the"
echo "sample in 3D Slicer. The report is $out/sample_t1_lesion_report.json."

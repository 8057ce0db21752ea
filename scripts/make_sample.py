"""Regenerate the bundled sample case: a glioma-like lesion planted in a held-out-template brain.

    .venv/bin/python scripts/make_sample.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from SimpleSliceNetLib.volume_io import save_volume
from SimpleSliceNetTraining.synth import make_case

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    # SRI24 is never used for training, so the sample shows the model on an unseen brain.
    volume, mask = make_case("glioma", seed=2024, grid="brats", orientation="RAS", template="sri24")
    out = ROOT / "Resources" / "Samples"
    save_volume(out / "sample_t1_lesion.nii.gz", volume.array.astype(np.float32), volume.affine)
    save_volume(out / "sample_t1_lesion_mask.nii.gz", (mask > 0).astype(np.uint8), volume.affine)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Training sets with 0%, 10% and 30% unlabelled lesion volumes, for the contamination experiment.

Usage: python scripts/make_contamination_sets.py data/synth_default [--levels 0,10,30]

Next to the synthetic set's ``cases.json`` it writes ``contam/`` (the lesion volumes, made with the
synthetic generator from the training templates and seeds no other case uses) and one manifest per
level, ``cases_c<P>.json``: the same 40 training volumes with the first P% replaced by lesion
volumes, labelled ``null`` (unlabelled, so both trainers use them) and without masks; the val/test
entries are unchanged. The sets are nested: the 10% contaminants are among the 30% ones.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from SimpleSliceNetTraining.synth import GRIDS, ORIENTATIONS, CaseSpec, SynthConfig, _write_case
from SimpleSliceNetTraining.synth_lesions import LESION_FAMILIES

# Entropy offset: far past the case indices of any synth set, so no anatomy repeats.
SEED_OFFSET = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synth_dir", type=Path)
    parser.add_argument("--levels", default="0,10,30", help="percentages of contaminated training volumes")
    args = parser.parse_args()
    manifest = json.loads((args.synth_dir / "cases.json").read_text())
    config = SynthConfig(**{k: v for k, v in manifest["config"].items() if k in SynthConfig.__dataclass_fields__})
    train = [c for c in manifest["cases"] if c["split"] == "train"]
    levels = [int(p) for p in args.levels.split(",")]
    n_max = round(max(levels) / 100 * len(train))
    grids, templates = list(GRIDS), config.train_templates
    contaminants = []
    for k in range(n_max):
        spec = CaseSpec(id=f"contam_{k:03d}_{LESION_FAMILIES[k % 3]}", split="contam", family=LESION_FAMILIES[k % 3],
                        template=templates[k % len(templates)], grid=grids[k % len(grids)],
                        orientation=ORIENTATIONS[k % len(ORIENTATIONS)], suffix=".nii.gz",
                        entropy=(config.seed, SEED_OFFSET + k))
        entry = _write_case(spec, args.synth_dir)
        entry.update(split="train", label=None, mask=None, contaminant=True)
        contaminants.append(entry)
        print(f"wrote {entry['image']}", flush=True)
    for level in levels:
        n = round(level / 100 * len(train))
        out = copy.deepcopy(manifest)
        kept = [c for c in out["cases"] if c["split"] != "train"]
        out["cases"] = contaminants[:n] + train[n:] + kept
        out["contamination"] = {"percent": level, "contaminated_train_volumes": n, "train_volumes": len(train)}
        path = args.synth_dir / f"cases_c{level}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}: {n} of {len(train)} training volumes contain lesions")


if __name__ == "__main__":
    main()

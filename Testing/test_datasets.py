"""Dataset loaders: manifest, BraTS, IXI and plain folders; mask pairing and grid checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.volume_io import load_volume, save_volume
from SimpleSliceNetTraining.datasets import SplitRule, brats_splits, load_cases, load_mask, load_sources

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def _volume(path: Path, seed: int = 0, affine: np.ndarray = AFFINE, shape=(10, 10, 10), label: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    array = (rng.random(shape) > 0.7).astype(np.uint8) if label else rng.random(shape).astype(np.float32)
    return save_volume(path, array, affine)


def test_plain_folder_pairs_masks_and_labels(tmp_path):
    _volume(tmp_path / "a.nii.gz")
    _volume(tmp_path / "a_mask.nii.gz", label=True)
    _volume(tmp_path / "b.nrrd")
    _volume(tmp_path / "masks" / "b.nii.gz", label=True)
    _volume(tmp_path / "c.nii")
    _volume(tmp_path / "d.nii.gz")
    _volume(tmp_path / "d_seg.nrrd", label=True)
    _volume(tmp_path / "e.nii.gz")
    _volume(tmp_path / "e_label.nii.gz", label=True)
    (tmp_path / "notes.txt").write_text("not a volume")

    cases = load_cases(tmp_path)
    assert [c.id for c in cases] == ["a", "b", "c", "d", "e"]
    by_id = {c.id: c for c in cases}
    assert by_id["a"].mask == tmp_path / "a_mask.nii.gz"
    assert by_id["b"].mask == tmp_path / "masks" / "b.nii.gz"
    assert by_id["d"].mask == tmp_path / "d_seg.nrrd"
    assert by_id["e"].mask == tmp_path / "e_label.nii.gz"
    assert by_id["c"].mask is None and by_id["c"].label is None
    assert {c.label for c in cases if c.mask is not None} == {"lesion"}
    assert all(c.split is None and c.meta["layout"] == "folder" for c in cases)
    assert load_cases(tmp_path, assume_healthy=True)[2].label == "healthy"
    # One volume file on its own is a case too.
    single = load_cases(tmp_path / "a.nii.gz")
    assert len(single) == 1 and single[0].mask == tmp_path / "a_mask.nii.gz"


def test_plain_folder_duplicate_names_are_an_error(tmp_path):
    _volume(tmp_path / "a.nii.gz")
    _volume(tmp_path / "a.nrrd")
    with pytest.raises(UserError, match="two cases are named 'a'"):
        load_cases(tmp_path)


def test_several_sources_are_combined_with_their_names_in_the_ids(tmp_path):
    """Two sets with the same case names (two synth runs) train together; one source keeps its ids."""
    for folder in ("set_a", "set_b"):
        _volume(tmp_path / folder / "train_000.nii.gz")
        _volume(tmp_path / folder / "train_001.nii.gz", seed=1)
    _volume(tmp_path / "set_b" / "train_002.nii.gz", seed=2)
    listing = tmp_path / "more.txt"
    listing.write_text("set_a/train_000.nii.gz\n")
    cases = load_sources([tmp_path / "set_a", tmp_path / "set_b", listing], assume_healthy=True)
    assert [c.id for c in cases] == ["more/train_000", "set_a/train_000", "set_a/train_001", "set_b/train_000",
                                     "set_b/train_001", "set_b/train_002"]
    assert cases[3].image == tmp_path / "set_b" / "train_000.nii.gz"
    assert all(c.label == "healthy" for c in cases)
    assert [c.id for c in load_sources([tmp_path / "set_b"])] == ["train_000", "train_001", "train_002"]
    # Sources that share a folder name are told apart by their position.
    _volume(tmp_path / "other" / "set_a" / "train_000.nii.gz")
    both = load_sources([tmp_path / "set_a", tmp_path / "other" / "set_a"])
    assert [c.id for c in both] == ["1-set_a/train_000", "1-set_a/train_001", "2-set_a/train_000"]
    with pytest.raises(UserError, match="missing"):
        load_sources([tmp_path / "set_a", tmp_path / "missing"])


def _brats(root: Path, number: int, with_seg: bool = True) -> Path:
    folder = root / f"BraTS2021_{number:05d}"
    for i, token in enumerate(["t1", "t1ce", "t2", "flair"]):
        _volume(folder / f"{folder.name}_{token}.nii.gz", seed=i)
    if with_seg:
        _volume(folder / f"{folder.name}_seg.nii.gz", label=True)
    return folder


def test_brats_layout_selects_contrast_and_seg(tmp_path):
    _brats(tmp_path, 2)
    first = _brats(tmp_path, 0)
    _brats(tmp_path, 1, with_seg=False)
    cases = load_cases(tmp_path, contrast="t2")
    assert [c.id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    assert cases[0].image == first / "BraTS2021_00000_t2.nii.gz"
    assert cases[0].mask == first / "BraTS2021_00000_seg.nii.gz"
    assert cases[1].mask is None
    assert all(c.label == "lesion" and c.meta["layout"] == "brats" for c in cases)
    assert load_cases(tmp_path, contrast="FLAIR")[0].image.name == "BraTS2021_00000_flair.nii.gz"
    # A single case folder works as well.
    assert [c.id for c in load_cases(first, contrast="t1ce")] == ["BraTS2021_00000"]
    with pytest.raises(UserError, match="no 'pd' images"):
        load_cases(tmp_path, contrast="pd")


def test_brats_missing_contrast_is_an_error(tmp_path):
    folder = _brats(tmp_path, 3)
    (folder / "BraTS2021_00003_flair.nii.gz").unlink()
    with pytest.raises(UserError, match="no flair image"):
        load_cases(tmp_path, contrast="flair")


def test_brats_mask_is_seg_above_zero(tmp_path):
    folder = _brats(tmp_path, 4)
    seg = np.zeros((10, 10, 10), dtype=np.uint8)
    seg[2:4, 2:4, 2:4] = 4
    seg[5, 5, 5] = 1
    save_volume(folder / "BraTS2021_00004_seg.nii.gz", seg, AFFINE)
    case = load_cases(tmp_path)[0]
    mask = load_mask(case, load_volume(case.image))
    assert mask.dtype == bool and mask.sum() == 9


def test_ixi_layout_is_healthy_and_selects_contrast(tmp_path):
    _volume(tmp_path / "IXI002-Guys-0828-T1.nii.gz")
    _volume(tmp_path / "IXI002-Guys-0828-T2.nii.gz")
    _volume(tmp_path / "IXI012-HH-1211-T1.nii.gz")
    _volume(tmp_path / "T2" / "IXI013-HH-1212-T2.nii.gz")
    t1 = load_cases(tmp_path)
    assert [c.id for c in t1] == ["IXI002-Guys-0828", "IXI012-HH-1211"]
    assert all(c.label == "healthy" and c.mask is None and c.meta["layout"] == "ixi" for c in t1)
    t2 = load_cases(tmp_path, contrast="t2")
    assert [c.image.name for c in t2] == ["IXI002-Guys-0828-T2.nii.gz", "IXI013-HH-1212-T2.nii.gz"]
    with pytest.raises(UserError, match="no PD images"):
        load_cases(tmp_path, contrast="pd")


def _manifest(root: Path) -> Path:
    _volume(root / "train" / "h1.nii.gz")
    _volume(root / "test" / "l1.nrrd")
    _volume(root / "test" / "l1_mask.nrrd", label=True)
    cases = [
        {"id": "l1", "split": "test", "image": "test/l1.nrrd", "mask": "test/l1_mask.nrrd", "label": "lesion",
         "family": "glioma", "contrast": "t1"},
        {"id": "h1", "split": "train", "image": "train/h1.nii.gz", "mask": None, "label": "healthy",
         "family": "healthy", "contrast": "t1"},
    ]
    path = root / "cases.json"
    path.write_text(json.dumps({"format": "simpleslicenet-cases", "version": 1, "seed": 0, "cases": cases}))
    return path


def test_manifest_resolves_paths_and_filters_split(tmp_path):
    path = _manifest(tmp_path)
    cases = load_cases(tmp_path)
    assert [c.id for c in cases] == ["h1", "l1"]
    assert load_cases(path) == cases
    lesion = load_cases(tmp_path, split="test")
    assert len(lesion) == 1
    assert lesion[0].image == tmp_path / "test" / "l1.nrrd" and lesion[0].mask == tmp_path / "test" / "l1_mask.nrrd"
    assert lesion[0].meta["family"] == "glioma" and lesion[0].split == "test"
    with pytest.raises(UserError, match="no cases with split val"):
        load_cases(tmp_path, split="val")
    with pytest.raises(UserError, match="contrast t2"):
        load_cases(tmp_path, contrast="t2")


def test_manifest_errors(tmp_path):
    path = _manifest(tmp_path)
    (tmp_path / "train" / "h1.nii.gz").unlink()
    with pytest.raises(UserError, match="does not exist"):
        load_cases(path)
    path.write_text(json.dumps({"format": "something-else", "cases": []}))
    with pytest.raises(UserError, match="not a SimpleSliceNet case list"):
        load_cases(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="JSON"):
        load_cases(path)


def test_empty_or_missing_folder_says_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(UserError) as info:
        load_cases(tmp_path)
    message = str(info.value)
    assert "cases.json" in message and "BraTS" in message and "IXI" in message and ".nrrd" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="not found"):
        load_cases(tmp_path / "nope")
    with pytest.raises(UserError, match="unknown contrast"):
        load_cases(tmp_path, contrast="dwi")


def test_load_mask_checks_the_grid(tmp_path):
    _volume(tmp_path / "a.nii.gz")
    _volume(tmp_path / "a_mask.nii.gz", label=True, shape=(10, 10, 12))
    _volume(tmp_path / "b.nii.gz")
    shifted = AFFINE.copy()
    shifted[:3, 3] = [0.0, 0.5, 0.0]
    _volume(tmp_path / "b_mask.nii.gz", label=True, affine=shifted)
    _volume(tmp_path / "c.nii.gz")
    _volume(tmp_path / "c_mask.nrrd", label=True)
    _volume(tmp_path / "d.nii.gz")
    cases = {c.id: c for c in load_cases(tmp_path)}
    with pytest.raises(UserError, match="mask grid"):
        load_mask(cases["a"], load_volume(cases["a"].image))
    with pytest.raises(UserError, match="different positions"):
        load_mask(cases["b"], load_volume(cases["b"].image))
    mask = load_mask(cases["c"], load_volume(cases["c"].image))
    assert mask.dtype == bool and mask.shape == (10, 10, 10) and 0 < mask.sum() < 1000
    with pytest.raises(UserError, match="no mask"):
        load_mask(cases["d"], load_volume(cases["d"].image))


def test_text_list_of_volumes(tmp_path):
    a = _volume(tmp_path / "scans" / "a.nii.gz")
    b = _volume(tmp_path / "scans" / "b.nii.gz", seed=1)
    listing = tmp_path / "train.txt"
    listing.write_text(f"# healthy controls\nscans/{a.name}\n\n{b}\n")
    cases = load_cases(listing, assume_healthy=True)
    assert [c.id for c in cases] == ["a", "b"]
    assert all(c.label == "healthy" and c.image.is_file() for c in cases)
    listing.write_text("scans/a.nii.gz\nscans/missing.nii.gz\n")
    with pytest.raises(UserError, match=r"train\.txt, line 2: scans/missing\.nii\.gz"):
        load_cases(listing)


def _touch_brats(root: Path, case_id: str, tokens=("t1", "t1ce", "t2", "flair", "seg")) -> None:
    # Empty files: splits and file pairing never read the volumes.
    folder = root / case_id
    folder.mkdir(parents=True)
    for token in tokens:
        (folder / f"{case_id}_{token}.nii.gz").touch()


def test_brats_paper_split_first_251_by_id_are_val(tmp_path):
    rng = np.random.default_rng(0)
    # Real BraTS2021 ids have gaps; create the folders in a random order.
    ids = sorted(rng.choice(1700, size=253, replace=False))
    names = [f"BraTS2021_{i:05d}" for i in ids]
    for name in rng.permutation(names):
        _touch_brats(tmp_path, str(name), ("t1", "t2", "seg") if name == names[-1] else ("t1", "t1ce", "t2", "flair"))
    val = load_cases(tmp_path, split="val", contrast="flair")
    assert [c.id for c in val] == names[:251]
    assert all(c.split == "val" and c.image.name == f"{c.id}_flair.nii.gz" for c in val)
    # The last test case has no flair: asking for the test split says which case lacks it.
    with pytest.raises(UserError, match=rf"{names[-1]}: no flair image"):
        load_cases(tmp_path, split="test", contrast="flair")
    test = load_cases(tmp_path, split="test", contrast="t2")
    assert [c.id for c in test] == names[251:]
    everything = load_cases(tmp_path, split="all", contrast="t1")
    assert [c.split for c in everything] == ["val"] * 251 + ["test"] * 2
    assert load_cases(tmp_path, contrast="t1") == everything
    with pytest.raises(UserError, match="no train split"):
        load_cases(tmp_path, split="train")
    small = SplitRule(brats_val_cases=10)
    assert [c.id for c in load_cases(tmp_path, split="test", rule=small)] == names[10:]
    assert brats_splits(names[::-1], 2) == {name: "val" if name in names[:2] else "test" for name in names}


def test_brats_split_errors_and_single_case_folder(tmp_path):
    for number in (3, 1, 2):
        _touch_brats(tmp_path, f"BraTS2021_{number:05d}")
    with pytest.raises(UserError, match="no BraTS case in split test.*3 val, 0 test"):
        load_cases(tmp_path, split="test")
    assert [c.id for c in load_cases(tmp_path, split="test", rule=SplitRule(brats_val_cases=2))] == ["BraTS2021_00003"]
    # One case folder on its own is taken whatever the split: its place in the data set is unknown.
    single = load_cases(tmp_path / "BraTS2021_00002", split="test")
    assert [c.id for c in single] == ["BraTS2021_00002"] and single[0].split is None
    with pytest.raises(UserError, match="--brats-val-cases"):
        SplitRule(brats_val_cases=-1)


def test_ixi_seeded_holdout_is_stable_across_contrasts(tmp_path):
    subjects = [f"IXI{100 + i:03d}-Guys-{i:04d}" for i in range(60)]
    for subject in subjects:
        for contrast in ("T1", "T2"):
            (tmp_path / f"{subject}-{contrast}.nii.gz").touch()
    (tmp_path / f"{subjects[0]}-MRA.nii.gz").touch()  # other IXI modalities are ignored
    assert [c.split for c in load_cases(tmp_path)] == ["train"] * 60
    rule = SplitRule(holdout_fraction=0.25, seed=3)
    val = load_cases(tmp_path, split="val", rule=rule)
    train = load_cases(tmp_path, split="train", rule=rule)
    assert 5 <= len(val) <= 25 and len(val) + len(train) == 60
    assert {c.id for c in val}.isdisjoint(c.id for c in train)
    assert [c.id for c in load_cases(tmp_path, split="val", contrast="t2", rule=rule)] == [c.id for c in val]
    assert [c.id for c in load_cases(tmp_path, split="val", rule=SplitRule(holdout_fraction=0.25, seed=3))] == [
        c.id for c in val
    ]
    assert [c.id for c in load_cases(tmp_path, split="val", rule=SplitRule(holdout_fraction=0.25, seed=4))] != [
        c.id for c in val
    ]
    with pytest.raises(UserError, match="no test split"):
        load_cases(tmp_path, split="test")
    with pytest.raises(UserError, match="--holdout-fraction"):
        load_cases(tmp_path, split="val")
    with pytest.raises(UserError, match="IXI has no 'flair' images"):
        load_cases(tmp_path, contrast="flair")
    with pytest.raises(UserError, match="--holdout-fraction"):
        SplitRule(holdout_fraction=1.0)


def test_split_rule_and_contrast_options_on_the_command_line():
    from conftest import run_cli

    # train and evaluate share the option group (one CLI start is enough; it imports torch).
    done = run_cli("train", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "first --brats-val-cases (default 251, the paper's) are 'val'" in text
    assert "--contrast {t1,t1ce,t2,flair,pd}" in text and "--holdout-fraction" in text

"""`simpleslicenet detect --shard i/n`: n processes given the same inputs cover each exactly once, write into one
output folder at the same time without collisions, and together produce exactly what one unsharded call does."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import CLI, REPO, grid_affine, run_cli, write_nifti

from SimpleSliceNetLib.cli import parse_shard
from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.volume_io import load_volume

MODEL = REPO / "Resources" / "Models" / "simpleslicenet-t1-synth.json"


@pytest.fixture(scope="module")
def inputs(make_phantom, tmp_path_factory) -> list:
    """Four phantoms (one with a bright blob), a 2-D file, and a second file with an earlier input's stem."""
    root = tmp_path_factory.mktemp("shard_inputs")
    (root / "in").mkdir()
    (root / "more").mkdir()
    paths = []
    for name, shape, spacing, blobs in [
        ("c_plain", (64, 80, 56), (2.5, 2.5, 2.5), []),
        ("a_blob", (72, 88, 40), (2.2, 2.2, 3.5), [((20.0, 5.0, 15.0), 250.0)]),
        ("d_coarse", (48, 60, 44), (3.2, 3.2, 3.2), []),
        ("b_aniso", (80, 96, 30), (2.0, 2.0, 4.6), []),
    ]:
        affine = grid_affine(shape, spacing)
        paths.append(write_nifti(root / "in" / f"{name}.nii.gz", make_phantom(shape, affine, blobs), affine))
    paths.append(write_nifti(root / "in" / "e_flat.nii.gz", np.zeros((64, 64), np.float32)))  # 2-D: an error
    # Sorted, this lands in the other shard than in/a_blob, whose stem it repeats: refused by its shard too.
    paths.append(shutil.copy(paths[1], root / "more" / "a_blob.nii.gz"))
    return [str(p) for p in paths]


def _detect(inputs: list, out, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "--progress", "json", "detect", *inputs, "--output-dir", str(out), "--model",
                             str(MODEL), "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen) -> list[dict]:
    stdout, stderr = process.communicate(timeout=900)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert process.returncode == 1, stderr[-3000:]  # the 2-D file and the repeated stem fail
    return [json.loads(line) for line in stdout.splitlines()]


def test_two_shards_into_one_folder_equal_one_unsharded_run(inputs, tmp_path):
    whole = _detect(inputs, tmp_path / "whole")
    shards = [_detect(inputs, tmp_path / "sharded", "--shard", f"{i}/2") for i in (1, 2)]  # concurrently
    events = [_finish(p) for p in (whole, *shards)]
    whole_events, shard_events = events[0], events[1:]

    def done(kind: str, stream: list[dict]) -> list[str]:
        return [e["input"] for e in stream if e["event"] == kind]

    # Every input is handled by exactly one shard: the sorted list, every second one from 1 and from 2.
    ordered = sorted(inputs)
    for index, stream in enumerate(shard_events):
        assert stream[0] == {"event": "start", "task": "detect", "total": 3}
        assert sorted(done("output", stream) + done("error", stream)) == ordered[index::2]
    assert sorted(done("output", shard_events[0]) + done("output", shard_events[1])) == sorted(done("output",
                                                                                                  whole_events))
    assert sorted(done("error", shard_events[0]) + done("error", shard_events[1])) == sorted(done("error",
                                                                                                whole_events))
    assert len(done("output", whole_events)) == 4 and sorted(done("error", whole_events)) == inputs[4:]

    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "sharded").iterdir())  # no scratch folder left either
    assert len(files) == 4 * 5
    for name in files:
        if name.endswith(".nii.gz"):
            a, b = load_volume(tmp_path / "whole" / name), load_volume(tmp_path / "sharded" / name)
            np.testing.assert_array_equal(a.array, b.array)
            np.testing.assert_array_equal(a.affine, b.affine)


@pytest.mark.parametrize("value", ["0/4", "5/4", "x", "1/0", "2/4/1", "-1/2", "1/2.5", ""])
def test_shard_values_are_parsed_strictly(value):
    with pytest.raises(UserError, match="--shard"):
        parse_shard(value)
    assert parse_shard("2/4") == (2, 4) and parse_shard("1/1") == (1, 1)


@pytest.mark.parametrize("value", ["0/4", "5/4", "x"])
def test_bad_shard_values_are_one_line_errors(value, tmp_path, inputs):
    result = run_cli("detect", inputs[0], "--output-dir", str(tmp_path / "out"), f"--shard={value}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --shard")
    assert not (tmp_path / "out").exists()

"""Training under `torchrun` (PyTorch DDP, gloo on CPU): real processes.

Fast: the process-group helpers, and two ranks running the trainer's collective steps (pooled feature
statistics, equal step counts, broadcast decisions, DDP on a flow that starts different on each rank).
Slow: `torchrun -m SimpleSliceNetLib.cli train` with two ranks on generated phantoms, then `--resume`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import grid_affine, write_nifti
from safetensors.torch import load_file

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetTraining import distributed
from SimpleSliceNetTraining.distributed import Context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with two local CPU processes (threads limited: 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --- helpers, one process ------------------------------------------------------------------------


def test_context_from_torchrun_environment():
    assert distributed.from_env({}) == Context(0, 1, 0) and not distributed.is_distributed({})
    context = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert context == Context(3, 4, 1) and context.active and not context.is_writer
    assert distributed.is_distributed({"RANK": "0", "WORLD_SIZE": "2"})
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(UserError, match="torchrun"):
            distributed.from_env(bad)


def test_shards_cover_every_item_exactly_once():
    items = list(range(11))
    shards = [Context(rank, 4).shard(items) for rank in range(4)]
    assert shards == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7]]
    assert Context().shard(items) == items


def test_one_process_collectives_are_identities():
    context = Context()
    tensor = torch.tensor([1.0, 2.0])
    assert context.all_reduce(tensor, "max") is tensor and tensor.tolist() == [1.0, 2.0]
    assert context.broadcast({"a": 1}) == {"a": 1}
    context.barrier()
    assert distributed.init(context, "cpu") == ""
    distributed.cleanup(context)


# --- two ranks: the trainer's collective steps ---------------------------------------------------

WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel
    from SimpleSliceNetLib.flow import FlowConfig, build_flow, log_likelihood
    from SimpleSliceNetTraining import distributed
    from SimpleSliceNetTraining.train import VolumeItem, _feature_statistics, _sub_batches

    context = distributed.from_env()
    backend = distributed.init(context, "cpu")
    g = torch.Generator().manual_seed(0)
    items = [VolumeItem(f"v{i}", torch.randn(3, 4, 1 + 3 * i, 5, generator=g) * (1 + i) + i) for i in range(5)]
    mine = context.shard(items)

    class Net:
        dim = 5
        feature_mean, feature_std = torch.zeros(5), torch.ones(5)

    net = Net()
    _feature_statistics(net, mine, context)
    groups = _sub_batches(mine, 7, np.random.default_rng(context.rank), context)
    steps = sum(len(group) for group in groups)
    own = sum(len(group) for group in groups[: len(mine)])
    stop = context.broadcast(context.rank == 0)  # rank 0 decides
    np.random.seed(100 + context.rank)  # FrEIA draws its permutations with numpy: different on each rank
    torch.manual_seed(100 + context.rank)
    flow = build_flow(5, FlowConfig(blocks=2, pos_dim=4))
    ddp = DistributedDataParallel(flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(steps):  # different data on each rank; DDP averages the gradients
        loss = -log_likelihood(ddp, torch.randn(32, 5), torch.randn(32, 4)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file({k: v.detach().contiguous() for k, v in flow.state_dict().items()}, f"flow{context.rank}.safetensors")
    with open(f"rank{context.rank}.json", "w") as handle:
        json.dump({"backend": backend, "ids": [item.id for item in mine], "mean": net.feature_mean.tolist(),
                   "std": net.feature_std.tolist(), "steps": steps, "own": own, "stop": stop}, handle)
    distributed.cleanup(context)
''')


def test_two_ranks_pool_statistics_take_equal_steps_and_end_with_identical_flows(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    result = _torchrun("worker.py", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert ranks[0]["ids"] == ["v0", "v2", "v4"] and ranks[1]["ids"] == ["v1", "v3"]
    g = torch.Generator().manual_seed(0)
    everything = torch.cat([(torch.randn(3, 4, 1 + 3 * i, 5, generator=g) * (1 + i) + i).reshape(-1, 5)
                            for i in range(5)])
    for rank in ranks:  # both standardise with the statistics of all volumes
        np.testing.assert_allclose(rank["mean"], everything.mean(0).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rank["std"], everything.std(0).numpy(), rtol=1e-5, atol=1e-6)
    assert ranks[0]["steps"] == ranks[1]["steps"] == max(r["own"] for r in ranks) > min(r["own"] for r in ranks)
    assert [r["stop"] for r in ranks] == [True, True]
    flows = [load_file(str(tmp_path / f"flow{r}.safetensors")) for r in (0, 1)]
    assert flows[0].keys() == flows[1].keys()
    for key in flows[0]:
        assert torch.equal(flows[0][key], flows[1][key]), key
    # Training moved the flow away from rank 0's start (so equality is not just the initial broadcast).
    np.random.seed(100)
    torch.manual_seed(100)
    from SimpleSliceNetLib.flow import FlowConfig, build_flow

    start = build_flow(5, FlowConfig(blocks=2, pos_dim=4)).state_dict()
    moved = [k for k in flows[0] if not torch.equal(flows[0][k], start[k])]
    assert moved and all("w_perm" not in k for k in moved)
    assert all(torch.equal(flows[0][k], start[k]) for k in flows[0] if "w_perm" in k)  # rank 0's permutations


# --- two ranks: `simpleslicenet train` under torchrun (slow) ------------------------------------


def _phantom_set(root: Path, make_phantom) -> Path:
    """Five healthy phantoms (varied texture blobs, two grids), a healthy and a lesion validation volume."""
    rng = np.random.default_rng(7)
    entries = []
    (root / "data").mkdir()

    def add(case_id: str, split: str, blobs: list, lesion: tuple | None = None) -> None:
        shape, spacing = ((56, 68, 48), (2.8, 2.8, 2.8)) if len(entries) % 2 else ((64, 80, 40), (2.4, 2.4, 3.4))
        affine = grid_affine(shape, spacing)
        image = make_phantom(shape, affine, blobs + ([lesion] if lesion else []))
        write_nifti(root / "data" / f"{case_id}.nii.gz", image, affine)
        entry = {"id": case_id, "split": split, "image": f"data/{case_id}.nii.gz", "mask": None, "label": "healthy"}
        if lesion:
            from conftest import world_coordinates

            distance = np.linalg.norm(world_coordinates(shape, affine) - np.asarray(lesion[0]), axis=-1)
            write_nifti(root / "data" / f"{case_id}_mask.nii.gz", (distance < 8.0).astype(np.uint8), affine)
            entry.update(mask=f"data/{case_id}_mask.nii.gz", label="lesion")
        entries.append(entry)

    def texture() -> list:
        return [(tuple(rng.uniform(-30, 30, 3)), float(rng.uniform(-40, 40))) for _ in range(3)]

    for index in range(5):
        add(f"healthy_{index}", "train", texture())
    add("val_healthy", "val", texture())
    add("val_lesion", "val", texture(), ((15.0, -10.0, 20.0), 300.0))
    manifest = root / "cases.json"
    manifest.write_text(json.dumps({"format": "simpleslicenet-cases", "version": 1, "cases": entries}))
    return manifest


def _train(manifest: Path, out: Path, epochs: int, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    result = _torchrun("-m", "SimpleSliceNetLib.cli", "--progress", "json", "train", "--train", str(manifest),
                       "--val", str(manifest), "--name", "ddp", "--output-dir", str(out / "model"), "--shape",
                       "64,64,24", "--spacing", "3,3,6", "--blocks", "2", "--epochs", str(epochs), "--device", "cpu",
                       "--debug-dump-dir", str(out / f"dump{epochs}"), *extra, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return result, [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _assert_ranks_hold_the_model_weights(out: Path, epochs: int) -> None:
    ranks = [load_file(str(out / f"dump{epochs}" / f"rank{r}.safetensors")) for r in (0, 1)]
    model = load_file(str(out / "model" / "ddp.safetensors"))
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], model[f"flow.{key}"]), key


@pytest.mark.slow
def test_torchrun_training_two_ranks_one_writer_and_resume(tmp_path, make_phantom):
    from SimpleSliceNetLib.detector import Detector

    manifest = _phantom_set(tmp_path, make_phantom)
    result, events = _train(manifest, tmp_path, 1)
    # Only rank 0 reports and writes: one output event, one "model written" line.
    assert [e["event"] for e in events].count("output") == 1 and events[-1]["event"] == "done"
    assert result.stderr.count("model written:") == 1
    assert any("2 processes (gloo)" in e.get("message", "") for e in events)
    files = sorted(p.name for p in (tmp_path / "model").iterdir() if not p.name.endswith(".tb"))
    assert files == sorted(f"ddp{s}" for s in (".json", ".safetensors", ".checkpoint.json", ".checkpoint.safetensors",
                                               ".history.csv", ".curves.png"))
    meta = json.loads((tmp_path / "model" / "ddp.json").read_text())
    assert meta["training"]["ranks"] == 2 and meta["training"]["train_volumes"] == 5
    assert meta["training"]["val_volumes"] == 2 and meta["training"]["epochs_run"] == 1
    metrics = [e for e in events if e["event"] == "metric"]
    # Rank 0 has 3 volumes, rank 1 has 2; both take rank 0's number of steps (one sub-batch per volume here).
    assert [(m["epoch"], m["step"]) for m in metrics] == [(1, 3)] and 0 <= metrics[0]["val_auroc"] <= 1
    _assert_ranks_hold_the_model_weights(tmp_path, 1)
    Detector.load(str(tmp_path / "model" / "ddp.json"), "cpu")

    result, events = _train(manifest, tmp_path, 2, "--resume")
    assert any("resuming after epoch 0" in e.get("message", "") for e in events)
    assert [(e["epoch"], e["step"]) for e in events if e["event"] == "metric"] == [(2, 6)]
    history = (tmp_path / "model" / "ddp.history.csv").read_text().splitlines()
    assert len(history) == 3 and history[0].startswith("epoch,step,elapsed_s")
    assert json.loads((tmp_path / "model" / "ddp.checkpoint.json").read_text())["epoch"] == 1
    _assert_ranks_hold_the_model_weights(tmp_path, 2)
    Detector.load(str(tmp_path / "model" / "ddp.json"), "cpu")

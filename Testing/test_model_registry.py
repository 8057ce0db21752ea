"""The download path of the model registry, exercised against local files through file:// URLs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.model_file import write_model_file
from SimpleSliceNetLib.model_registry import download_model, read_registry


def _published(tmp_path):
    """A small (not runnable) model file pair, published in a folder with a registry listing it."""
    shelf = tmp_path / "shelf"
    path = write_model_file(shelf / "tiny.json", state_dict={"w": torch.arange(6.0)}, method="simpleslicenet",
                            config={"note": "registry test"})
    files = []
    for f in (path.with_suffix(".safetensors"), path):
        files.append({"name": f.name, "url": f.as_uri(), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
    registry = tmp_path / "registry.json"
    entry = {"id": "tiny", "version": "1.0.0", "method": "simpleslicenet", "modality": "T1", "description": "",
             "files": files}
    registry.write_text(json.dumps({"models": [entry]}))
    return registry, entry


def test_download_verifies_and_installs(tmp_path):
    registry, _ = _published(tmp_path)
    target = tmp_path / "home"
    path = download_model("tiny", registry, target)
    assert path == target / "tiny.json"
    assert (target / "tiny.safetensors").exists()
    assert [e.id for e in read_registry(registry)] == ["tiny"]


def test_download_refuses_a_changed_file(tmp_path):
    registry, entry = _published(tmp_path)
    entry["files"][0]["sha256"] = "0" * 64
    registry.write_text(json.dumps({"models": [entry]}))
    target = tmp_path / "home"
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        download_model("tiny", registry, target)
    assert not any(target.iterdir())  # nothing half-written is left


def test_unknown_id_and_cli(tmp_path):
    registry, _ = _published(tmp_path)
    with pytest.raises(UserError, match="not in the registry"):
        download_model("other", registry, tmp_path / "home")
    env_home = tmp_path / "ssn_home"
    done = subprocess.run([sys.executable, "-m", "SimpleSliceNetLib.cli", "models", "--download", "tiny",
                           "--registry", str(registry), "--json"], capture_output=True, text=True,
                          env={"SIMPLESLICENET_HOME": str(env_home), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["downloaded"] == str(env_home / "models" / "tiny.json")


def test_bundled_registry_matches_the_bundled_model_files():
    from SimpleSliceNetLib.resources import bundled_models_dir

    entries = read_registry()
    assert entries, "the bundled registry lists no model"
    for entry in entries:
        for item in entry.files:
            local = bundled_models_dir() / item["name"]
            if local.exists():  # a registry may also list models that are not bundled
                assert hashlib.sha256(local.read_bytes()).hexdigest() == item["sha256"], item["name"]

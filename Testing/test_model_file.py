"""Model files: safetensors + JSON round trip, validation (checksum, format version, method, files),
listing, resolving and importing with the user folder in a temporary home."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_EPOCHS

from SimpleSliceNetLib.encoder import sha256_file
from SimpleSliceNetLib.errors import ModelFileError, UserError
from SimpleSliceNetLib.model_file import (
    FORMAT,
    FORMAT_VERSION,
    import_model,
    list_models,
    read_model_file,
    resolve_model,
    write_model_file,
)

CONFIG = {"preprocess": {"shape": [64, 64, 48]}, "scoring": {"threshold": 1.25}, "group": 3}


@pytest.fixture(autouse=True)
def isolated_folders(tmp_path, monkeypatch):
    """User models under tmp_path/home, bundled models under tmp_path/resources/Models."""
    monkeypatch.setenv("SIMPLESLICENET_HOME", str(tmp_path / "home"))
    (tmp_path / "resources" / "Models").mkdir(parents=True)
    monkeypatch.setenv("SIMPLESLICENET_RESOURCES", str(tmp_path / "resources"))


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"flow.weight": torch.randn(8, 4, generator=g), "feature_mean": torch.randn(4, generator=g),
            "encoder.step": torch.arange(5)}


def _write(path: Path, **kwargs) -> Path:
    options = {"state_dict": _state(), "method": "simpleslicenet", "config": CONFIG}
    options.update(kwargs)
    return write_model_file(path, **options)


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_round_trip(tmp_path):
    path = _write(tmp_path / "out" / "brain-t1", version="2.1.0", name="Brain T1", description="demo",
                  training={"train_volumes": 3})
    assert path == tmp_path / "out" / "brain-t1.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["brain-t1.json", "brain-t1.safetensors"]
    meta = json.loads(path.read_text())
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert meta["weights"] == {"file": "brain-t1.safetensors", "sha256": sha256_file(path.with_suffix(".safetensors"))}
    model = read_model_file(path)
    assert (model.id, model.name, model.version, model.method, model.modality) == (
        "brain-t1", "Brain T1", "2.1.0", "simpleslicenet", "T1")
    assert model.config == CONFIG and model.threshold == 1.25
    assert model.training == {"train_volumes": 3} and model.description == "demo"
    weights = model.load_weights()
    assert weights.keys() == _state().keys()
    for key, value in _state().items():
        assert torch.equal(weights[key], value)
    summary = model.summary()
    assert summary["id"] == "brain-t1" and summary["path"] == str(path) and summary["threshold"] == 1.25
    json.dumps(summary)


def test_sha256_of_a_known_content(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_changed_weights_fail_the_checksum(tmp_path):
    path = _write(tmp_path / "m.json")
    weights = path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError) as exc:
        read_model_file(path)
    message = str(exc.value)
    assert str(weights) in message and "SHA-256" in message and "\n" not in message
    assert read_model_file(path, verify=False).id == "m"  # listing skips the checksum


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_unsupported_format_version(tmp_path, version):
    path = _write(tmp_path / "m.json")
    _edit_json(path, format_version=version)
    with pytest.raises(ModelFileError) as exc:
        read_model_file(path)
    assert str(path) in str(exc.value) and "format version" in str(exc.value)


def test_missing_weights_file(tmp_path):
    path = _write(tmp_path / "m.json")
    path.with_suffix(".safetensors").unlink()
    with pytest.raises(ModelFileError) as exc:
        read_model_file(path)
    assert str(path) in str(exc.value) and "m.safetensors" in str(exc.value) and "missing" in str(exc.value)


def test_unknown_method(tmp_path):
    path = _write(tmp_path / "m.json")
    _edit_json(path, method="patchcore")
    with pytest.raises(ModelFileError, match="unknown method 'patchcore'"):
        read_model_file(path)


@pytest.mark.parametrize("problem", ["not json", "other format", "lacks id", "weights not a dict"])
def test_malformed_descriptions(tmp_path, problem):
    path = _write(tmp_path / "m.json")
    meta = json.loads(path.read_text())
    if problem == "not json":
        path.write_text("{ not json")
    else:
        if problem == "other format":
            meta["format"] = "something-else"
        elif problem == "lacks id":
            del meta["id"]
        else:
            meta["weights"] = "m.safetensors"
        path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError) as exc:
        read_model_file(path)
    assert str(path) in str(exc.value)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        read_model_file(tmp_path / "nothing.json")


def test_damaged_weights_with_matching_checksum_are_reported(tmp_path):
    path = _write(tmp_path / "m.json")
    weights = path.with_suffix(".safetensors")
    weights.write_bytes(b"not a safetensors file")
    _edit_json(path, weights={"file": weights.name, "sha256": sha256_file(weights)})
    model = read_model_file(path)
    with pytest.raises(ModelFileError) as exc:
        model.load_weights()
    assert str(weights) in str(exc.value)


def test_folder_with_one_model_resolves_and_with_two_is_ambiguous(tmp_path):
    _write(tmp_path / "one" / "a.json")
    assert read_model_file(tmp_path / "one").id == "a"
    _write(tmp_path / "two" / "a.json")
    _write(tmp_path / "two" / "b.json")
    with pytest.raises(ModelFileError, match="exactly one"):
        read_model_file(tmp_path / "two")


def test_list_resolve_and_import(tmp_path):
    bundled = tmp_path / "resources" / "Models"
    user = tmp_path / "home" / "models"
    _write(bundled / "shared.json", version="1.0.0")
    _write(bundled / "bundled-only.json")
    (bundled / "registry.json").write_text(json.dumps({"models": []}))  # not a model: skipped
    assert [(m.id, m.source) for m in list_models()] == [("bundled-only", "bundled"), ("shared", "bundled")]

    # Import validates, then copies both files into the user folder.
    elsewhere = _write(tmp_path / "downloads" / "shared.json", version="2.0.0")
    imported = import_model(elsewhere)
    assert imported == user / "shared.json"
    assert sorted(p.name for p in user.iterdir()) == ["shared.json", "shared.safetensors"]
    assert read_model_file(imported).version == "2.0.0"

    listed = [(m.id, m.source, m.version) for m in list_models()]
    assert listed == [("bundled-only", "bundled", "1.0.0"), ("shared", "bundled", "1.0.0"), ("shared", "user", "2.0.0")]
    # User models shadow bundled ones of the same id.
    resolved = resolve_model("shared")
    assert (resolved.version, resolved.source) == ("2.0.0", "user")
    assert resolve_model("bundled-only").source == "bundled"
    assert resolve_model(str(bundled / "shared.json")).version == "1.0.0"  # by path
    with pytest.raises(UserError) as exc:
        resolve_model("no-such-model")
    assert "no-such-model" in str(exc.value) and "bundled-only" in str(exc.value) and "shared" in str(exc.value)


def test_damaged_model_is_not_imported(tmp_path):
    path = _write(tmp_path / "downloads" / "bad.json")
    path.with_suffix(".safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelFileError):
        import_model(path)
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


def test_damaged_model_is_left_out_of_the_list(tmp_path):
    bundled = tmp_path / "resources" / "Models"
    _write(bundled / "good.json")
    broken = _write(bundled / "broken.json")
    _edit_json(broken, format_version=99)
    assert [m.id for m in list_models()] == ["good"]


def test_default_model_id_is_looked_up_when_none_is_given(tmp_path):
    from SimpleSliceNetLib.resources import DEFAULT_MODEL_ID

    with pytest.raises(UserError, match=DEFAULT_MODEL_ID):
        resolve_model(None)
    _write(tmp_path / "resources" / "Models" / f"{DEFAULT_MODEL_ID}.json")
    assert resolve_model(None).id == DEFAULT_MODEL_ID


# --- a real trained model: the network is rebuilt strictly from the description ---------------


def _copy_model(tiny_model, target: Path) -> Path:
    target.mkdir(parents=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(tiny_model.json.with_suffix(suffix), target)
    return target / tiny_model.json.name


def test_trained_model_loads_and_describes_itself(tiny_model):
    from SimpleSliceNetLib.detector import Detector

    detector = Detector.load(str(tiny_model.json), "cpu")
    assert detector.info["id"] == "tiny" and detector.info["method"] == "simpleslicenet"
    meta = json.loads(tiny_model.json.read_text())
    assert detector.threshold == meta["config"]["scoring"]["threshold"]
    assert list(detector.net.config.preprocess.shape) == [128, 128, 48]
    assert meta["training"]["train_volumes"] == 5 and meta["training"]["epochs_run"] == TINY_EPOCHS
    assert not detector.net.training  # inference mode: dropout/batch norm frozen


def test_configuration_that_does_not_match_the_weights(tiny_model, tmp_path):
    from SimpleSliceNetLib.detector import build_model

    path = _copy_model(tiny_model, tmp_path / "copy")
    meta = json.loads(path.read_text())
    meta["config"]["flow"]["blocks"] = 3  # the weights hold 2 blocks
    path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="do not match"):
        build_model(read_model_file(path))


def test_model_written_with_untapped_backbone_stages_loads_the_same_network(tiny_model, tmp_path):
    """Files written before the encoder dropped the stages after its last tap (the bundled default model
    until 2026-12-07) hold their weights: they are skipped, and only they; anything else unexpected is
    still refused."""
    import timm
    from safetensors.torch import load_file

    from SimpleSliceNetLib.detector import build_model

    reference = build_model(read_model_file(tiny_model.json))
    state = load_file(str(tiny_model.json.with_suffix(".safetensors")))
    meta = json.loads(tiny_model.json.read_text())
    full = timm.create_model(meta["config"]["encoder"]["backbone"], features_only=True,
                             out_indices=meta["config"]["encoder"]["taps"])
    kept = len(reference.encoder.backbone.blocks)
    untapped = {f"encoder.backbone.{key}": value for key, value in full.state_dict().items()
                if key.startswith("blocks.") and int(key.split(".")[1]) >= kept}
    assert untapped and len(full.blocks) > kept
    old_layout = _write(tmp_path / "old" / "tiny.json", state_dict={**state, **untapped}, config=meta["config"])
    loaded = build_model(read_model_file(old_layout))
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    stray = _write(tmp_path / "stray" / "tiny.json", config=meta["config"],
                   state_dict={**state, "encoder.backbone.conv_extra.weight": torch.zeros(3)})
    with pytest.raises(ModelFileError, match="do not match"):
        build_model(read_model_file(stray))


def test_configuration_of_another_method_is_refused(tiny_model, tmp_path):
    from SimpleSliceNetLib.detector import build_model

    path = _copy_model(tiny_model, tmp_path / "copy")
    _edit_json(path, method="u2ad")  # a SimpleSliceNet configuration labelled as U2AD
    with pytest.raises(ModelFileError, match="invalid configuration"):
        build_model(read_model_file(path))

"""Model files: safetensors weights + a JSON description with format version and SHA-256.

A model is ``NAME.json`` beside ``NAME.safetensors``. The JSON says which method and
configuration the weights belong to; nothing in a model file is ever executed or unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .encoder import sha256_file
from .errors import ModelFileError, UserError
from .resources import DEFAULT_MODEL_ID, bundled_models_dir, user_models_dir
from .volume_io import atomic_path

FORMAT = "simpleslicenet-model"
FORMAT_VERSION = 1
METHODS = ("simpleslicenet", "u2ad")
REQUIRED = ("format", "format_version", "id", "version", "method", "modality", "weights", "config")


@dataclass
class ModelFile:
    """A validated model description; ``weights_path`` has been checked against its SHA-256."""

    path: Path
    id: str
    version: str
    method: str
    modality: str
    config: dict
    weights_path: Path
    sha256: str
    name: str = ""
    description: str = ""
    training: dict = field(default_factory=dict)
    source: str = "file"

    @property
    def threshold(self) -> float | None:
        return self.config.get("scoring", {}).get("threshold")

    def summary(self) -> dict:
        return {
            "id": self.id,
            "name": self.name or self.id,
            "version": self.version,
            "method": self.method,
            "modality": self.modality,
            "path": str(self.path),
            "threshold": self.threshold,
            "source": self.source,
            "description": self.description,
            "training": self.training,
        }

    def load_weights(self) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(
                f"{self.weights_path}: cannot read the weights ({exc}); download or copy the model again"
            ) from exc


def read_model_file(path: str | Path, source: str = "file", verify: bool = True) -> ModelFile:
    """Read and validate a model's JSON (and, with ``verify``, its weights' checksum)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            raise ModelFileError(f"{path}: expected exactly one model .json in the folder, found {len(found)}")
        path = found[0]
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable model JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a SimpleSliceNet model file (format should be '{FORMAT}')")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ModelFileError(f"{path}: model file lacks {', '.join(missing)}; it is incomplete or damaged")
    version = meta["format_version"]
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version!r} is not supported by this SimpleSliceNet "
            f"(supports 1..{FORMAT_VERSION}); update SimpleSliceNet or re-export the model"
        )
    if meta["method"] not in METHODS:
        raise ModelFileError(f"{path}: unknown method {meta['method']!r} (known: {', '.join(METHODS)})")
    weights = meta["weights"]
    if not isinstance(weights, dict) or "file" not in weights or "sha256" not in weights:
        raise ModelFileError(f"{path}: 'weights' must give the file name and its sha256")
    weights_path = path.parent / Path(weights["file"]).name
    if not weights_path.exists():
        raise ModelFileError(f"{path}: weights file {weights_path.name} is missing beside it")
    if verify:
        actual = sha256_file(weights_path)
        if actual != weights["sha256"]:
            raise ModelFileError(
                f"{weights_path}: SHA-256 mismatch (expected {weights['sha256'][:12]}..., got {actual[:12]}...); "
                "the file is damaged or was changed: download or copy it again"
            )
    return ModelFile(
        path=path,
        id=str(meta["id"]),
        version=str(meta["version"]),
        method=meta["method"],
        modality=str(meta["modality"]),
        config=meta["config"],
        weights_path=weights_path,
        sha256=weights["sha256"],
        name=str(meta.get("name", "")),
        description=str(meta.get("description", "")),
        training=meta.get("training", {}),
        source=source,
    )


def write_model_file(
    path: str | Path,
    *,
    state_dict: dict,
    method: str,
    config: dict,
    version: str = "1.0.0",
    modality: str = "T1",
    name: str = "",
    description: str = "",
    training: dict | None = None,
) -> Path:
    """Write ``NAME.safetensors`` then ``NAME.json`` atomically; returns the JSON path."""
    import torch
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    weights_path = path.with_suffix(".safetensors")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    with atomic_path(weights_path) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": path.stem,
        "name": name or path.stem,
        "version": version,
        "method": method,
        "modality": modality,
        "description": description,
        "weights": {"file": weights_path.name, "sha256": sha256_file(weights_path)},
        "config": config,
        "training": training or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"simpleslicenet": __version__, "torch": torch.__version__},
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def list_models() -> list[ModelFile]:
    """Bundled and user models (checksums not verified here: listing must be quick)."""
    found = []
    for folder, source in ((bundled_models_dir(), "bundled"), (user_models_dir(), "user")):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                found.append(read_model_file(path, source=source, verify=False))
            except ModelFileError:
                continue  # not a model (e.g. the registry) or damaged: `models` reports only usable ones
    return found


def resolve_model(ref: str | Path | None = None) -> ModelFile:
    """A model by file path, folder, or id (user models shadow bundled ones); None = the default."""
    ref = DEFAULT_MODEL_ID if ref is None else ref
    candidate = Path(ref)
    if candidate.suffix == ".json" or candidate.is_dir() or candidate.exists():
        return read_model_file(candidate)
    for folder, source in ((user_models_dir(), "user"), (bundled_models_dir(), "bundled")):
        path = folder / f"{ref}.json"
        if path.exists():
            return read_model_file(path, source=source)
    names = ", ".join(m.id for m in list_models()) or "none"
    raise UserError(f"model {str(ref)!r} not found; available: {names} (or give a path to a model .json)")


def import_model(path: str | Path) -> Path:
    """Validate a model and copy its two files into the user model folder; returns the new JSON path."""
    model = read_model_file(path)
    target = user_models_dir()
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / model.weights_path.name) as tmp:
        shutil.copyfile(model.weights_path, tmp)
    with atomic_path(target / model.path.name) as tmp:
        shutil.copyfile(model.path, tmp)
    return target / model.path.name

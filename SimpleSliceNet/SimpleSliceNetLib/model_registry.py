"""The model registry: models that can be downloaded on request, each file checksummed.

Nothing is downloaded unless the user asks (`simpleslicenet models --download ID`, or the Slicer
panel after consent). A registry is a JSON list; URLs may be ``https://`` or ``file://`` (tests,
mirrors).
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .model_file import read_model_file
from .resources import resources_dir, user_models_dir
from .volume_io import atomic_path


@dataclass
class RegistryEntry:
    id: str
    version: str
    method: str
    modality: str
    description: str
    files: list[dict]  # each {"name", "url", "sha256"}; one of them is the model's .json


def registry_path() -> Path:
    return resources_dir() / "registry.json"


def read_registry(path: str | Path | None = None) -> list[RegistryEntry]:
    path = Path(path) if path else registry_path()
    try:
        data = json.loads(path.read_text())
        return [RegistryEntry(**{k: e[k] for k in RegistryEntry.__dataclass_fields__}) for e in data["models"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable model registry ({exc})") from exc


def download_model(model_id: str, registry: str | Path | None = None, target: Path | None = None) -> Path:
    """Fetch every file of ``model_id``, verify each SHA-256, then validate the model; returns its JSON."""
    entries = {e.id: e for e in read_registry(registry)}
    if model_id not in entries:
        raise UserError(f"model {model_id!r} is not in the registry; known: {', '.join(sorted(entries)) or 'none'}")
    entry = entries[model_id]
    target = target or user_models_dir()
    target.mkdir(parents=True, exist_ok=True)
    model_json = None
    for item in entry.files:
        name = Path(item["name"]).name
        with atomic_path(target / name) as tmp:
            digest = hashlib.sha256()
            try:
                with urllib.request.urlopen(item["url"], timeout=60) as response, open(tmp, "wb") as out:
                    for block in iter(lambda r=response: r.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            except OSError as exc:
                raise UserError(f"cannot download {item['url']}: {exc}; check the connection or the URL") from exc
            if digest.hexdigest() != item["sha256"]:
                raise UserError(f"{item['url']}: SHA-256 mismatch; the download is damaged or was changed")
        if name.endswith(".json"):
            model_json = target / name
    if model_json is None:
        raise UserError(f"registry entry {model_id!r} lists no model .json")
    read_model_file(model_json)
    return model_json

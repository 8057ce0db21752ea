"""Where the bundled resources (default models, sample case, model registry) and user models live."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_ID = "simpleslicenet-t1-synth"


def resources_dir() -> Path:
    """``Resources/`` of the source tree, or of the installed Slicer module beside this package."""
    override = os.environ.get("SIMPLESLICENET_RESOURCES")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
    candidates += [here.parents[1] / "Resources", here.parent / "Resources"]
    for candidate in candidates:
        if (candidate / "Models").is_dir():
            return candidate
    return candidates[0]


def bundled_models_dir() -> Path:
    return resources_dir() / "Models"


def user_home() -> Path:
    return Path(os.environ.get("SIMPLESLICENET_HOME", Path.home() / ".simpleslicenet"))


def user_models_dir() -> Path:
    return user_home() / "models"


def sample_volume() -> Path:
    return resources_dir() / "Samples" / "sample_t1_lesion.nii.gz"

"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us (file, option, model), with advice on what to do."""


class VolumeError(UserError):
    """An input volume that cannot be read or used."""


class ModelFileError(UserError):
    """A model file that is missing, corrupt, of an unknown version or fails its checksum."""

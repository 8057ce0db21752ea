"""Choosing the compute device: CUDA, then Apple MPS, then CPU, with a clear fallback message."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .scoring import precision_error

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class DeviceChoice:
    name: str  # "cpu", "cuda" or "mps"
    note: str  # why this device, e.g. the fallback reason ("" when it is what was asked)


def choose_device(requested: str = "auto") -> DeviceChoice:
    """Resolve ``auto``/``cpu``/``cuda``/``mps`` to a device that exists here.

    An explicit request for an absent accelerator falls back to the CPU with a note rather than
    failing: a model that runs slower is more useful than an error in a batch job.
    """
    import torch

    if requested not in DEVICE_CHOICES:
        raise UserError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        if cuda:
            return DeviceChoice("cuda", "")
        if mps:
            return DeviceChoice("mps", "")
        return DeviceChoice("cpu", "no CUDA or MPS device found; using the CPU")
    if requested == "cuda" and not cuda:
        return DeviceChoice("cpu", "CUDA was requested but is not available; falling back to the CPU")
    if requested == "mps" and not mps:
        return DeviceChoice("cpu", "MPS was requested but is not available; falling back to the CPU")
    return DeviceChoice(requested, "")


def autocast_dtype(device: str):
    """The fastest reduced precision of an encoder on ``device`` (CUDA), else None (fp32).

    Only the benchmark's paper-engine timing uses it: detection computes features in the precision the
    model was calibrated in (``encoder_autocast``), since bf16 features move the default model's
    heatmap by up to 2.6 (its threshold is 1.95) and a finding must not depend on the device. On the
    CPU fp32 is also the faster: on a Xeon with AMX the frozen fp32 encoder took 0.24 s a volume
    against 0.28 s in bf16 autocast; emulated bf16 (most CPUs) is slower still.
    """
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def encoder_autocast(precision: str):
    """The encoder's autocast dtype (None = fp32) for a model's ``scoring.encoder_precision``."""
    import torch

    error = precision_error(precision)
    if error:
        raise ValueError(error)
    return torch.bfloat16 if precision == "bf16" else None

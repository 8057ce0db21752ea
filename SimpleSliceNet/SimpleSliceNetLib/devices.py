"""Choosing the compute device: CUDA, then Apple MPS, then CPU, with a clear fallback message."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

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
    """Reduced precision for the frozen encoder where the hardware does it natively, else None."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu":
        # bf16 on CPUs without native support is emulated and slower than fp32.
        supported = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if (supported or amx) else None
    return None

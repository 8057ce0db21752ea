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
    """Reduced precision for the frozen encoder where it helps (CUDA), else None (fp32)."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # The CPU runs fp32, even with native bf16: on a Xeon with AMX, SimpleSliceNet's frozen fp32 encoder
    # (prepare_for_inference) took 0.24 s a volume against 0.28 s in bf16 autocast, U2AD ran as fast in
    # both, and bf16 moved the default model's heatmap by up to 1.4 (its threshold is 1.6), so a
    # heatmap would depend on which CPU computed it. Emulated bf16 (most CPUs) is slower still. MPS: fp32.
    return None


# Encoder precisions training can ask for: auto = the detection's on the device (autocast_dtype).
ENCODER_PRECISIONS = ("auto", "fp32", "bf16")


def encoder_autocast(precision: str, device: str):
    """The encoder's autocast dtype (None = fp32) for an ``ENCODER_PRECISIONS`` value on ``device``."""
    import torch

    if precision not in ENCODER_PRECISIONS:
        raise ValueError(f"encoder precision must be one of {', '.join(ENCODER_PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return autocast_dtype(device)
    return torch.bfloat16 if precision == "bf16" else None

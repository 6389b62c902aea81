"""Device names ("auto", "cpu", "cuda", "cuda:1", ...) -> torch devices, with a fix named when CUDA is missing."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when present else CPU; a CUDA request without CUDA is a ValueError naming the fix."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} requested but CUDA is not available; use device='cpu'")
    return dev

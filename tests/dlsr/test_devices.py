"""Device names -> torch devices."""

from __future__ import annotations

import pytest
import torch

from dlsr.detector import DLSRDetector
from dlsr.devices import resolve_device


def test_names_resolve_to_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_request_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="CUDA is not available"):
        DLSRDetector(device="cuda")

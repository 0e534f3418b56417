"""Where a recipe's model runs: ``device: auto | cpu | cuda``."""
from __future__ import annotations

import torch

from ..errors import ArgumentError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU; ``cuda`` is refused without a GPU."""
    if name not in DEVICES:
        raise ArgumentError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                            "use auto (the GPU when there is one) or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)

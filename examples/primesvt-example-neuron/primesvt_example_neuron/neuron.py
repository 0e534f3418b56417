"""A LIF neuron whose firing threshold is learned per channel."""
from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based import base, surrogate


class ChannelThresholdLIF(base.MemoryModule):
    """LIF neuron (hard reset to 0) with a learnable threshold for each of ``channels``.

    Input ``[T, N, C, ...]`` in multi-step mode, ``[N, C, ...]`` in single-step mode.
    """

    def __init__(self, channels: int, tau: float = 2.0, step_mode: str = "m"):
        super().__init__()
        self.tau = tau
        self.threshold = nn.Parameter(torch.ones(channels))
        self.surrogate = surrogate.Sigmoid()
        self.register_memory("v", 0.0)
        self.step_mode = step_mode

    def _threshold_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.threshold.view(1, -1, *([1] * (x.ndim - 2)))

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v if isinstance(self.v, torch.Tensor) else torch.zeros_like(x)
        v = v + (x - v) / self.tau
        spike = self.surrogate(v - self._threshold_like(x))
        self.v = v * (1.0 - spike.detach())
        return spike

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.single_step_forward(x) for x in x_seq])

    def extra_repr(self) -> str:
        return f"channels={self.threshold.numel()}, tau={self.tau}, step_mode={self.step_mode}"

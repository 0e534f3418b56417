"""Wall-clock latency of one inference, the way the reports measure it."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from ..pruning.spiking import inference, to_model_device


def median_ms(call: Callable[[], object], repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of ``call()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def model_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    """Median latency of a fresh-state forward pass of a PyTorch spiking model on ``x`` (on the model's device)."""
    x = to_model_device(model, x)
    cuda = x.device.type == "cuda"

    def forward():
        functional.reset_net(model)
        model(x)
        if cuda:  # kernels run asynchronously: wait for them, or only the launch is timed
            torch.cuda.synchronize(x.device)

    with inference(model):
        return median_ms(forward, repeats)

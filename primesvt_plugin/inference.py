"""Running a spiking model for inference: eval mode, no grad, fresh neuron state."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: eval mode, no autograd, neuron state reset; on exit state is reset and the mode restored."""
    was_training = model.training
    model.eval()
    functional.reset_net(model)
    try:
        with torch.no_grad():
            yield model
    finally:
        functional.reset_net(model)
        model.train(was_training)


def fresh_forward(model: nn.Module, inputs) -> torch.Tensor:
    """One forward pass from a fresh state (multi-step models see every time step)."""
    with inference(model):
        return model(inputs)

"""Running spiking models: fresh neuron state, the time axis, and swapped forwards.

What every other module needs to know about SpikingJelly models, in one place:
inference from a reset state, which input dimension is time, which modules keep
state, and how to let chosen layers run another forward for a while (tracing
and exporting both do).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn
from spikingjelly.activation_based import base, functional


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


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s tensors live: its first parameter's (or buffer's) device; the CPU for neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_model_device(model: nn.Module, inputs):
    """``inputs`` on ``model``'s device (a tensor; anything else is returned as it is).

    Functions receiving an example input call this, so a CPU example works with a model on a GPU.
    """
    return inputs.to(model_device(model)) if isinstance(inputs, torch.Tensor) else inputs


def class_scores(outputs):
    """``[N, K]`` scores from a model's outputs: multi-step ``[T, N, K]`` is averaged over time.

    Works on torch tensors and numpy arrays (exported models' outputs) alike.
    """
    return outputs.mean(0) if outputs.ndim == 3 else outputs


def stateful_modules(model: nn.Module) -> list[nn.Module]:
    """SpikingJelly ``MemoryModule``s (neurons and stateful layers) of ``model``."""
    return [m for m in model.modules() if isinstance(m, base.MemoryModule)]


@contextlib.contextmanager
def overridden_forward(forwards: Mapping[nn.Module, Callable]) -> Iterator[None]:
    """Inside: each module in ``forwards`` runs the given forward instead of its class's.

    An instance attribute shadows the class's ``forward``; removing it restores the
    module exactly, also on error.
    """
    try:
        for module, forward in forwards.items():
            module.forward = forward
        yield
    finally:
        for module in forwards:
            module.__dict__.pop("forward", None)


# -- the time axis -------------------------------------------------------------------


def time_step_owners(model: nn.Module) -> list[nn.Module]:
    """Modules declaring their number of time steps as an integer ``T`` attribute."""
    return [m for m in model.modules() if type(getattr(m, "T", None)) is int]


def step_modules(model: nn.Module) -> list[nn.Module]:
    """SpikingJelly layers with a ``step_mode``."""
    return [m for m in model.modules() if isinstance(m, base.StepModule)]


def stepped_by_mode(model: nn.Module) -> bool:
    """True when the model has no ``T`` attribute and every SpikingJelly layer runs multi-step:
    its input's first dimension is time only through ``step_mode`` (``parametric_lif_net``)."""
    steps = step_modules(model)
    return not time_step_owners(model) and bool(steps) and all(m.step_mode == "m" for m in steps)


def time_steps(model: nn.Module) -> set[int]:
    """The time-step counts (``T`` attributes) a model's modules declare."""
    return {m.T for m in time_step_owners(model)}


def has_time_axis(model: nn.Module, inputs) -> bool:
    """Whether ``inputs`` is time-major (``[T, N, ...]``) for ``model``: a ``[T, N, C, H, W]`` batch
    whose T is one the model declares, or any batch of a model stepped by mode."""
    if not isinstance(inputs, torch.Tensor):
        return False
    return (inputs.ndim == 5 and inputs.shape[0] in time_steps(model)) or (inputs.ndim >= 2 and stepped_by_mode(model))


def first_time_step(model: nn.Module, inputs):
    """``[T, N, ...]`` cut down to ``[1, N, ...]`` for a model with ``T`` time steps, to ``[N, ...]``
    for one stepped by mode; other inputs unchanged."""
    if not has_time_axis(model, inputs):
        return inputs
    return inputs[0] if stepped_by_mode(model) else inputs[:1]


def one_sample(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The first sample of a batch (``[N, ...]``, or ``[T, N, ...]`` for multi-step models)."""
    if has_time_axis(model, inputs):
        return inputs[:, :1]
    return inputs[:1]

"""Running spiking models: fresh neuron state, the time axis, and swapped forwards.

What every other module needs to know about SpikingJelly models, in one place:
inference from a reset state, which input dimension is time, which modules keep
state, and how to let chosen layers run another forward for a while (tracing
and exporting both do).
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn
from spikingjelly.activation_based import base, functional

from ..errors import ArgumentError


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


def fresh_forward(model: nn.Module, inputs, forward_fn: Callable | None = None):
    """One forward pass from a fresh state (multi-step models see every time step): ``run_model``."""
    with inference(model):
        return run_model(model, inputs, forward_fn)


def run_model(model: nn.Module, inputs, forward_fn: Callable | None = None):
    """``forward_fn(model, inputs)`` (a Torch-Pruning ``forward_fn``) when given; else ``model(inputs)``, and as
    Torch-Pruning calls a model on a tuple or dict of inputs, ``model(*inputs)`` / ``model(**inputs)``."""
    if forward_fn is not None:
        return forward_fn(model, inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], inputs):
    """``inputs`` with ``fn`` applied to every tensor in it (through tuples, lists and dicts)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(fn, value) for value in inputs)
    if isinstance(inputs, dict):
        return {key: map_tensors(fn, value) for key, value in inputs.items()}
    return inputs


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s tensors live: its first parameter's (or buffer's) device; the CPU for neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_model_device(model: nn.Module, inputs):
    """``inputs`` on ``model``'s device (every tensor of it; anything else as it is).

    Functions receiving an example input call this, so a CPU example works with a model on a GPU.
    """
    device = model_device(model)
    return map_tensors(lambda tensor: tensor.to(device), inputs)


def first_tensor(output):
    """A model's (or block's) output tensor: the output itself, or the first tensor of a tuple, list or
    dict of outputs (SDT returns ``(logits, hook)``); anything else is returned as it is, for callers to refuse."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((value for value in values if isinstance(value, torch.Tensor)), output)


def model_output(output, output_transform: Callable | None = None):
    """The one tensor the checks read from a model's output: ``output_transform(output)`` when given
    (as Torch-Pruning's ``output_transform``), else ``first_tensor(output)``."""
    return first_tensor(output) if output_transform is None else output_transform(output)


def checked_output(output, output_transform: Callable | None = None) -> torch.Tensor:
    """``model_output``, refused (``ArgumentError``) when it is not a tensor: pruning checks compare one tensor."""
    tensor = model_output(output, output_transform)
    if not isinstance(tensor, torch.Tensor):
        raise ArgumentError(f"the model returns a {type(output).__name__} holding no tensor: pruning checks the shape "
                            "and values of its output; pass output_transform to pick the output tensor")
    return tensor


def read_output(model: nn.Module, index: int) -> nn.Module:
    """``model``, answering ``model(x)[index]`` from now on (its class's forward returns a tuple): the choice
    is an instance attribute and a method bound to it, so copies of the model keep it."""
    model._primesvt_output_index = index
    model.forward = types.MethodType(_indexed_forward, model)
    return model


def _indexed_forward(self, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)[self._primesvt_output_index]


def describe_output(output) -> str:
    """What a model returned, in words (the report says which tensor of a tuple was read)."""
    if isinstance(output, torch.Tensor):
        return "one tensor"
    kinds = ", ".join("tensor" if isinstance(v, torch.Tensor) else type(v).__name__ for v in
                      (output.values() if isinstance(output, dict) else output))
    return f"a {type(output).__name__} ({kinds}): its first tensor is read"


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
    return [m for m in model.modules() if isinstance(getattr(m, "T", None), int) and not isinstance(m.T, bool)]


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


def one_sample(model: nn.Module, inputs):
    """The first sample of a batch (``[N, ...]``, or ``[T, N, ...]`` for multi-step models), of every tensor
    of a tuple or dict of inputs."""
    return map_tensors(lambda tensor: tensor[:, :1] if has_time_axis(model, tensor) else tensor[:1], inputs)

"""Make a spiking model traceable by Torch-Pruning without changing it.

Two things break Torch-Pruning's autograd tracing on SpikingJelly models:
the time dimension (``flatten(0, 1)`` of ``[T, N, C, ...]`` looks like a channel
reshape when T > 1) and the neurons' per-step loops. While tracing we
therefore set every integer ``T`` attribute to 1 and give each spiking layer
and attention block a pass-through forward (``x * 1``), which records it as
one channel-transparent node. Models whose time dimension lives only in
SpikingJelly's ``step_mode`` (no ``T`` attribute, every layer multi-step, e.g.
``parametric_lif_net``) are traced in single-step mode on the first time step
instead: a multi-step ``layer.Linear`` sees ``[T, N, F]``, which turns off
Torch-Pruning's flatten index mapping (conv -> flatten -> linear). Torch-Pruning follows autograd's ``grad_fn``, so
operations on frozen parameters (``requires_grad=False``) would be invisible:
every floating parameter requires grad while tracing. Everything is restored
on exit, also on error.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from spikingjelly.activation_based import base, functional


def _passthrough(x, *args, **kwargs):
    return x * 1.0


def _time_step_owners(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(getattr(m, "T", None)) is int]


def _step_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, base.StepModule)]


def stepped_by_mode(model: nn.Module) -> bool:
    """True when the model has no ``T`` attribute and every SpikingJelly layer runs multi-step:
    its input's first dimension is time only through ``step_mode`` (``parametric_lif_net``)."""
    steps = _step_modules(model)
    return not _time_step_owners(model) and bool(steps) and all(m.step_mode == "m" for m in steps)


def time_steps(model: nn.Module) -> set[int]:
    """The time-step counts (``T`` attributes) a model's modules declare."""
    return {m.T for m in _time_step_owners(model)}


@contextlib.contextmanager
def traceable_parameters(model: nn.Module) -> Iterator[None]:
    """Inside: every floating parameter requires grad, so autograd records the ops on frozen ones too."""
    flags = {p: p.requires_grad for p in model.parameters() if p.is_floating_point()}
    try:
        for p in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def single_step_view(model: nn.Module, passthrough: Iterable[nn.Module]) -> Iterator[None]:
    """Inside: T == 1 everywhere, ``passthrough`` modules forward their input unchanged and
    frozen parameters are traceable (see ``traceable_parameters``)."""
    owners = {m: m.T for m in _time_step_owners(model)}
    modes = {m: m.step_mode for m in _step_modules(model)} if stepped_by_mode(model) else {}
    passthrough = list(passthrough)
    try:
        with traceable_parameters(model):
            for m in owners:
                m.T = 1
            for m in modes:
                m.step_mode = "s"
            for m in passthrough:
                m.forward = _passthrough  # instance attribute: shadows the class's forward
            yield
    finally:
        for m in passthrough:
            m.__dict__.pop("forward", None)
        for m, T in owners.items():
            m.T = T
        for m, mode in modes.items():
            m.step_mode = mode
        functional.reset_net(model)


def has_time_axis(model: nn.Module, inputs) -> bool:
    """Whether ``inputs`` is time-major (``[T, N, ...]``) for ``model``: a ``[T, N, C, H, W]`` batch
    whose T is one the model declares, or any batch of a model stepped by mode."""
    if not isinstance(inputs, torch.Tensor):
        return False
    return (inputs.ndim == 5 and inputs.shape[0] in time_steps(model)) or (inputs.ndim >= 2 and stepped_by_mode(model))


def first_time_step(model: nn.Module, inputs):
    """What ``single_step_view(model)`` runs on: ``[T, N, ...]`` cut down to ``[1, N, ...]`` for a
    model with ``T`` time steps, to ``[N, ...]`` for one stepped by mode; other inputs unchanged."""
    if not has_time_axis(model, inputs):
        return inputs
    return inputs[0] if stepped_by_mode(model) else inputs[:1]


def trace_forward_fn(passthrough: Iterable[nn.Module]):
    """A ``forward_fn`` for ``tp.DependencyGraph`` / ``tp.pruner.MetaPruner`` that traces at T=1."""
    passthrough = list(passthrough)

    def forward_fn(model: nn.Module, example_inputs):
        inputs = first_time_step(model, example_inputs)  # before the view changes T and step modes
        with single_step_view(model, passthrough):
            if isinstance(inputs, (tuple, list)):
                return model(*inputs)
            if isinstance(inputs, dict):
                return model(**inputs)
            return model(inputs)

    return forward_fn

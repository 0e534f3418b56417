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
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from .spiking import (first_time_step, overridden_forward, run_model, step_modules, stepped_by_mode,
                      time_step_owners, to_model_device)


def passthrough(x, *args, **kwargs):
    """The forward a spiking layer runs while traced: its input, recorded as one channel-transparent node."""
    return x * 1.0


def structure_keeping_passthrough(module: nn.Module):
    """The forward an attention block returning more than one tensor runs while traced: its real output
    (computed without autograd and without the tracer's hooks on its layers) with the first tensor
    replaced by the input passed through, so a caller unpacking ``x, v, hook = attn(x)`` still can."""
    forward = type(module).forward

    def stand_in(x, *args, **kwargs):
        inner = [m for m in module.modules() if m is not module]
        hooks = {m: dict(m._forward_hooks) for m in inner}
        try:
            for m in inner:
                m._forward_hooks.clear()
            with torch.no_grad():
                real = forward(module, x, *args, **kwargs)
        finally:
            for m, saved in hooks.items():
                m._forward_hooks.update(saved)
        return _with_first_tensor(real, x * 1.0)
    return stand_in


def _with_first_tensor(output, tensor: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return tensor
    items = list(output.items()) if isinstance(output, dict) else list(enumerate(output))
    key = next(k for k, v in items if isinstance(v, torch.Tensor))
    if isinstance(output, dict):
        return {**output, key: tensor}
    replaced = [tensor if k == key else v for k, v in items]
    return type(output)(*replaced) if hasattr(output, "_fields") else type(output)(replaced)


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
def single_step_view(model: nn.Module, stand_ins: Mapping[nn.Module, Callable]) -> Iterator[None]:
    """Inside: T == 1 everywhere, each module of ``stand_ins`` runs its stand-in forward (``passthrough``)
    and frozen parameters are traceable (see ``traceable_parameters``)."""
    owners = {m: m.T for m in time_step_owners(model)}
    modes = {m: m.step_mode for m in step_modules(model)} if stepped_by_mode(model) else {}
    try:
        with traceable_parameters(model), overridden_forward(stand_ins):
            for m in owners:
                m.T = 1
            for m in modes:
                m.step_mode = "s"
            yield
    finally:
        for m, T in owners.items():
            m.T = T
        for m, mode in modes.items():
            m.step_mode = mode
        functional.reset_net(model)


def trace_forward_fn(stand_ins: Mapping[nn.Module, Callable], call: Callable | None = None):
    """A ``forward_fn`` for ``tp.DependencyGraph`` / ``tp.pruner.MetaPruner`` that traces at T=1, each module of
    ``stand_ins`` running its stand-in forward; ``call(model, inputs)`` runs the model (a script's own
    Torch-Pruning ``forward_fn``), by default ``model(inputs)``."""
    stand_ins = dict(stand_ins)

    def forward_fn(model: nn.Module, example_inputs):
        # before the view changes T and step modes; on the model's device (MetaPruner passes the user's)
        inputs = first_time_step(model, to_model_device(model, example_inputs))
        with single_step_view(model, stand_ins):
            return run_model(model, inputs, call)

    return forward_fn

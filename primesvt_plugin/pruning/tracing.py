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
from spikingjelly.activation_based import functional

from .spiking import (first_time_step, overridden_forward, step_modules, stepped_by_mode, time_step_owners,
                      to_model_device)


def _passthrough(x, *args, **kwargs):
    return x * 1.0










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
    owners = {m: m.T for m in time_step_owners(model)}
    modes = {m: m.step_mode for m in step_modules(model)} if stepped_by_mode(model) else {}
    try:
        with traceable_parameters(model), overridden_forward({m: _passthrough for m in passthrough}):
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






def trace_forward_fn(passthrough: Iterable[nn.Module]):
    """A ``forward_fn`` for ``tp.DependencyGraph`` / ``tp.pruner.MetaPruner`` that traces at T=1."""
    passthrough = list(passthrough)

    def forward_fn(model: nn.Module, example_inputs):
        # before the view changes T and step modes; on the model's device (MetaPruner passes the user's)
        inputs = first_time_step(model, to_model_device(model, example_inputs))
        with single_step_view(model, passthrough):
            if isinstance(inputs, (tuple, list)):
                return model(*inputs)
            if isinstance(inputs, dict):
                return model(**inputs)
            return model(inputs)

    return forward_fn

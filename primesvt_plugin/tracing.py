"""Make a spiking model traceable by Torch-Pruning without changing it.

Two things break Torch-Pruning's autograd tracing on SpikingJelly models:
the time dimension (``flatten(0, 1)`` of ``[T, N, C, ...]`` looks like a channel
reshape when T > 1) and the neurons' per-step loops. While tracing we
therefore set every integer ``T`` attribute to 1 and give each spiking layer
and attention block a pass-through forward (``x * 1``), which records it as
one channel-transparent node. Everything is restored on exit, also on error.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional


def _passthrough(x, *args, **kwargs):
    return x * 1.0


def _time_step_owners(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(getattr(m, "T", None)) is int]


def time_steps(model: nn.Module) -> set[int]:
    """The time-step counts (``T`` attributes) a model's modules declare."""
    return {m.T for m in _time_step_owners(model)}


@contextlib.contextmanager
def single_step_view(model: nn.Module, passthrough: Iterable[nn.Module]) -> Iterator[None]:
    """Inside: T == 1 everywhere and ``passthrough`` modules forward their input unchanged."""
    owners = {m: m.T for m in _time_step_owners(model)}
    passthrough = list(passthrough)
    try:
        for m in owners:
            m.T = 1
        for m in passthrough:
            m.forward = _passthrough  # instance attribute: shadows the class's forward
        yield
    finally:
        for m in passthrough:
            m.__dict__.pop("forward", None)
        for m, T in owners.items():
            m.T = T
        functional.reset_net(model)


def first_time_step(model: nn.Module, inputs):
    """Cut a ``[T, N, ...]`` input of a model with ``T`` time steps down to one step."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 5 and inputs.shape[0] in time_steps(model):
        return inputs[:1]
    return inputs


def trace_forward_fn(passthrough: Iterable[nn.Module]):
    """A ``forward_fn`` for ``tp.DependencyGraph`` / ``tp.pruner.MetaPruner`` that traces at T=1."""
    passthrough = list(passthrough)

    def forward_fn(model: nn.Module, example_inputs):
        with single_step_view(model, passthrough):
            inputs = first_time_step(model, example_inputs)
            if isinstance(inputs, (tuple, list)):
                return model(*inputs)
            if isinstance(inputs, dict):
                return model(**inputs)
            return model(inputs)

    return forward_fn

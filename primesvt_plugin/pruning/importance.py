"""MemoryAwareImportance: L2 norm per byte of memory a channel frees.

For every channel ``c`` of a group::

    l2(c)    = Torch-Pruning's group L2 magnitude of c (sum over the group's
               conv/linear/BN slices, mean-reduced over layers, normalised to mean 1)
    bytes(c) = parameter + buffer bytes of every slice the group removes with c
               + the neuron-state bytes (one sample) of the spiking layers it removes
    score(c) = l2(c) / (bytes(c) / 1 KiB) ** memory_weight

Within one group every channel frees the same bytes, so local pruning ranks
channels by L2 exactly like ``MagnitudeImportance(p=2)``. Across groups (global
pruning, or the PrimeSVT policy's ranking) a channel that frees more memory
per unit of norm goes first: with ``memory_weight=1`` halving the norm or
doubling the bytes counts the same. ``memory_weight=0`` is plain group L2.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional

from .accounting import ops_bytes, ops_of_tp_group
from .spiking import to_model_device

KIB = 1024.0




def needs_gradients(importance) -> bool:
    """Whether ``importance`` reads the parameters' ``.grad``: an importance saying so with a
    ``needs_gradients`` attribute, or Torch-Pruning's Taylor importances (``GroupTaylorImportance``
    and its alias ``TaylorImportance``)."""
    flag = getattr(importance, "needs_gradients", None)
    if flag is not None:
        return bool(flag)
    return isinstance(importance, tp.importance.GroupTaylorImportance)


def gradient_loss(output: torch.Tensor) -> torch.Tensor:
    """The label-free loss whose gradients Taylor importances read: ``mean(output ** 2)``.

    No labels are known where the gradients are needed (one example batch), and it is
    defined for any output: a channel matters as much as it moves the model's output.
    """
    return output.float().pow(2).mean()


@contextlib.contextmanager
def example_gradients(model: nn.Module, example_inputs: torch.Tensor) -> Iterator[None]:
    """Inside: every floating parameter's ``.grad`` is ``d gradient_loss / d parameter`` on
    ``example_inputs`` (one fresh forward in the model's current mode, frozen parameters
    included). On exit each ``.grad`` and ``requires_grad`` is put back as it was."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    saved = [(p, p.grad, p.requires_grad) for p in params]
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        functional.reset_net(model)
        with torch.enable_grad():
            gradient_loss(model(to_model_device(model, example_inputs))).backward()
        functional.reset_net(model)
        yield
    finally:
        for p, grad, requires_grad in saved:
            p.grad = grad
            p.requires_grad_(requires_grad)
        functional.reset_net(model)


class MemoryAwareImportance(tp.importance.GroupMagnitudeImportance):
    """Group L2 magnitude divided by the memory each channel frees (see module docs)."""

    def __init__(self, graph=None, memory_weight: float = 1.0, p: int = 2, **kwargs):
        super().__init__(p=p, **kwargs)
        self.graph = graph  # a SpikingGraph: tells neurons, attention blocks and neuron state apart
        self.memory_weight = memory_weight

    def bytes_per_channel(self, group: tp.dependency.Group) -> float:
        size = len(group[0].root_idxs if group[0].root_idxs is not None else group[0].idxs)
        layouts = self.graph.layouts if self.graph else {}
        spiking = self.graph.spiking_types if self.graph else ()
        state = self.graph.state_bytes if self.graph else {}
        channel_ops = self.graph.inner_channel_ops(group) if self.graph else None  # attention q/k/v width
        if channel_ops is not None:
            ops = channel_ops(range(size))
        else:
            ops = ops_of_tp_group(group, set(range(size)), layouts, spiking, self.graph.DG if self.graph else None)
        return ops_bytes(ops, state) / size

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group):
        l2 = super().__call__(group)
        if l2 is None or self.memory_weight == 0:
            return l2
        freed = max(self.bytes_per_channel(group), 1.0)
        return l2 / (freed / KIB) ** self.memory_weight

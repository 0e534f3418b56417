"""MemoryAwareImportance: L2 norm per byte of memory a channel frees.

For every channel ``c`` of a group of ``n`` channels::

    l2(c)    = Torch-Pruning's group L2 magnitude of c (its conv/linear/BN slices,
               mean-reduced over layers)
    share(c) = the fraction of the group's channels at or below c in L2
               (1/n for the weakest, +inf for the strongest: never pruned)
    bytes(c) = parameter + buffer bytes of every slice the group removes with c
               + the neuron-state bytes (one sample) of the spiking layers it removes
    score(c) = share(c) / (bytes(c) / 1 KiB) ** memory_weight

Within one group every channel frees the same bytes, so local pruning ranks
channels by L2 exactly like ``MagnitudeImportance(p=2)``. Across groups (global
pruning, isomorphic ranking) a threshold removes from each group a share in
proportion to the memory its channels free, ``(bytes / 1 KiB) ** memory_weight``;
no group is emptied (``rank_shares`` says why L2 values could not be divided by
bytes). ``memory_weight=0`` is plain group L2.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional

from .accounting import ops_bytes, ops_of_tp_group
from .spiking import model_output, to_model_device

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
def example_gradients(model: nn.Module, example_inputs: torch.Tensor, output_transform=None) -> Iterator[None]:
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
            output = model_output(model(to_model_device(model, example_inputs)), output_transform)
            gradient_loss(output).backward()
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
        return rank_shares(l2, self.head_blocks(group)) / (freed / KIB) ** self.memory_weight

    def head_blocks(self, group: tp.dependency.Group) -> int:
        """Blocks of the group's channels that lose the same channels (its heads; 1 without a graph)."""
        return self.graph.head_blocks(group) if self.graph is not None else 1


def rank_shares(l2: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Each channel's share of its group at or below it in L2 (1/n for the weakest, 1 for the strongest of n),
    the strongest set to +inf: never pruned. Blocks (heads) are ranked by their mean, the same in each.

    Why shares and not L2 values: the memory-aware score must compare groups (global pruning, isomorphic
    ranking), and divided by bytes freed, L2 values made bytes decide alone. Every channel of the residual
    stream frees the most bytes and scored lowest, so Torch-Pruning's global threshold took whole groups,
    which its check refuses (no layer may lose every channel): ``global_pruning=True`` at ratio 0.1 removed
    nothing, and with the strongest channel kept it cut the residual stream to 1 channel (162,898 ->
    9,383 parameters). With shares, a threshold ``t`` removes a fraction ``t * (bytes / KiB) ** memory_weight``
    of each group: groups whose channels free more memory lose a larger share, none is emptied.
    """
    if blocks < 1 or len(l2) % blocks:
        blocks = 1
    per_block = l2.view(blocks, -1).mean(0)
    order = torch.argsort(per_block, stable=True)
    ranks = torch.arange(1, len(order) + 1, dtype=per_block.dtype, device=per_block.device)
    # + less than half a rank from the L2 value itself: the order stays, and groups of the same shape and bytes
    # (the blocks of a transformer) do not tie at a threshold, where each tie would remove one channel more
    ranks = ranks + 0.5 * per_block[order] / per_block.max().clamp_min(1e-12) - 0.5
    shares = torch.empty_like(per_block)
    shares[order] = ranks / len(order)
    shares[order[-1]] = float("inf")
    return shares.repeat(blocks)

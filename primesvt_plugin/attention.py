"""How a spiking self-attention block is laid out, and how to prune it head-aligned.

Torch-Pruning cannot follow channels through ``reshape -> matmul`` inside an
attention block, so the dependency graph treats each attention module as one
channel-transparent node (see ``graph.py``) and an ``AttentionLayout`` from a
plugin says what lies inside:

* the *width* space: residual channels the block reads (``reads``: layers whose
  input channels are the residual) and writes (``writes``: layers whose output
  channels are the residual);
* the *inner* space: q/k/v channels, ``inner_out`` layers producing them (q, k
  and v may be concatenated in one layer: ``chunks``) and ``inner_in`` layers
  consuming them (the projection).

``tied`` blocks reshape q/k/v with the *input* channel count, so inner and width
are one space and are pruned together; untied blocks (Spikformer's SSA) have an
inner space of their own, pruned as a separate group. Either way every head
loses the same number of dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from .channels import IN, OUT, ChannelOp, expand_chunks, prune_channels
from .errors import LayoutError

WIDTH = "width"
INNER = "inner"


@dataclass
class AttentionLayout:
    """A plugin's description of one attention module."""

    module: nn.Module
    num_heads: int
    tied: bool
    reads: list[nn.Module]
    writes: list[nn.Module]
    inner_out: list[tuple[nn.Module, int]]
    inner_in: list[nn.Module]
    # Neurons whose state scales with the width / inner space: (neuron, chunks).
    # chunks=0 marks a neuron whose state does not scale with channels.
    width_neurons: list[nn.Module] = field(default_factory=list)
    inner_neurons: list[tuple[nn.Module, int]] = field(default_factory=list)
    # Called after pruning with the new (width, inner) to update attributes such as head_dim.
    on_resize: Callable[[nn.Module, int, int], None] | None = None

    @property
    def width(self) -> int:
        return _in_channels(self.reads[0])

    @property
    def inner(self) -> int:
        return _in_channels(self.inner_in[0])

    @property
    def head_dim(self) -> int:
        return self.inner // self.num_heads

    def channel_ops(self, space: str, idxs) -> list[ChannelOp]:
        """Layer-level operations removing channels ``idxs`` of ``space`` (WIDTH or INNER)."""
        idxs = tuple(sorted(int(i) for i in idxs))
        ops: list[ChannelOp] = []
        if space == WIDTH:
            ops += [ChannelOp(layer, IN, idxs) for layer in self.reads]
            ops += [ChannelOp(layer, OUT, idxs) for layer in self.writes]
        if space == INNER or self.tied:
            inner = self.inner
            ops += [ChannelOp(layer, OUT, expand_chunks(idxs, inner, chunks)) for layer, chunks in self.inner_out]
            ops += [ChannelOp(layer, IN, idxs) for layer in self.inner_in]
        return ops

    def neuron_channels(self, space: str) -> list[tuple[nn.Module, int]]:
        """(neuron, chunks) whose state loses ``chunks`` entries per removed channel of ``space``."""
        neurons = [(n, 1) for n in self.width_neurons] if space == WIDTH else []
        if space == INNER or self.tied:
            neurons += [(n, c) for n, c in self.inner_neurons if c > 0]
        return neurons

    def prune(self, space: str, idxs) -> None:
        """Remove channels ``idxs`` of ``space`` from every layer, then update the module's attributes."""
        for op in self.channel_ops(space, idxs):
            prune_channels(op)
        if self.on_resize is not None:
            self.on_resize(self.module, self.width, self.inner)

    def check(self, name: str) -> None:
        """Raise if heads are no longer aligned (inner not divisible by num_heads)."""
        if self.inner % self.num_heads or (self.tied and self.inner != self.width):
            raise LayoutError(
                f"attention {name}: inner width {self.inner} is not {self.num_heads} equal heads"
                + (f" of the residual width {self.width}" if self.tied else "")
            )


def _in_channels(layer: nn.Module) -> int:
    for attr in ("in_channels", "in_features", "num_features"):
        if hasattr(layer, attr):
            return int(getattr(layer, attr))
    raise TypeError(f"cannot read input channels of {type(layer).__name__}")

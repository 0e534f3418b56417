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

from ..errors import LayoutError, UnhandledLayerError
from .channels import IN, OUT, ChannelOp, expand_chunks, prune_channels

WIDTH = "width"
INNER = "inner"


@dataclass
class AttentionLayout:
    """A plugin's description of one attention module (returned by ``primesvt_attention_layout``).

    Two channel spaces meet in an attention block. The *width* is the residual
    stream's channel count, which the block reads and writes. The *inner* width
    is the channel count of ONE of q, k and v (``num_heads * head_dim``); it is
    what the block reshapes into heads. Heads are contiguous blocks of
    ``inner // num_heads`` channels in each of q, k and v (``reshape(..., num_heads,
    head_dim)``); the engine only ever removes the same number of channels from
    every head, and the same channel index from q, k and v.

    Every layer named below must be a submodule of ``module`` and a standard
    layer Torch-Pruning can prune (``nn.Conv*d``, ``nn.Linear``, ``nn.BatchNorm*d``).
    Everything inside ``module`` is hidden from the dependency graph: neurons inside it are not passed to
    ``primesvt_prune_spiking_layer``, so they must not hold per-channel parameters.

    Fields:

    ``module`` (``nn.Module``)
        The attention block itself. The dependency graph treats it as one
        channel-transparent node: its input and its output are the residual
        stream, channel ``c`` in is channel ``c`` out.
    ``num_heads`` (``int``)
        The number of heads. It never changes: pruning makes heads narrower.
    ``tied`` (``bool``)
        ``True`` when the forward reshapes q/k/v with the channel count of its
        *input* (``C // num_heads``), so inner width == width always: the two
        spaces are pruned together, residual groups are cut ``num_heads``-aligned.
        ``False`` when inner is independent of the width (the forward uses its
        own ``head_dim`` attribute, like Spikformer's SSA): the inner space is then
        a pruning group of its own, ``"<module name>:qkv"``, which ``SpikingPruner``
        and ``prime()`` prune and ``MetaPruner`` does not see.
    ``reads`` (``list[nn.Module]``)
        Layers whose *input* channels are the residual width (the q/k/v
        projections). ``width`` is read from ``reads[0]``; not empty.
    ``writes`` (``list[nn.Module]``)
        Layers whose *output* channels are the residual width (the output
        projection and its batch norm).
    ``inner_out`` (``list[tuple[nn.Module, int]]``)
        ``(layer, chunks)`` for each layer whose *output* channels are q/k/v.
        ``chunks`` is how many of q, k and v are concatenated along that layer's
        output channels: 1 for a separate q, k or v layer (``q_conv``), 2 for a
        fused ``qk`` layer, 3 for a fused ``qkv`` layer. The layer then has
        ``chunks * inner`` output channels laid out ``[q | k | v]``; removing
        inner channel ``i`` removes ``i``, ``inner + i``, ``2 * inner + i``.
    ``inner_in`` (``list[nn.Module]``)
        Layers whose *input* channels are the inner width (the output
        projection, reading the heads concatenated back). ``inner`` is read from
        ``inner_in[0]``; not empty.
    ``width_neurons`` (``list[nn.Module]``)
        Spiking layers inside the block whose state has one entry per residual
        channel (e.g. a neuron after the output projection). Used for memory
        accounting only (the policy's memory ledger, ``MemoryAwareImportance``):
        their state is rebuilt with the new shape at the next ``reset_net``.
    ``inner_neurons`` (``list[tuple[nn.Module, int]]``)
        ``(neuron, chunks)`` for spiking layers inside the block whose state
        scales with the inner width: the state has ``chunks`` entries per inner
        channel (3 for a neuron after a fused qkv layer, 1 after separate q, k
        or v layers or on the attention output). ``chunks=0`` marks a neuron
        whose state does not scale with channels (e.g. after a reduction over
        channels); it is counted as not shrinking. Memory accounting only, as
        ``width_neurons``.
    ``on_resize`` (``Callable[[nn.Module, int, int], None] | None``)
        Called as ``on_resize(module, width, inner)`` after every removal of
        width or inner channels, with the NEW residual width and the NEW width
        of one q/k/v chunk, to update attributes the forward reads (e.g.
        ``module.head_dim = inner // module.num_heads``, ``module.dim = width``).
        ``None`` when the forward reads every size from its tensors.

    The layout is asked for again whenever a graph is built, so it may be
    computed from the module's current layers.
    """

    module: nn.Module
    num_heads: int  # never changes; heads get narrower
    tied: bool  # inner width is the residual width (the forward reshapes with the input's C)
    reads: list[nn.Module]  # in-channels = residual width; width is reads[0]'s
    writes: list[nn.Module]  # out-channels = residual width
    inner_out: list[tuple[nn.Module, int]]  # (layer, chunks): out-channels = chunks * inner, [q | k | v]
    inner_in: list[nn.Module]  # in-channels = inner (one q/k/v chunk); inner is inner_in[0]'s
    # Neurons whose state scales with the width (one entry per channel) / the inner
    # width ((neuron, chunks): chunks entries per inner channel; chunks=0: does not scale).
    width_neurons: list[nn.Module] = field(default_factory=list)
    inner_neurons: list[tuple[nn.Module, int]] = field(default_factory=list)
    # on_resize(module, new width, new inner width of one q/k/v chunk), after every pruning of the block.
    on_resize: Callable[[nn.Module, int, int], None] | None = None

    @property
    def width(self) -> int:
        """The residual channel count (input channels of ``reads[0]``)."""
        return _in_channels(self.reads[0])

    @property
    def inner(self) -> int:
        """The channel count of one q/k/v chunk, ``num_heads * head_dim`` (input channels of ``inner_in[0]``)."""
        return _in_channels(self.inner_in[0])

    @property
    def head_dim(self) -> int:
        """Channels per head in each of q, k and v."""
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
    raise UnhandledLayerError(f"cannot read input channels of {type(layer).__name__} (no in_channels, in_features "
                              "or num_features): an attention layout must list conv, linear or batch norm layers")

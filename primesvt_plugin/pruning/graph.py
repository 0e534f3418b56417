"""The spiking-aware dependency graph and the pruning groups it yields.

``SpikingGraph`` builds Torch-Pruning's ``DependencyGraph`` on a SpikingJelly
model with spiking layers and attention blocks registered as channel-transparent
customized pruners (traced at T=1, see ``tracing.py``), and turns its groups
into ``PruningGroup`` objects. It adds one group per untied attention block for
the q/k/v inner width, which Torch-Pruning cannot see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import pluggy
import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional

from ..errors import UnhandledLayerError
from ..plugins import get_plugin_manager, spiking_layer_types
from .accounting import attention_ops, ops_of_tp_group
from .attention import INNER, WIDTH, AttentionLayout
from .channels import ChannelOp, tp_pruning_fn
from .inference import infer_layout, recorded_calls
from .memory import state_and_outputs
from .spiking import (fresh_forward, map_tensors, model_output, one_sample, stateful_modules, stepped_by_mode,
                      to_model_device)
from .tracing import passthrough, structure_keeping_passthrough, trace_forward_fn
from .widths import width_trace

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
HEAD_ATTRIBUTES = ("num_heads", "heads", "head_dim")  # what marks a module as multi-head attention


class SpikingLayerPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for a spiking layer: channel-transparent, asks the plugins to cut it."""

    def __init__(self, pm: pluggy.PluginManager):
        super().__init__()
        self.pm = pm

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if not self.pm.hook.primesvt_prune_spiking_layer(layer=layer, idxs=list(idxs)):
            raise UnhandledLayerError(f"no plugin pruned spiking layer {type(layer).__name__}")
        return layer

    prune_in_channels = prune_out_channels  # same function: input and output channels are coupled

    def get_out_channels(self, layer: nn.Module):
        return None  # like an element-wise op: follows its neighbours

    get_in_channels = get_out_channels


class AttentionPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for an attention block seen from the residual stream."""

    def __init__(self, layouts: dict[nn.Module, AttentionLayout]):
        super().__init__()
        self.layouts = layouts

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        self.layouts[layer].prune(WIDTH, idxs)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return self.layouts[layer].width

    get_in_channels = get_out_channels


@dataclass
class PruningGroup:
    """Channels that must be removed together; indices are ``range(size)``."""

    name: str
    size: int
    channel_groups: int  # heads: every block of size // channel_groups loses the same count
    importance_group: tp.dependency.Group  # full indices, for any tp Importance
    channel_ops: Callable[[Sequence[int]], list[ChannelOp]]
    prune: Callable[[Sequence[int]], None]
    kind: str = "channels"  # "channels" | "attention-inner"

    def select(self, importance: torch.Tensor, n_remove: int) -> list[int]:
        """The ``n_remove`` least important channels, the same count in every head block."""
        per_block = min(n_remove // self.channel_groups, self.size // self.channel_groups - 1)
        if per_block <= 0:
            return []
        blocks = importance.reshape(self.channel_groups, -1)
        width = blocks.shape[1]
        chosen = torch.argsort(blocks, dim=1, stable=True)[:, :per_block]
        chosen = chosen + torch.arange(self.channel_groups, device=chosen.device).unsqueeze(1) * width
        return sorted(chosen.flatten().tolist())

    def removable(self, rate: float) -> int:
        """How many channels a pruning ``rate`` removes, rounded down to whole head blocks."""
        per_block = int(rate * self.size / self.channel_groups + 1e-9)
        per_block = min(per_block, self.size // self.channel_groups - 1)
        return max(per_block, 0) * self.channel_groups


class SpikingGraph:
    """Torch-Pruning's dependency graph of a spiking model, plus attention inner groups.

    Attention blocks are described by a plugin's ``primesvt_attention_layout``, or, for a
    block no plugin knows, by a layout inferred from its structure and proven on a copy
    (``inference.py``). ``output_transform`` reads the one output tensor from what the
    model returns (default: the output, or the first tensor of a tuple); ``forward_fn`` and
    ``unwrapped_parameters`` are Torch-Pruning's (the tracing calls ``forward_fn(model, inputs)``
    at one time step).
    """

    def __init__(self, model: nn.Module, example_inputs, ignored_layers: Sequence[nn.Module] = (),
                 pm: pluggy.PluginManager | None = None, output_transform: Callable | None = None,
                 forward_fn: Callable | None = None, unwrapped_parameters=None):
        self.model = model
        example_inputs = to_model_device(model, example_inputs)
        self.pm = pm or get_plugin_manager()
        self.output_transform, self.call = output_transform, forward_fn  # how the checks run the model
        self.names = {m: n for n, m in model.named_modules()}
        self.spiking_types = spiking_layer_types(self.pm)
        self.layouts = {m: layout for m in model.modules()
                        if (layout := self.pm.hook.primesvt_attention_layout(module=m)) is not None}
        # one pass of one sample: each neuron's state, each layer's output (what RAM predictions need), the
        # model's output shape (against which apply_plan checks the pruned model on the same sample), every
        # reshape and the width attributes it reads (widths.py), and what each attention block received and returned
        self.sample_inputs = map_tensors(torch.clone, one_sample(model, example_inputs))  # not views of the batch
        blocks = list(self.layouts) + self._undescribed_attention()
        with width_trace(model) as trace, recorded_calls(blocks) as self.block_calls:
            try:
                sample = state_and_outputs(model, self.sample_inputs, output_transform=output_transform,
                                           forward_fn=forward_fn)
            except Exception as error:
                self._refuse_a_hidden_time_axis(example_inputs, forward_fn, error)
                raise
        self.state_bytes, self.layer_outputs, self.output_shape = sample
        self.width_calls = trace.calls
        self._infer_layouts(blocks)
        for module, layout in self.layouts.items():
            layout.check(self.names[module])
        inside_attention = {sub for m in self.layouts for sub in m.modules() if sub is not m}
        self.spiking_layers = [m for m in model.modules()
                               if isinstance(m, self.spiking_types) and m not in inside_attention]
        self._check_state_is_handled(inside_attention)
        self._refuse_per_channel_neurons_in_attention()
        self.customized_pruners = self._customized_pruners()
        self.forward_fn = trace_forward_fn(self._stand_ins(), forward_fn)
        was_training = model.training
        try:
            self.DG = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=self.forward_fn, output_transform=self._tp_output_transform,
                customized_pruners=self.customized_pruners, unwrapped_parameters=unwrapped_parameters,
            )
        finally:
            model.train(was_training)  # Torch-Pruning leaves the model in eval mode
            functional.reset_net(model)
        self._check_parameters_are_handled(inside_attention)
        self.output_layers = self._output_layers()
        self.ignored_layers = list(ignored_layers)
        self._inner_channel_ops: dict[int, tuple] = {}

    def _refuse_a_hidden_time_axis(self, example_inputs, forward_fn, error: Exception) -> None:
        """A model with no integer ``T`` whose SpikingJelly layers all run multi-step is taken to step over its
        input's first axis (``parametric_lif_net``); one that failed on a sample cut that way but runs on the first
        sample of the batch repeats its input over time inside its forward, at a count tracing cannot set to 1."""
        if not stepped_by_mode(self.model) or not isinstance(example_inputs, torch.Tensor):
            return
        try:
            fresh_forward(self.model, example_inputs[:1], forward_fn)
        except Exception:
            return  # it fails either way: its own error says why
        raise UnhandledLayerError(
            f"the model ({type(self.model).__qualname__}) runs on [N, ...] batches and repeats them over time "
            "in its forward, but has no integer T attribute (its time steps): tracing runs it at one time step by "
            "setting T to 1; store the count as self.T and use it in forward") from error

    def _tp_output_transform(self, output):
        return model_output(output, self.output_transform)

    def _undescribed_attention(self) -> list[nn.Module]:
        """Modules that look like multi-head attention (an integer ``num_heads``, ``heads`` or ``head_dim``) with
        no plugin layout, innermost first; Torch-Pruning's own attention (``nn.MultiheadAttention``) excluded."""
        described = {sub for m in self.layouts for sub in m.modules()}
        found = [m for m in self.model.modules()
                 if m not in described and any(type(getattr(m, a, None)) is int for a in HEAD_ATTRIBUTES)
                 and tp.ops.module2type(m) not in tp.pruner.function.PrunerBox]
        return sorted(found, key=lambda m: -self.names[m].count("."))

    def _infer_layouts(self, blocks: list[nn.Module]) -> None:
        """A layout for each attention block no plugin described, inferred and proven (``inference.py``); a block
        holding a described one is its container (a transformer block keeping ``num_heads``), not attention."""
        for block in blocks:
            if block in self.layouts or any(sub in self.layouts for sub in block.modules()):
                continue
            calls = self.block_calls.get(block)
            if not calls:
                continue  # never called: nothing flows through it to prune
            self.layouts[block] = infer_layout(block, calls[0], self.names[block], self.spiking_types)

    def _stand_ins(self) -> dict[nn.Module, Callable]:
        """What each spiking layer and attention block runs while traced (``tracing.py``)."""
        stand_ins: dict[nn.Module, Callable] = {m: passthrough for m in self.spiking_layers}
        for block in self.layouts:
            calls = self.block_calls.get(block)
            returns_one_tensor = not calls or isinstance(calls[0].output, torch.Tensor)
            stand_ins[block] = passthrough if returns_one_tensor else structure_keeping_passthrough(block)
        return stand_ins

    def head_blocks(self, group: tp.dependency.Group) -> int:
        """How many blocks of equal size a group's channels fall into that must lose the same channels: the heads
        of an attention inner group, the least common multiple of the heads of the tied blocks a residual group
        crosses, else 1 (a group of this graph, as ``groups()`` or Torch-Pruning's pruners build it)."""
        found = self._inner_channel_ops.get(id(group))
        if found and found[0] is group:
            return found[2]
        tied = {item.dep.target.module for item in group} & {m for m, layout in self.layouts.items() if layout.tied}
        return math.lcm(*[self.layouts[m].num_heads for m in tied]) if tied else 1

    def inner_channel_ops(self, group: tp.dependency.Group) -> Callable[[Sequence[int]], list[ChannelOp]] | None:
        """``channel_ops`` of the attention inner group whose ``importance_group`` is ``group``, else None."""
        found = self._inner_channel_ops.get(id(group))
        return found[1] if found and found[0] is group else None

    def metapruner_kwargs(self) -> dict:
        """Keyword arguments making ``tp.pruner.MetaPruner`` spiking-aware on this model.

        Residual widths of tied attention blocks are pruned head-aligned; the q/k/v
        width of untied blocks (Spikformer's SSA) is not visible to MetaPruner: use
        ``SpikingPruner`` to prune it too.
        """
        return {
            "customized_pruners": dict(self.customized_pruners),
            "forward_fn": self.forward_fn,
            "ignored_layers": self.output_layers + self.ignored_layers,
            "root_module_types": list(ROOT_TYPES),
            "out_channel_groups": {m: layout.num_heads for m, layout in self.layouts.items() if layout.tied},
            "output_transform": self._tp_output_transform,
        }

    # -- construction helpers ---------------------------------------------------

    def _check_state_is_handled(self, inside_attention: set[nn.Module]) -> None:
        for m in stateful_modules(self.model):
            handled = isinstance(m, self.spiking_types) or m in self.layouts or m in inside_attention
            if not handled and len(m._memories) > 0:
                self._refuse(m, f"keeps state ({', '.join(m._memories)})",
                             "primesvt_spiking_layer_types / primesvt_prune_spiking_layer "
                             "(see examples/primesvt-example-neuron)")

    def _refuse_per_channel_neurons_in_attention(self) -> None:
        """Neurons inside an attention block are hidden from the graph and never pruned (``AttentionLayout``):
        one holding a tensor per channel would keep its width and break the pruned forward."""
        for block in self.layouts:
            for m in block.modules():
                per_channel = [name for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
                               if isinstance(m, self.spiking_types) and max(t.shape, default=1) > 1]
                if per_channel:
                    raise UnhandledLayerError(
                        f"neuron {self.names[m]!r} ({type(m).__qualname__}) inside attention block "
                        f"{self.names[block]!r} holds per-channel tensors ({', '.join(per_channel)}), and neurons "
                        "inside an attention block are not pruned: use a neuron with scalar parameters there, or "
                        "move it out of the block")

    def _refuse(self, module: nn.Module, why: str, hooks: str) -> None:
        raise UnhandledLayerError(
            f"layer {self.names[module]!r} ({type(module).__module__}.{type(module).__qualname__}) {why} "
            f"and no primesvt plugin handles it; write a plugin implementing {hooks} for it, or replace the layer")

    def _check_parameters_are_handled(self, inside_attention: set[nn.Module]) -> None:
        """Refuse modules whose own per-channel parameters nothing prunes: no Torch-Pruning pruner,
        no plugin, and not traced by Torch-Pruning as an unwrapped parameter (e.g. used only
        through a comparison, which has no grad_fn)."""
        handled = inside_attention | set(self.layouts) | {sub for m in self.spiking_layers for sub in m.modules()}
        for m in self.model.modules():
            if m in handled or tp.ops.module2type(m) in tp.pruner.function.PrunerBox:
                continue
            untracked = [name for name, p in m.named_parameters(recurse=False)
                         if max(p.shape, default=1) > 1 and p not in self.DG.module2node]
            if untracked:
                self._refuse(m, f"has per-channel parameters ({', '.join(untracked)}) Torch-Pruning cannot prune",
                             "primesvt_spiking_layer_types / primesvt_prune_spiking_layer")

    def _customized_pruners(self) -> dict:
        # Torch-Pruning matches customized pruners by exact class, so register each concrete
        # class found in the model: subclasses of handled types are covered this way.
        layer_pruner = SpikingLayerPruner(self.pm)
        pruners: dict = {type(m): layer_pruner for m in self.spiking_layers}
        attention_pruner = AttentionPruner(self.layouts)
        pruners.update({type(m): attention_pruner for m in self.layouts})
        return pruners

    def _output_layers(self) -> list[nn.Module]:
        """Conv/Linear layers whose output channels are the model's output (e.g. the classifier)."""
        found, stack, seen = [], [n for n in self.DG.module2node.values() if not n.outputs], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if isinstance(node.module, ROOT_TYPES):
                found.append(node.module)
            else:
                stack.extend(node.inputs)
        return found

    # -- groups -------------------------------------------------------------------

    def groups(self, include_attention_inner: bool = True) -> list[PruningGroup]:
        """All pruning groups of the model in its current shape."""
        ignored = self.output_layers + self.ignored_layers
        groups = [self._channel_group(g) for g in self.DG.get_all_groups(
            ignored_layers=ignored, root_module_types=ROOT_TYPES)]
        groups = [g for g in groups if g is not None]
        if include_attention_inner:
            groups += [self._inner_group(layout) for layout in self.layouts.values()
                       if not layout.tied and layout.module not in ignored]
        return groups

    def _channel_group(self, group: tp.dependency.Group) -> PruningGroup | None:
        root = group[0].dep.target.module
        size = len(group[0].idxs)
        tied = [self.layouts[item.dep.target.module] for item in group
                if item.dep.target.module in self.layouts and self.layouts[item.dep.target.module].tied]
        if any(layout.module in self.ignored_layers for layout in tied):
            return None
        heads = math.lcm(*[layout.num_heads for layout in tied]) if tied else 1
        if size % heads or size // heads < 2:
            return None
        root_fn = group[0].dep.handler

        def channel_ops(root_idxs: Sequence[int]) -> list[ChannelOp]:
            return ops_of_tp_group(group, set(int(i) for i in root_idxs), self.layouts, self.spiking_types, self.DG)

        def prune(root_idxs: Sequence[int]) -> None:
            self.DG.get_pruning_group(root, root_fn, list(root_idxs)).prune(record_history=False)
            for layout in tied:
                layout.check(self.names[layout.module])
            functional.reset_net(self.model)

        return PruningGroup(self.names[root], size, heads, group, channel_ops, prune)

    def _inner_group(self, layout: AttentionLayout) -> PruningGroup:
        name = self.names[layout.module]

        def channel_ops(idxs: Sequence[int]) -> list[ChannelOp]:
            return attention_ops(layout, INNER, idxs)

        def prune(idxs: Sequence[int]) -> None:
            layout.prune(INNER, idxs)
            layout.check(name)
            functional.reset_net(self.model)

        importance_group = _importance_group(layout.channel_ops(INNER, range(layout.inner)), layout.inner)
        # Its neurons cannot be tp items (no tp pruner): MemoryAwareImportance asks for them here.
        self._inner_channel_ops[id(importance_group)] = (importance_group, channel_ops, layout.num_heads)
        return PruningGroup(f"{name}:qkv", layout.inner, layout.num_heads, importance_group,
                            channel_ops, prune, kind="attention-inner")


def _importance_group(ops: list[ChannelOp], size: int) -> tp.dependency.Group:
    """A Torch-Pruning group over ``ops`` so that any tp Importance can score it.

    Items are ordered so the first one has exactly ``size`` indices: tp reduces
    importance to the length of the first scored item.
    """
    group = tp.dependency.Group()
    for op in sorted(ops, key=lambda op: len(op.idxs) != size):
        node = tp.dependency.Node(op.layer, grad_fn=None)
        fn = tp_pruning_fn(op.layer, op.direction)
        group.add_dep(tp.dependency.Dependency(fn, fn, source=node, target=node), list(op.idxs))
        group[len(group) - 1].root_idxs = [i % size for i in op.idxs]
    return group

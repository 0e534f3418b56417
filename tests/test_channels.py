"""Channels, masks and the spiking graph on the toy model and small SViTs: head-aligned selection, masking
equals pruning, the graph's refusals, attention and neurons carrying batch norms."""
from __future__ import annotations

import copy


import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import neuron
from spikingjelly.activation_based.model import spikformer

from primesvt_plugin import MemoryAwareImportance, SpikingGraph, footprint
from primesvt_plugin.pruning.channels import (IN, OUT, ChannelOp, bytes_per_channel, channel_slices, expand_chunks,
                                      prune_channels, restore, tp_pruning_fn, zero_channels)
from primesvt_plugin.errors import UnhandledLayerError
from primesvt_plugin.pruning.accounting import direction_of, ops_bytes
from primesvt_plugin.pruning.graph import PruningGroup
from primesvt_plugin.pruning.spiking import fresh_forward
from primesvt_plugin.pruning.masking import Masks
from primesvt_plugin.pruning.memory import LedgerState, layer_outputs, one_sample, state_bytes
from primesvt_plugin.plugins import hookimpl
from primesvt_plugin.pruning.pruner import apply_plan

from toy_net import (net, inputs, alive, removed)


# -- (f) head-aligned selection ----------------------------------------------------------


def group_of(size: int, heads: int) -> PruningGroup:
    return PruningGroup("g", size, heads, None, None, None)


def test_select_takes_the_least_important_per_head_block():
    group = group_of(8, 2)
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 0.1, 9.0, 2.0, 2.0])
    assert group.select(scores, 2) == [3, 4]
    assert group.select(scores, 4) == [1, 3, 4, 6]  # ties: the first index goes first (6 before 7)
    assert group.select(scores, 3) == [3, 4]  # rounded down to whole blocks
    assert group.select(scores, 1) == []
    assert group.select(scores, 8) == [1, 2, 3, 4, 6, 7]  # never a whole head block
    assert group.select(scores, 6) == [1, 2, 3, 4, 6, 7]
    assert group_of(8, 1).select(scores, 8) == [0, 1, 2, 3, 4, 6, 7]
    assert group_of(8, 1).select(scores, 3) == [1, 3, 4]


def test_removable_rounds_down_to_whole_head_blocks():
    group = group_of(12, 3)  # blocks of 4
    assert [group.removable(r) for r in (0.1, 0.25, 0.3, 0.5, 0.74, 0.75, 0.9, 1.0)] == [0, 3, 3, 6, 6, 9, 9, 9]
    assert [group_of(10, 1).removable(r) for r in (0.1, 0.3, 0.7, 0.99)] == [1, 3, 7, 9]
    assert group_of(2, 2).removable(0.9) == 0  # one channel per head: nothing can go
    assert group_of(4, 1).removable(0.0) == 0


def tiny_spikformer() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = spikformer.Spikformer(T=2, in_channels=1, img_size_h=16, img_size_w=16, patch_size=4, num_classes=4,
                                  embed_dims=16, num_heads=2, mlp_ratio=1, depths=1)
    return model, torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


RESIDUAL = "blocks.0.mlp.fc2.0"  # the residual stream's group (attention width included)
QKV = "blocks.0.attn:qkv"


def test_attention_qkv_group_is_head_aligned_on_spikformer():
    model, x = tiny_spikformer()
    graph = SpikingGraph(model, x)
    groups = {g.name: g for g in graph.groups()}
    qkv = groups[QKV]
    assert (qkv.size, qkv.channel_groups, qkv.kind) == (16, 2, "attention-inner")
    assert groups[RESIDUAL].kind == "channels" and groups[RESIDUAL].channel_groups == 1
    scores = tp.importance.GroupMagnitudeImportance(p=2)(qkv.importance_group)
    idxs = qkv.select(scores, qkv.removable(0.5))
    assert idxs == qkv.select(scores, 8) and len(idxs) == 8 and len([i for i in idxs if i < 8]) == 4
    assert set(groups) == {QKV, RESIDUAL, "blocks.0.mlp.fc1.0", "patch_embed.stages.0.conv_bn.block.0",
                           "patch_embed.stages.1.conv_bn.block.0", "patch_embed.stages.2.conv_bn.block.0"}
    assert {g.name for g in graph.groups(include_attention_inner=False)} == set(groups) - {QKV}
    assert QKV not in {g.name for g in SpikingGraph(model, x, ignored_layers=[model.blocks[0].attn]).groups()}


def test_masking_equals_pruning_and_ledger_on_spikformer_with_inner_width_apart(masked_equals_pruned):
    """Round one leaves the residual width 8 and the q/k/v width 12; round two prunes both again."""
    model, x = tiny_spikformer()
    masked_equals_pruned(model, x, {RESIDUAL: 0.5, QKV: 0.25})
    attn = model.blocks[0].attn
    assert attn.qkv_conv_bn[0].out_channels == 3 * 12 and attn.proj_conv_bn[0].in_channels == 12
    assert attn.qkv_conv_bn[0].in_channels == 8 and attn.proj_conv_bn[0].out_channels == 8
    masked_equals_pruned(model, x, {RESIDUAL: 0.5, QKV: 0.5})
    assert attn.qkv_conv_bn[0].out_channels == 3 * 6 and attn.proj_conv_bn[0].out_channels == 4


def test_attention_ops_count_inner_neuron_state_with_the_inner_width(masked_equals_pruned):
    model, x = tiny_spikformer()
    masked_equals_pruned(model, x, {RESIDUAL: 0.5, QKV: 0.25})  # width 8, inner 12
    graph = SpikingGraph(model, x)
    groups = {g.name: g for g in graph.groups()}
    attn = model.blocks[0].attn
    neurons = {op.layer: op for op in groups[QKV].channel_ops([1, 4]) if op.layer in graph.state_bytes}
    assert neurons[attn.qkv_lif].idxs == (1, 4, 13, 16, 25, 28) and neurons[attn.qkv_lif].of == 36
    assert neurons[attn.qkv_lif].direction == OUT
    width = {op.layer: op for op in groups[RESIDUAL].channel_ops([2]) if op.layer in graph.state_bytes}
    assert width[attn.proj_lif].idxs == (2,) and width[attn.proj_lif].of == 8


def test_pruning_an_inner_group_off_the_heads_is_refused_by_name():
    from primesvt_plugin.errors import LayoutError

    model, x = tiny_spikformer()
    qkv = next(g for g in SpikingGraph(model, x).groups() if g.name == QKV)
    with pytest.raises(LayoutError, match="attention blocks.0.attn: inner width 15 is not 2 equal heads"):
        qkv.prune([0])


def test_memory_aware_bytes_are_the_groups_bytes_attention_included():
    """What MemoryAwareImportance divides by is what the policy's records and ledger count."""
    model, x = tiny_spikformer()
    graph = SpikingGraph(model, x)
    imp = MemoryAwareImportance(graph)
    for group in graph.groups():
        expected = ops_bytes(group.channel_ops(range(group.size)), graph.state_bytes) / group.size
        assert imp.bytes_per_channel(group.importance_group) == expected, group.name


# -- (g) masking, channels -------------------------------------------------------------


def test_masking_equals_pruning_on_the_toy_model():
    model, x = net(), inputs()
    with torch.no_grad():  # make every channel matter to the output
        model.conv2.weight.mul_(torch.linspace(0.5, 1.5, 36).reshape(1, 4, 3, 3).repeat(16, 1, 1, 1))
        model.fc.weight.copy_(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)))
    graph = SpikingGraph(model, x)
    groups = graph.groups()
    plan = {"conv1": [1, 2], "conv2": [0, 5, 7, 9, 15]}
    original = fresh_forward(model, x)
    masks = Masks()
    for group in groups:
        masks.trial(group.channel_ops(plan[group.name]))
        masks.commit()
    masked = fresh_forward(model, x)
    masks.clear()
    assert torch.equal(fresh_forward(model, x), original)
    assert not torch.equal(masked, original)
    apply_plan(graph, plan, groups)
    torch.testing.assert_close(fresh_forward(model, x), masked, rtol=1e-6, atol=1e-6)
    assert alive(model.conv1, 1.0) == {0, 3} and model.conv2.weight.shape == (11, 2, 3, 3)


def test_masks_trial_undo_commit_clear_restore_exactly():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    groups = {g.name: g for g in graph.groups()}
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = Masks()
    masks.trial(groups["conv1"].channel_ops([0]))
    assert removed(model) == (frozenset({0}), frozenset())
    assert model.conv2.weight[:, 0].abs().sum() == 0 and model.conv2.weight[:, 1:].abs().sum() > 0
    masks.undo_trial()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    masks.trial(groups["conv1"].channel_ops([0]))
    masks.commit()
    masks.trial(groups["conv1"].channel_ops([1]))  # the same tensors again, on top of a committed mask
    masks.trial(groups["conv2"].channel_ops([3]))
    assert removed(model) == (frozenset({0, 1}), frozenset({3}))
    masks.undo_trial()
    assert removed(model) == (frozenset({0}), frozenset())  # back to the committed mask only
    masks.trial(groups["conv1"].channel_ops([2]))
    masks.commit()
    assert removed(model) == (frozenset({0, 2}), frozenset())
    masks.undo_trial()  # nothing left to undo
    assert removed(model) == (frozenset({0, 2}), frozenset())
    masks.trial(groups["conv2"].channel_ops([4]))
    masks.clear()  # the trial and both commits
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    masks.clear()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_zero_channels_and_restore():
    layer = nn.Linear(3, 4)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    saved = {}
    zero_channels(ChannelOp(layer, OUT, (1, 3)), saved)
    zero_channels(ChannelOp(layer, IN, (0,)), saved)  # the weight is saved once, before any zeroing
    assert set(map(id, saved)) == {id(layer.weight), id(layer.bias)}
    assert torch.equal(saved[layer.weight], before["weight"])
    assert layer.weight[[1, 3]].abs().sum() == 0 and layer.bias[[1, 3]].abs().sum() == 0
    assert layer.weight[:, 0].abs().sum() == 0 and layer.weight[[0, 2]][:, 1:].abs().sum() > 0
    restore(saved)
    assert saved == {}
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())


def slices(layer, direction):
    names = {id(t): n for n, t in list(layer.named_parameters()) + list(layer.named_buffers())}
    return [(names[id(t)], dim) for t, dim in channel_slices(layer, direction)]


def test_channel_slices_and_bytes_of_standard_layers():
    conv = nn.Conv2d(3, 8, (3, 5))
    assert slices(conv, OUT) == [("weight", 0), ("bias", 0)] and bytes_per_channel(conv, OUT) == (45 + 1) * 4
    assert slices(conv, IN) == [("weight", 1)] and bytes_per_channel(conv, IN) == 8 * 15 * 4
    nobias = nn.Conv2d(3, 8, 3, bias=False)
    assert slices(nobias, OUT) == [("weight", 0)] and bytes_per_channel(nobias, OUT) == 27 * 4
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert slices(depthwise, IN) == [("weight", 0), ("bias", 0)] == slices(depthwise, OUT)
    assert bytes_per_channel(depthwise, IN) == bytes_per_channel(depthwise, OUT) == (9 + 1) * 4
    grouped = nn.Conv2d(4, 8, 3, groups=2)  # not depthwise: weight [8, 2, 3, 3]
    assert slices(grouped, IN) == [("weight", 1)] and bytes_per_channel(grouped, IN) == 8 * 9 * 4
    transposed = nn.ConvTranspose2d(4, 6, 3)  # weight [4, 6, 3, 3]
    assert slices(transposed, OUT) == [("weight", 1), ("bias", 0)] and bytes_per_channel(transposed, OUT) == 37 * 4
    assert slices(transposed, IN) == [("weight", 0)] and bytes_per_channel(transposed, IN) == 54 * 4
    nobias_t = nn.ConvTranspose1d(4, 6, 3, bias=False)
    assert slices(nobias_t, OUT) == [("weight", 1)]
    linear = nn.Linear(5, 7)
    assert slices(linear, OUT) == [("weight", 0), ("bias", 0)] and bytes_per_channel(linear, OUT) == 6 * 4
    assert slices(linear, IN) == [("weight", 1)] and bytes_per_channel(linear, IN) == 7 * 4
    half = nn.Linear(5, 7).half()
    assert bytes_per_channel(half, OUT) == 6 * 2
    bn = nn.BatchNorm2d(6)  # num_batches_tracked is an integer: not a channel's memory
    assert slices(bn, OUT) == [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
    assert bytes_per_channel(bn, OUT) == 16
    plif = neuron.ParametricLIFNode()  # a 0-d parameter is no channel's
    assert channel_slices(plif, OUT) == [] and bytes_per_channel(plif, OUT) == 0


def test_channel_slices_keep_only_tensors_with_one_entry_per_channel():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 2))
            self.table = nn.Parameter(torch.ones(3))  # not per channel
            self.register_buffer("scale", torch.ones(4))

    odd = Odd()
    assert slices(odd, OUT) == [("weight", 0), ("scale", 0)] and bytes_per_channel(odd, OUT) == 12


def test_prune_channels_and_pruning_functions():
    conv = nn.Conv2d(3, 8, 3)
    prune_channels(ChannelOp(conv, OUT, ()))
    assert conv.out_channels == 8
    prune_channels(ChannelOp(conv, OUT, (0, 5)))
    prune_channels(ChannelOp(conv, IN, (1,)))
    assert tuple(conv.weight.shape) == (6, 2, 3, 3) and (conv.out_channels, conv.in_channels) == (6, 2)
    assert tp_pruning_fn(conv, OUT) == tp.pruner.function.prune_conv_out_channels
    assert tp_pruning_fn(conv, IN) == tp.pruner.function.prune_conv_in_channels
    assert direction_of(tp_pruning_fn(conv, OUT)) == OUT and direction_of(tp_pruning_fn(conv, IN)) == IN
    with pytest.raises(TypeError, match="no pruner for LIFNode"):
        tp_pruning_fn(neuron.LIFNode(), OUT)


def test_expand_chunks():
    assert expand_chunks([0, 2], 4, 3) == (0, 2, 4, 6, 8, 10)
    assert expand_chunks([1], 5, 1) == (1,)
    assert expand_chunks([], 5, 2) == ()


# -- the graph ----------------------------------------------------------------------------


def test_graph_groups_output_layers_and_ignored_layers():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    assert graph.output_layers == [model.fc]
    assert graph.spiking_layers == [model.lif1, model.lif2]
    assert [g.name for g in graph.groups()] == ["conv2", "conv1"]
    conv1 = next(g for g in graph.groups() if g.name == "conv1")
    ops = conv1.channel_ops([1, 3])
    assert [(op.layer, op.direction, op.idxs, op.of) for op in ops] == [
        (model.conv1, OUT, (1, 3), 0), (model.lif1, OUT, (1, 3), 4), (model.conv2, IN, (1, 3), 0)]
    kwargs = graph.metapruner_kwargs()
    assert kwargs["ignored_layers"] == [model.fc] and kwargs["out_channel_groups"] == {}
    assert set(kwargs["customized_pruners"]) == {neuron.LIFNode}
    ignored = SpikingGraph(model, x, ignored_layers=[model.conv2])
    assert [g.name for g in ignored.groups()] == ["conv1"]
    assert ignored.metapruner_kwargs()["ignored_layers"] == [model.fc, model.conv2]
    conv1.prune([0])
    assert model.conv1.out_channels == 3 and model.conv2.in_channels == 3


def test_graph_refuses_unknown_stateful_layers():
    from spikingjelly.activation_based import base

    class Memory(base.MemoryModule):
        def __init__(self):
            super().__init__()
            self.register_memory("v", 0.0)

        def forward(self, x):
            self.v = self.v + x
            return self.v

    class Stateless(base.MemoryModule):  # a MemoryModule with no memory keeps nothing
        def forward(self, x):
            return x

    SpikingGraph(nn.Sequential(nn.Conv2d(1, 2, 1), Stateless(), nn.Conv2d(2, 2, 1)), torch.rand(1, 1, 2, 2))
    model = nn.Sequential(nn.Conv2d(1, 2, 1), Memory(), nn.Conv2d(2, 2, 1))
    with pytest.raises(UnhandledLayerError, match=r"layer '1' \(test_channels\.[\w.<>]*Memory\) keeps state \(v\)"):
        SpikingGraph(model, torch.rand(1, 1, 2, 2))
    model[1].register_memory("i", 0.0)
    with pytest.raises(UnhandledLayerError) as error:
        SpikingGraph(model, torch.rand(1, 1, 2, 2))
    assert str(error.value).endswith(
        "Memory) keeps state (v, i) and no primesvt plugin handles it; write a plugin implementing "
        "primesvt_spiking_layer_types / primesvt_prune_spiking_layer (see examples/primesvt-example-neuron) "
        "for it, or replace the layer")


def test_graph_refuses_attention_without_a_layout():
    class Attention(nn.Module):
        num_heads = 2

        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):
            return self.qkv(x)[..., :4]

    model = nn.Sequential(nn.Linear(4, 4), Attention(), nn.Linear(4, 2))
    with pytest.raises(UnhandledLayerError) as error:
        SpikingGraph(model, torch.rand(1, 4))
    assert str(error.value).startswith("attention block '1' (test_channels.")
    assert str(error.value).endswith(
        "Attention): its layout could not be inferred: layer qkv both reads its input and writes its output: no "
        "output projection reads the heads back; write a plugin implementing primesvt_attention_layout for it "
        "(docs/plugins.md)")


def test_graph_refuses_untraced_per_channel_parameters():
    class Threshold(nn.Module):
        def __init__(self):
            super().__init__()
            self.level = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return x * (x > self.level.view(1, -1)).float()

    model = nn.Sequential(nn.Linear(3, 4), Threshold(), nn.Linear(4, 2))
    with pytest.raises(UnhandledLayerError, match=r"per-channel parameters \(level\)"):
        SpikingGraph(model, torch.rand(1, 3))


# -- more layers: tied attention, neurons with a batch norm, time steps ----------------------


def test_tied_attention_on_spike_driven_transformer(masked_equals_pruned):
    from primesvt_plugin.plugins import build_model

    torch.manual_seed(0)
    model = build_model("spike_driven_transformer", dict(T=1, in_channels=1, num_classes=4, embed_dims=16,
                                                         num_heads=2, depths=1))
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = SpikingGraph(model, x)
    groups = {g.name: (g.size, g.channel_groups, g.kind) for g in graph.groups()}
    residual = "patch_embed.final_stage.0"
    assert groups[residual] == (16, 2, "channels")  # tied: the residual width is cut head-aligned
    assert len(groups) == 5 and all(kind == "channels" for _, _, kind in groups.values())
    attn = model.blocks[0].attn
    assert graph.metapruner_kwargs()["out_channel_groups"] == {attn: 2}
    assert residual not in {g.name for g in SpikingGraph(model, x, ignored_layers=[attn]).groups()}
    from primesvt_plugin.errors import LayoutError

    with pytest.raises(LayoutError, match="^attention blocks.0.attn: inner width 15 is not 2 equal heads of the "
                                          "residual width 15$"):
        next(g for g in SpikingGraph(copy.deepcopy(model), x).groups() if g.name == residual).prune([0])
    masked_equals_pruned(model, x, {residual: 0.5})
    assert (attn.num_heads, attn.head_dim, attn.q_conv.out_channels, attn.proj_conv.out_channels) == (2, 4, 8, 8)


def test_a_neurons_batch_norm_goes_with_its_channels():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), neuron.MPBNLIFNode(out_channels=4), nn.Flatten(), nn.Linear(64, 2))
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    graph = SpikingGraph(model, x)
    (group,) = graph.groups()
    bn = model[1].vbn
    assert [(op.layer, op.direction, op.idxs) for op in group.channel_ops([1])] == [
        (model[0], OUT, (1,)), (model[1], OUT, (1,)), (bn, OUT, (1,)), (model[3], IN, tuple(range(16, 32)))]
    ledger = LedgerState(model, graph.state_bytes, layer_outputs(model, x))
    for op in group.channel_ops([1, 2]):
        ledger.remove(op)
    apply_plan(graph, {group.name: [1, 2]}, [group])
    assert bn.num_features == 2 and model[0].out_channels == 2
    assert ledger.footprint() == footprint(model, x)


def test_one_sample_of_time_major_inputs():
    class Clocked(nn.Module):
        def __init__(self):
            super().__init__()
            self.T = 4
            self.lif = neuron.LIFNode(step_mode="m")

        def forward(self, x):
            return self.lif(x)

    clocked, seq = Clocked(), torch.rand(4, 3, 1, 2, 2)
    assert torch.equal(one_sample(clocked, seq), seq[:, :1])
    assert torch.equal(one_sample(clocked, seq[:3]), seq[:1])  # 3 is no time-step count of the model
    assert torch.equal(one_sample(clocked, seq[0]), seq[0, :1])  # 4-D: samples first
    stepped = nn.Sequential(neuron.LIFNode(step_mode="m"))
    assert torch.equal(one_sample(stepped, seq[:, :, 0, 0, 0]), seq[:, :1, 0, 0, 0])  # [T, N]


def test_channel_slices_of_more_convolutions():
    assert slices(nn.Conv2d(1, 4, 3), IN) == [("weight", 1)]  # one input channel, groups=1: not depthwise
    assert slices(nn.Conv2d(2, 2, 3, groups=2), IN) == [("weight", 0), ("bias", 0)]  # depthwise with 2 channels
    assert slices(nn.Conv1d(4, 4, 3, groups=2), IN) == [("weight", 1)]  # grouped, not depthwise
    assert type(bytes_per_channel(nn.Conv2d(3, 8, 3), OUT)) is int

    class Parent(nn.Module):  # a child's tensors are the child's channels, not the parent's
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 2))
            self.child = nn.BatchNorm1d(4)

    assert slices(Parent(), OUT) == [("weight", 0)]


def test_graph_accepts_scalar_and_traced_parameters_and_refuses_untraced_ones():
    class Gate(nn.Module):  # per-channel, but only compared with: no grad_fn, Torch-Pruning cannot see them
        def __init__(self, width, shape):
            super().__init__()
            self.level = nn.Parameter(torch.zeros(shape))
            self.gain = nn.Parameter(torch.zeros(shape))

        def forward(self, x):
            return x * (x > self.level).float() * (x > self.gain).float()

    class Scale(nn.Module):  # per-channel and multiplied in: traced (an unwrapped parameter)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.weight

    x = torch.rand(1, 3)
    with pytest.raises(UnhandledLayerError) as error:
        SpikingGraph(nn.Sequential(nn.Linear(3, 2), Gate(2, (2,)), nn.Linear(2, 2)), x)
    assert str(error.value).startswith("layer '1' (test_channels.")
    assert str(error.value).endswith(
        "Gate) has per-channel parameters (level, gain) Torch-Pruning cannot prune and no primesvt plugin handles "
        "it; write a plugin implementing primesvt_spiking_layer_types / primesvt_prune_spiking_layer for it, "
        "or replace the layer")
    SpikingGraph(nn.Sequential(nn.Linear(3, 2), Gate(2, ()), nn.Linear(2, 2)), x)  # scalars: nothing per channel
    SpikingGraph(nn.Sequential(nn.Linear(3, 2), Gate(2, (1,)), nn.Linear(2, 2)), x)
    SpikingGraph(nn.Sequential(nn.Linear(3, 2), Scale(), nn.Linear(2, 2)), x)


def test_output_layers_are_found_through_the_layers_after_them():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.lif = neuron.LIFNode()
            self.head_a, self.head_b = nn.Linear(64, 2), nn.Linear(64, 3)
            self.out_lif = neuron.LIFNode()

        def forward(self, x):
            x = self.lif(self.conv(x)).flatten(1)
            return self.out_lif(torch.cat([self.head_a(x), self.head_b(x)], 1))

    model = TwoHeads()
    graph = SpikingGraph(model, torch.rand(1, 1, 6, 6))
    assert set(graph.output_layers) == {model.head_a, model.head_b}
    assert [g.name for g in graph.groups()] == ["conv"]


def test_a_spiking_layer_no_plugin_prunes_is_refused():
    from primesvt_plugin.plugins import new_plugin_manager

    class OnlyTypes:
        @hookimpl
        def primesvt_spiking_layer_types(self):
            return [neuron.LIFNode]

    pm = new_plugin_manager(load_entry_points=False)
    pm.unregister(name="neurons")  # the builtin that prunes SpikingJelly's neurons
    pm.register(OnlyTypes())
    model, x = net(), inputs()
    conv1 = next(g for g in SpikingGraph(model, x, pm=pm).groups() if g.name == "conv1")
    with pytest.raises(UnhandledLayerError, match="^no plugin pruned spiking layer LIFNode$"):
        conv1.prune([0])


def test_removable_counts_are_whole_numbers_and_ops_bytes_too():
    assert all(type(group_of(12, 3).removable(r)) is int for r in (0.1, 0.5, 1.0, 1.5))
    model, x = net(), inputs()
    state = state_bytes(model, x)
    assert type(ops_bytes([ChannelOp(model.lif1, OUT, (0,), of=3)], state)) is int
    assert ops_bytes([ChannelOp(model.lif1, OUT, (0,), of=3)], state) == 4096 // 3
    assert ops_bytes([ChannelOp(model.lif1, OUT, (0,), of=1)], {model.lif1: 4}) == 4


def test_a_per_channel_neuron_inside_attention_is_refused_when_the_graph_is_built(images):
    """Neurons inside an attention block are not pruned, so one with a tensor per channel is refused by name up
    front (it used to fail later with a size mismatch in the pruned forward)."""
    from spikingjelly.activation_based import neuron as sj_neuron
    from svits import attention_layouts, build

    class GainLIF(sj_neuron.LIFNode):
        def __init__(self, channels: int):
            super().__init__(step_mode="m")
            self.gain = nn.Parameter(torch.ones(channels))

    model = build("spikformer")
    block = attention_layouts(model)[0].module
    name, inner = next((n, m) for n, m in block.named_modules() if isinstance(m, sj_neuron.BaseNode))
    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
    setattr(parent, name.rpartition(".")[2], GainLIF(4))
    with pytest.raises(UnhandledLayerError, match=rf"^neuron '[\w.]*{name.rpartition('.')[2]}' \(.*GainLIF\) inside "
                                                  r"attention block '[\w.]+' holds per-channel tensors \(gain\)"):
        SpikingGraph(model, images)
    setattr(parent, name.rpartition(".")[2], inner)  # the same block with its own neuron builds
    assert SpikingGraph(model, images).groups()


def test_a_model_repeating_its_input_over_time_without_an_integer_T_is_refused_naming_T(images):
    """A model whose SpikingJelly layers all run multi-step and that keeps its time steps under another name
    (``self.steps``) cannot be traced at one time step: one line naming ``T``, not a failure inside its forward."""
    from spikingjelly.activation_based import layer as sj_layer
    from spikingjelly.activation_based import neuron as sj_neuron

    class StepsNet(nn.Module):
        def __init__(self, steps_name: str):
            super().__init__()
            setattr(self, steps_name, 4)
            self.steps_name = steps_name
            self.conv = sj_layer.Conv2d(3, 8, 3, padding=1, step_mode="m")
            self.lif = sj_neuron.LIFNode(step_mode="m")
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = x.unsqueeze(0).repeat(getattr(self, self.steps_name), 1, 1, 1, 1)
            return self.fc(self.lif(self.conv(x)).mean((0, 3, 4)))

    with pytest.raises(UnhandledLayerError, match=r"^the model \(.*StepsNet\) runs on \[N, \.\.\.\] batches .* "
                                                  r"no integer T attribute .* store the count as self\.T"):
        SpikingGraph(StepsNet("steps"), images)
    assert SpikingGraph(StepsNet("T"), images).groups()  # the same model keeping its count as T is traced

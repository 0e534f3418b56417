"""A drop-in for Torch-Pruning users: their script's own arguments merged with ours, the memory-aware criterion
under global pruning, interactive steps, histories, and saving what a pruner did."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional, layer, neuron
from spikingjelly.activation_based.model.spikformer import Spikformer

import primesvt_plugin as ps
from primesvt_plugin.errors import ArgumentError
from primesvt_plugin.pruning.spiking import fresh_forward


def small_spikformer() -> nn.Module:  # the README's
    torch.manual_seed(0)
    return Spikformer(T=2, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10,
                      embed_dims=64, num_heads=4, mlp_ratio=4, depths=2)


@pytest.fixture
def x():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def l2_pruner(model, x, ratio: float = 0.3, **kwargs) -> tp.pruner.MetaPruner:
    return tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                pruning_ratio=ratio, **kwargs)


# -- the script's Torch-Pruning arguments, merged -------------------------------------------------


def test_a_scripts_ignored_layers_join_ours(x):
    model = small_spikformer()
    with pytest.raises(TypeError, match="multiple values for keyword argument 'ignored_layers'"):
        l2_pruner(model, x, ignored_layers=[model.head], **ps.spiking_pruner_kwargs(model, x))  # Python's rule
    stem = model.patch_embed.stages[0].conv_bn.block[0]
    kwargs = ps.spiking_pruner_kwargs(model, x, ignored_layers=[stem, model.head])
    assert model.head in kwargs["ignored_layers"] and stem in kwargs["ignored_layers"]
    ps.verified_step(l2_pruner(model, x, **kwargs), x)
    assert stem.out_channels == 8 and model.head.out_features == 10 and params(model) < params(small_spikformer())


def test_a_scripts_forward_fn_runs_inside_ours(x):
    model, calls = small_spikformer(), []

    def forward_fn(model, inputs):  # e.g. a model taking a dict
        calls.append(tuple(inputs["image"].shape))
        return model(inputs["image"])

    kwargs = ps.spiking_pruner_kwargs(model, {"image": x}, forward_fn=forward_fn)
    assert calls  # our graph traced through it
    calls.clear()
    pruner = l2_pruner(model, {"image": x}, **kwargs)
    assert calls and all(shape == (2, 3, 32, 32) for shape in calls)  # MetaPruner's trace too, at one time step
    pruner.step()
    functional.reset_net(model)
    assert model(x).shape == (2, 2, 10)


def test_root_module_types_are_united(x):
    model = small_spikformer()
    kwargs = ps.spiking_pruner_kwargs(model, x, root_module_types=[nn.Conv2d, nn.Linear, nn.LSTM])
    assert nn.LSTM in kwargs["root_module_types"] and len(kwargs["root_module_types"]) == len(
        set(kwargs["root_module_types"]))
    ps.verified_step(l2_pruner(model, x, **kwargs), x)


class Gate(nn.Module):
    """A per-channel gate Torch-Pruning has no pruner for: the script brings one."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x):  # [T, B, C, H, W]
        return x * self.scale.view(1, 1, -1, 1, 1)


class GatePruner(tp.pruner.function.BasePruningFunc):
    def prune_out_channels(self, layer, idxs):
        keep = [i for i in range(len(layer.scale)) if i not in set(idxs)]
        layer.scale = nn.Parameter(layer.scale.data[keep])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return len(layer.scale)

    get_in_channels = get_out_channels


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.T = 2
        self.conv = layer.Conv2d(3, 8, 3, padding=1, step_mode="m")
        self.gate, self.lif = Gate(8), neuron.LIFNode(step_mode="m")
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.lif(self.gate(self.conv(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1))))
        return self.head(x.mean((3, 4))).mean(0)


def test_a_scripts_customized_pruners_join_ours_and_a_clash_is_refused_by_name(x):
    model = GatedNet()
    kwargs = ps.spiking_pruner_kwargs(model, x, customized_pruners={Gate: GatePruner()})
    assert Gate in kwargs["customized_pruners"] and neuron.LIFNode in kwargs["customized_pruners"]
    ps.verified_step(l2_pruner(model, x, 0.5, **kwargs), x)
    assert model.conv.out_channels == 4 == len(model.gate.scale)
    with pytest.raises(ArgumentError, match=r"customized_pruners: primesvt sets 'LIFNode' to .* and you give"):
        ps.spiking_pruner_kwargs(GatedNet(), x, customized_pruners={neuron.LIFNode: GatePruner(), Gate: GatePruner()})


class Scaled(nn.Module):
    """A per-channel scale used as a bare parameter (no module): Torch-Pruning's unwrapped_parameters."""

    def __init__(self):
        super().__init__()
        self.T = 2
        self.conv = layer.Conv2d(3, 8, 3, padding=1, step_mode="m")
        self.scale = nn.Parameter(torch.ones(1, 1, 8, 1, 1))
        self.lif, self.head = neuron.LIFNode(step_mode="m"), nn.Linear(8, 10)

    def forward(self, x):
        x = self.lif(self.conv(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)) * self.scale)
        return self.head(x.mean((3, 4))).mean(0)


def test_unwrapped_parameters_reach_our_graph_and_metapruner(x):
    model = Scaled()
    kwargs = ps.spiking_pruner_kwargs(model, x, unwrapped_parameters=[(model.scale, 2)])
    assert kwargs["unwrapped_parameters"] == [(model.scale, 2)]
    ps.verified_step(l2_pruner(model, x, 0.5, **kwargs), x)
    assert model.scale.shape == (1, 1, 4, 1, 1) and model.conv.out_channels == 4


@pytest.mark.parametrize("argument", ["num_heads", "out_channel_groups"])
def test_head_and_channel_groups_join_ours_and_a_different_count_is_refused(argument, x):
    from spikingjelly.activation_based.model.spike_driven_transformer import SpikeDrivenTransformer

    torch.manual_seed(0)
    model = SpikeDrivenTransformer(T=2, in_channels=3, num_classes=10, embed_dims=64, num_heads=4, depths=2)
    attention = next(m for m in model.modules() if type(m).__name__ == "SpikeDrivenSelfAttention")
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    kwargs = ps.spiking_pruner_kwargs(model, x, **{argument: {attention: 4, stem: 2}})
    assert kwargs["out_channel_groups"][attention] == 4 and kwargs[argument][stem] == 2
    with pytest.raises(ArgumentError, match=rf"{argument}: primesvt sets '[\w.]+' to 4 and you give 2"):
        ps.spiking_pruner_kwargs(model, x, **{argument: {attention: 2}})


def test_in_channel_groups_and_output_transform_are_passed_on(x):
    model = small_spikformer()
    stem = model.patch_embed.stages[1].conv_bn.block[0]
    kwargs = ps.spiking_pruner_kwargs(model, x, in_channel_groups={stem: 1}, output_transform=lambda out: out)
    assert kwargs["in_channel_groups"] == {stem: 1} and callable(kwargs["output_transform"])
    ps.verified_step(l2_pruner(model, x, **kwargs), x)


# -- the memory-aware criterion under global pruning ------------------------------------------------


def prunable_channels(model, x) -> dict[str, int]:
    """Channels of each group, as Torch-Pruning counts them for a ratio (per head block for head-aligned groups)."""
    graph = ps.SpikingGraph(model, x)
    return {g.name: g.size // g.channel_groups for g in graph.groups(include_attention_inner=False)}


def out_channels(model, names) -> dict[str, int]:
    """The output channels of the layers ``names`` (a group's root) now: a group of one channel is no group."""
    return {name: model.get_submodule(name).out_channels for name in names}


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_global_memory_aware_pruning_removes_what_the_ratio_asks_ranked_by_memory(ratio, x):
    model = small_spikformer()
    before = prunable_channels(model, x)
    graph = ps.SpikingGraph(model, x)
    pruner = tp.pruner.MetaPruner(model, x, importance=ps.MemoryAwareImportance(graph), pruning_ratio=ratio,
                                  global_pruning=True, **graph.metapruner_kwargs())  # docs/importance.md's snippet
    ps.verified_step(pruner, x)
    after = out_channels(model, before)
    removed = sum(before.values()) - sum(after.values())
    assert abs(removed - ratio * sum(before.values())) <= 1  # within one channel group of the ratio
    assert all(after[name] >= 1 for name in before)  # no group emptied
    shares = {name: 1 - after[name] / before[name] for name in before}
    residual, hidden = shares["blocks.1.mlp.fc2.0"], shares["blocks.0.mlp.fc1.0"]
    assert residual > hidden  # a residual channel frees the most memory: its group loses the largest share


# -- what Torch-Pruning users do with a pruner ---------------------------------------------------


def test_spiking_pruner_interactive_steps_and_history(x):
    model = small_spikformer()
    pruner = ps.SpikingPruner(model, x, pruning_ratio=0.25)
    planned = list(pruner.step(interactive=True))
    assert planned and all(p.idxs for p in planned) and "channels" in repr(planned[0])
    skipped = planned.pop()
    for step in planned:
        step.prune()
    history = pruner.pruning_history()
    assert list(history[0]) == [p.name for p in planned] and skipped.name not in history[0]
    second = pruner.step()  # plans on the model the first step left
    assert pruner.pruning_history() == [history[0], second]
    assert fresh_forward(model, x).shape == (2, 2, 10)


def test_save_pruned_takes_the_pruner_and_load_pruned_replays_every_step(x, tmp_path):
    args = dict(T=2, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10, embed_dims=64,
                num_heads=4, mlp_ratio=4, depths=2)
    torch.manual_seed(0)
    model = ps.build_model("spikformer", args)
    pruner = ps.SpikingPruner(model, x, pruning_ratio=0.25)
    pruner.step()
    pruner.step()
    with pytest.raises(ArgumentError, match="pass pruner=the pruner"):
        ps.save_pruned(model, tmp_path / "m.pt", "spikformer", args, tuple(x.shape), pruner.plan)
    path = ps.save_pruned(model, tmp_path / "m.pt", "spikformer", args, pruner=pruner)
    loaded = ps.load_pruned(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_the_recommended_way_to_save_a_metapruner_result_instead_of_tp_state_dict(x, tmp_path):
    """tp.state_dict reads every attribute of every module; SpikingJelly's SeqToANNContainer has a step_mode
    property without a value, so it fails before any pruning. ps.save_pruned(pruner=) stores the history."""
    model = small_spikformer()
    with pytest.raises(AttributeError, match="step_mode"):
        tp.state_dict(model)
    args = dict(T=2, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10, embed_dims=64,
                num_heads=4, mlp_ratio=4, depths=2)
    torch.manual_seed(0)
    model = ps.build_model("spikformer", args)
    pruner = l2_pruner(model, x, **ps.spiking_pruner_kwargs(model, x))
    ps.verified_step(pruner, x)
    path = ps.save_pruned(model, tmp_path / "m.pt", "spikformer", args, tuple(x.shape), pruner=pruner)
    loaded = ps.load_pruned(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(fresh_forward(loaded, x), fresh_forward(model.eval(), x))

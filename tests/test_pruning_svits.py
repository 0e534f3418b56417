"""Every SViT SpikingJelly ships survives pruning with Torch-Pruning + our handlers."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from spikingjelly.activation_based import functional, neuron

from primesvt_plugin import MemoryAwareImportance, SpikingGraph, SpikingPruner, spiking_pruner_kwargs
from primesvt_plugin.plugins import build_model

from svits import SMALL_SVIT_ARGS, SMALL_SVITS, assert_heads_consistent, build, param_count, run

MODELS = list(SMALL_SVITS) + ["spikformer_cifar10"]
RATIOS = [0.1, 0.3, 0.5]


def make_importance(name: str, model, x, graph: SpikingGraph):
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        model.train()
        run_with_grad = model(x)
        run_with_grad.float().pow(2).mean().backward()
        functional.reset_net(model)
        return tp.importance.TaylorImportance()
    return MemoryAwareImportance(graph)


def check_pruned(model, before_out, before_params, images):
    new_batch = torch.rand_like(images)
    out = run(model, new_batch)
    assert out.shape == before_out.shape
    assert torch.isfinite(out).all()
    assert param_count(model) < before_params
    assert_heads_consistent(model)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", MODELS)
def test_metapruner_with_our_kwargs(name, ratio, images):
    model = build(name)
    before_out, before_params = run(model, images), param_count(model)
    pruner = tp.pruner.MetaPruner(model, images, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, **spiking_pruner_kwargs(model, images))
    pruner.step()
    check_pruned(model, before_out, before_params, images)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "memory"])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", MODELS)
def test_spiking_pruner(name, ratio, importance, images):
    model = build(name)
    before_out, before_params = run(model, images), param_count(model)
    pruner = SpikingPruner(model, images, pruning_ratio=ratio)
    pruner.importance = make_importance(importance, model, images, pruner.graph)
    removed = pruner.step()
    check_pruned(model, before_out, before_params, images)
    for group in pruner.groups:  # heads stay aligned: each head block lost the same count
        if group.name in removed and group.channel_groups > 1:
            block = group.size // group.channel_groups
            per_block = [sum(1 for i in removed[group.name] if i // block == b) for b in range(group.channel_groups)]
            assert len(set(per_block)) == 1


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "memory"])
@pytest.mark.parametrize("name", list(SMALL_SVITS))
def test_metapruner_importances(name, importance, images):
    model = build(name)
    before_out, before_params = run(model, images), param_count(model)
    graph = SpikingGraph(model, images)
    imp = make_importance(importance, model, images, graph)
    tp.pruner.MetaPruner(model, images, importance=imp, pruning_ratio=0.3, **graph.metapruner_kwargs()).step()
    check_pruned(model, before_out, before_params, images)


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_changes_nothing(name, images):
    model = build(name)
    before = run(model, images)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tp.pruner.MetaPruner(model, images, importance=tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.0, **spiking_pruner_kwargs(model, images)).step()
    SpikingPruner(model, images, pruning_ratio=0.0).step()
    assert torch.equal(run(model, images), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_spikformer_inner_width_is_pruned_head_aligned(images):
    model = build("spikformer")
    SpikingPruner(model, images, pruning_ratio=0.5).step()
    for block in model.blocks:
        assert block.attn.qkv_conv_bn[0].out_channels == 3 * 32  # 64 -> 32: 8 of 16 dims in each of 4 heads
        assert block.attn.head_dim == 8
        assert block.attn.proj_conv_bn[0].in_channels == 32


def test_tracing_leaves_model_untouched(images):
    model = build("spikformer")
    model.train()
    before = run(model, images)
    model.train()
    SpikingGraph(model, images)
    assert model.training and model.T == 2
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, images), before)


class MyLIF(neuron.LIFNode):
    """A user's subclass of a SpikingJelly neuron: handled like its parent."""


@pytest.mark.parametrize("spiking_neuron", [neuron.IFNode, neuron.ParametricLIFNode, neuron.EIFNode, MyLIF],
                         ids=lambda cls: cls.__name__)
def test_other_neuron_classes_and_subclasses(spiking_neuron, images):
    torch.manual_seed(0)
    model = build_model("spikformer", {**SMALL_SVIT_ARGS["spikformer"], "spiking_neuron": spiking_neuron})
    assert any(type(m) is spiking_neuron for m in model.modules())
    before_out, before_params = run(model, images), param_count(model)
    SpikingPruner(model, images, pruning_ratio=0.3).step()
    check_pruned(model, before_out, before_params, images)

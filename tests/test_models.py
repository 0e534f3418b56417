"""The models users bring: pruned right, or refused by name, never silently wrong."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional, layer, neuron
from spikingjelly.activation_based.model import parametric_lif_net

from primesvt_plugin import SpikingGraph, SpikingPruner, spiking_pruner_kwargs, verified_step
from primesvt_plugin.builtins.neurons import ELEMENTWISE_LAYER_TYPES
from primesvt_plugin.errors import ArgumentError, EvaluationError, UnhandledLayerError
from primesvt_plugin.deploy.export import exportable
from primesvt_plugin.plugins import hookimpl, new_plugin_manager
from primesvt_plugin.pruning.policy import prime

from svits import BreaksThirdNeuron, build, param_count, run


def shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def metapruner(model: nn.Module, x: torch.Tensor, ratio: float = 0.5, pm=None) -> tp.pruner.MetaPruner:
    return tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                pruning_ratio=ratio, **spiking_pruner_kwargs(model, x, pm=pm))


# -- frozen parameters ------------------------------------------------------------


def freeze(model: nn.Module, part: str) -> nn.Module:
    for p in (model if part == "all" else model.patch_embed).parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("part", ["patch_embed", "all"])
def test_frozen_parameters_prune_like_trainable_ones_and_stay_frozen(part, images):
    reference = build("spikformer")
    expected_plan = SpikingPruner(reference, images, pruning_ratio=0.5).step()
    model = freeze(build("spikformer"), part)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert SpikingPruner(model, images, pruning_ratio=0.5).step() == expected_plan
    assert shapes(model) == shapes(reference)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("part", ["patch_embed", "all"])
def test_frozen_parameters_through_metapruner_kwargs(part, images):
    reference = build("spikformer")
    verified_step(metapruner(reference, images), images)
    model = freeze(build("spikformer"), part)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    verified_step(metapruner(model, images), images)
    assert shapes(model) == shapes(reference) and param_count(model) < 0.5 * param_count(build("spikformer"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# -- restore after a failed structural change ---------------------------------------


def test_failed_pruning_restores_the_same_objects(images):
    pm = new_plugin_manager()
    pm.register(BreaksThirdNeuron(), name="breaker")
    model = build("spikformer")
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    values = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    model.head.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    before_out = run(model, images)
    with pytest.raises(RuntimeError, match="simulated failure"):
        SpikingPruner(model, images, pruning_ratio=0.5, pm=pm).step()
    assert all(module is modules[n] for n, module in model.named_modules()) and len(modules) == len(dict(model.named_modules()))
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(dict(model.named_parameters()))
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters())
    seen.clear()
    assert torch.equal(run(model, images), before_out) and seen  # the hook registered before still fires
    model.train()
    functional.reset_net(model)
    model(images).float().pow(2).mean().backward()
    optimizer.step()  # built before the failure: still updates the model's own parameters
    assert not torch.equal(model.head.weight, values["head.weight"])


# -- SpikingJelly's stateful layer.* wrappers (parametric_lif_net) --------------------


def test_elementwise_layer_wrappers_are_found_programmatically():
    assert set(ELEMENTWISE_LAYER_TYPES) == {layer.Dropout, layer.Dropout2d, layer.SynapseFilter, layer.Delay}


PLIF_NETS = {"MNISTNet": (parametric_lif_net.MNISTNet, (4, 2, 1, 28, 28)),
             "CIFAR10Net": (parametric_lif_net.CIFAR10Net, (4, 2, 3, 32, 32))}


def plif_net(name: str) -> tuple[nn.Module, torch.Tensor]:
    cls, shape = PLIF_NETS[name]
    torch.manual_seed(0)
    model = cls(channels=8, spiking_neuron=neuron.ParametricLIFNode, detach_reset=True)
    functional.set_step_mode(model, "m")
    return model, torch.rand(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("route", ["spiking_pruner", "metapruner"])
@pytest.mark.parametrize("name", list(PLIF_NETS))
def test_parametric_lif_nets_with_dropout_are_pruned(name, route):
    model, x = plif_net(name)
    assert any(isinstance(m, layer.Dropout) for m in model.modules())
    before_out, before_params = run(model, x), param_count(model)
    if route == "spiking_pruner":
        SpikingPruner(model, x, pruning_ratio=0.5).step()
    else:
        verified_step(metapruner(model, x), x)
    assert param_count(model) < 0.5 * before_params  # conv -> flatten -> dropout -> linear followed
    out = run(model, torch.rand_like(x))
    assert out.shape == before_out.shape and torch.isfinite(out).all()
    with exportable(model) as traced:  # the export forwards: dropout is the identity in eval mode
        torch.testing.assert_close(traced(x), run(model, x))


# -- a custom neuron with a per-channel parameter --------------------------------------


class ThresholdNeuron(nn.Module):
    """A user's neuron (not SpikingJelly's) with a threshold per channel, ``[C, 1, 1]``."""

    def __init__(self, channels: int, surrogate: bool = False):
        super().__init__()
        self.threshold = nn.Parameter(torch.linspace(0.5, 1.5, channels).reshape(channels, 1, 1))
        self.surrogate = surrogate

    def forward(self, x):
        if self.surrogate:  # differentiable in the threshold: Torch-Pruning sees the parameter
            return torch.sigmoid(4 * (x - self.threshold))
        return (x >= self.threshold).to(x.dtype)  # a comparison: no grad_fn, invisible to Torch-Pruning


class ConvNeuronConv(nn.Module):
    def __init__(self, surrogate: bool = False, T: int = 2):
        super().__init__()
        self.T = T
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.neuron = ThresholdNeuron(16, surrogate)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1).flatten(0, 1)
        x = self.conv2(self.neuron(self.conv1(x)))
        return self.head(x.mean((2, 3))).reshape(self.T, -1, 10).mean(0)


def conv_neuron_conv(surrogate: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ConvNeuronConv(surrogate), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_unknown_per_channel_module_is_refused_by_name():
    model, x = conv_neuron_conv()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for make in (SpikingGraph, spiking_pruner_kwargs):
        with pytest.raises(UnhandledLayerError, match=r"'neuron' \(.*ThresholdNeuron\).*threshold.*"
                                                      r"primesvt_spiking_layer_types / primesvt_prune_spiking_layer"):
            make(model, x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class ThresholdNeuronPlugin:
    @hookimpl
    def primesvt_spiking_layer_types(self):
        return [ThresholdNeuron]

    @hookimpl
    def primesvt_prune_spiking_layer(self, layer, idxs):
        if not isinstance(layer, ThresholdNeuron):
            return None
        keep = [i for i in range(layer.threshold.shape[0]) if i not in set(idxs)]
        layer.threshold = nn.Parameter(layer.threshold.data[keep].clone())
        return True


def test_custom_neuron_is_pruned_through_its_plugin():
    pm = new_plugin_manager()
    pm.register(ThresholdNeuronPlugin(), name="threshold_neuron")
    model, x = conv_neuron_conv()
    kept = model.neuron.threshold.detach().flatten().clone()
    removed = SpikingPruner(model, x, pruning_ratio=0.5, pm=pm).step()
    assert model.conv1.out_channels == 8 and model.conv2.in_channels == 8
    survivors = [i for i in range(16) if i not in removed["conv1"]]
    assert torch.equal(model.neuron.threshold.flatten(), kept[survivors])  # each channel keeps its threshold
    assert run(model, x).shape == (2, 10)


def test_per_channel_parameter_torch_pruning_sees_is_pruned_by_it():
    model, x = conv_neuron_conv(surrogate=True)
    SpikingPruner(model, x, pruning_ratio=0.5).step()
    assert model.neuron.threshold.shape == (8, 1, 1) and run(model, x).shape == (2, 10)


# -- an attention block no layout describes --------------------------------------------


class HandWrittenSSA(nn.Module):
    """Spikformer-like attention with separate q/k/v Conv1d + BN + LIF; heads reshaped in forward."""

    def __init__(self, dim: int = 64, num_heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        for name in ("q", "k", "v", "proj"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, 1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", neuron.LIFNode(step_mode="m"))
        self.attn_lif = neuron.LIFNode(v_threshold=0.5, step_mode="m")

    def _branch(self, name: str, x: torch.Tensor, T: int) -> torch.Tensor:
        y = getattr(self, f"{name}_bn")(getattr(self, f"{name}_conv")(x))
        return getattr(self, f"{name}_lif")(y.reshape(T, -1, *y.shape[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, N]
        T, B, C, N = x.shape
        flat = x.flatten(0, 1)

        def heads(t):
            return t.transpose(-1, -2).reshape(T, B, N, self.num_heads, self.head_dim).transpose(2, 3)

        q, k, v = (heads(self._branch(name, flat, T)) for name in "qkv")
        out = (q @ k.transpose(-2, -1) * 0.125) @ v
        out = self.attn_lif(out.transpose(3, 4).reshape(T, B, self.num_heads * self.head_dim, N))
        return self._branch("proj", out.flatten(0, 1), T)


class TinySViT(nn.Module):
    def __init__(self, T: int = 2, dim: int = 64):
        super().__init__()
        self.T = T
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.attn = HandWrittenSSA(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2)  # [B, C, N]
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1)
        x = x + self.attn(x)
        return self.head(x.mean(-1)).mean(0)


def test_hand_written_attention_is_inferred_untied_and_its_head_dim_follows(images):
    """Its forward reshapes heads with its own ``head_dim``: the q/k/v width is a group of its own."""
    torch.manual_seed(0)
    model = TinySViT()
    for make in (SpikingGraph, spiking_pruner_kwargs):
        make(model, images)  # no plugin, no layout: inferred
    graph = SpikingGraph(model, images)
    assert not graph.layouts[model.attn].tied
    assert {g.name: (g.size, g.channel_groups) for g in graph.groups()} == {"embed": (64, 1), "attn:qkv": (64, 4)}
    plan = SpikingPruner(model, images, pruning_ratio=0.5).step()
    assert len(plan["attn:qkv"]) == 32 and model.attn.head_dim == 8 and model.attn.q_conv.out_channels == 32
    assert run(model, images).shape == (2, 10)


# -- prime(): arguments, evaluate's values, chance-level baselines ---------------------


@pytest.mark.parametrize("value", ["0.9", True, None, torch.tensor([0.5, 0.5])], ids=repr)
def test_evaluate_returning_a_non_number_is_refused(value, images):
    with pytest.raises(EvaluationError, match="must return a number"):
        prime(build("spikformer"), images, lambda m: value, memory_saving=0.2, max_accuracy_drop=0.01, progress=False)


@pytest.mark.parametrize("value", [1, 0.5, np.float32(0.5), np.int64(1), torch.tensor(0.5)], ids=repr)
def test_evaluate_returning_any_real_scalar_is_accepted(value, images):
    report = prime(build("spikformer"), images, lambda m: value, memory_saving=0.0, max_accuracy_drop=0.01, progress=False).report
    assert report.baseline.accuracy == float(value)


@pytest.mark.parametrize("bad", [dict(max_accuracy_drop=float("nan")), dict(max_accuracy_drop=float("inf")),
                                 dict(min_accuracy=float("nan")), dict(memory_saving=float("nan")),
                                 dict(memory_saving="0.2"), dict(chance_accuracy=float("nan"))], ids=repr)
def test_non_finite_budgets_are_refused(bad, images):
    args = dict(memory_saving=0.2, max_accuracy_drop=0.01) | bad
    with pytest.raises(ArgumentError, match=next(iter(bad))):
        prime(build("spikformer"), images, lambda m: 1.0, progress=False, **args)


def test_zero_memory_saving_costs_one_evaluation(images):
    model = build("spikformer")
    result = prime(model, images, lambda m: 0.8, memory_saving=0.0, max_accuracy_drop=0.01, progress=False)
    report = result.report
    assert report.evaluations == 1 and report.constraints_met and report.plan == {}
    assert shapes(result.model) == shapes(model) and report.pruned.accuracy == 0.8


@pytest.mark.parametrize("example, expected", [
    ([torch.rand(2, 3, 32, 32)], "must be a torch.Tensor"),
    (torch.rand(2, 5, 32, 32), r"cannot run on example_inputs of shape \(2, 5, 32, 32\): RuntimeError"),
], ids=["list", "wrong-shape"])
def test_bad_example_inputs_are_named(example, expected):
    with pytest.raises(ArgumentError, match=expected):
        prime(build("spikformer"), example, lambda m: 1.0, memory_saving=0.2, max_accuracy_drop=0.01, progress=False)


def test_chance_level_baseline_is_flagged(images, caplog):
    with caplog.at_level(logging.WARNING, logger="primesvt_plugin.pruning.policy"):
        report = prime(build("spikformer"), images, lambda m: 0.1, memory_saving=0.3, max_accuracy_drop=0.01, progress=False,
                       chance_accuracy=0.1).report
    assert len(report.warnings) == 1 and "chance level" in report.warnings[0]
    assert not report.constraints_met and "train the model first" in report.reason
    assert "chance level" in caplog.text
    trained = prime(build("spikformer"), images, lambda m: 0.9, memory_saving=0.0, max_accuracy_drop=0.01, progress=False, chance_accuracy=0.1)
    assert trained.report.warnings == [] and trained.report.constraints_met


@pytest.mark.parametrize("name, module", [
    ("spikformer_cifar10", "spikformer"), ("spikformer_ti", "spikformer"), ("spikformer_s", "spikformer"),
    ("sdt_8_384", "spike_driven_transformer"), ("qkformer_10_384", "qkformer"),
    ("maxformer_10_384", "maxformer"), ("maxformer_cifar", "maxformer"),
])
def test_spikingjellys_published_configurations_are_recipe_models(name, module):
    """benchmarks/scale.py and recipes name them; each resolves to SpikingJelly's own factory."""
    import importlib

    from primesvt_plugin.plugins import get_plugin_manager, registries

    factory = registries(get_plugin_manager()).models[name]
    assert factory is getattr(importlib.import_module(f"spikingjelly.activation_based.model.{module}"), name)

"""Shared fixtures: real SpikingJelly SViTs, small enough for CPU tests."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Fuzz tests: the same 150 examples on every CI run (derandomized); HYPOTHESIS_PROFILE=dev explores more.
settings.register_profile("ci", max_examples=150, derandomize=True)
settings.register_profile("dev", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from primesvt_plugin.pruning.attention import AttentionLayout
from primesvt_plugin.plugins import build_model
from primesvt_plugin.pruning.spiking import first_tensor, fresh_forward
from primesvt_plugin.plugins import get_plugin_manager, hookimpl

# Builder name (registered by our builtins) -> arguments of a CPU-test-sized model.
SMALL_SVIT_ARGS = {
    "spikformer": dict(T=2, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10,
                       embed_dims=64, num_heads=4, mlp_ratio=4, depths=2),
    "spike_driven_transformer": dict(T=2, in_channels=3, num_classes=10, embed_dims=64, num_heads=4, depths=2),
    "qkformer": dict(T=2, in_channels=3, num_classes=10, embed_dims=64, num_heads=[2, 4, 4], depths=[1, 1, 1]),
    "maxformer": dict(T=2, in_channels=3, num_classes=10, embed_dims=64, depths=[1, 1, 1], cifar=True),
}
SMALL_SVITS = list(SMALL_SVIT_ARGS)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, SMALL_SVIT_ARGS.get(name, {}))


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fresh multi-step forward pass in eval mode (state reset before and after)."""
    model.eval()
    return fresh_forward(model, x)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_layouts(model: torch.nn.Module) -> list[AttentionLayout]:
    pm = get_plugin_manager()
    return [layout for m in model.modules() if (layout := pm.hook.primesvt_attention_layout(module=m))]


def assert_heads_consistent(model: torch.nn.Module) -> None:
    """num_heads x head_dim equals each attention's q/k/v width; tied blocks match the residual."""
    layouts = attention_layouts(model)
    assert layouts, "model has no attention block"
    for layout in layouts:
        m = layout.module
        assert layout.inner % layout.num_heads == 0
        if hasattr(m, "head_dim"):
            assert m.num_heads * m.head_dim == layout.inner
        if hasattr(m, "dim"):
            assert m.dim == layout.width
        if layout.tied:
            assert layout.inner == layout.width
        for layer, chunks in layout.inner_out:
            channels = getattr(layer, "out_channels", getattr(layer, "num_features", None))
            assert channels == chunks * layout.inner


class BreaksThirdNeuron:
    """A plugin whose neuron pruning fails part-way through a group."""

    def __init__(self):
        self.calls = 0

    @hookimpl(tryfirst=True)
    def primesvt_prune_spiking_layer(self, layer, idxs):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("simulated failure inside a structural change")
        return None


@pytest.fixture
def masked_equals_pruned():
    """``check(model, x, rates)``: mask, then prune, every group at its rate (``rates`` by group name, 0.5 for the
    others); the pruned model gives the masked one's outputs and the INT8 ledger predicted its footprint."""
    import torch_pruning as tp

    from primesvt_plugin.pruning.masking import Masks
    from primesvt_plugin.pruning.memory import INT8, LedgerState, footprint, layer_outputs
    from primesvt_plugin.pruning.pruner import apply_plan
    from primesvt_plugin.pruning.graph import SpikingGraph

    def check(model, x, rates: dict[str, float]) -> dict[str, list[int]]:
        graph = SpikingGraph(model, x)
        groups = {g.name: g for g in graph.groups()}
        importance = tp.importance.GroupMagnitudeImportance(p=2)
        plan = {name: g.select(importance(g.importance_group), g.removable(rates.get(name, 0.5)))
                for name, g in groups.items()}
        masks, ledger = Masks(), LedgerState(model, graph.state_bytes, layer_outputs(model, x), INT8)
        for name, group in groups.items():
            masks.trial(group.channel_ops(plan[name]))
            masks.commit()
            for op in group.channel_ops(plan[name]):
                ledger.remove(op)
        masked = first_tensor(fresh_forward(model, x))
        masks.clear()
        apply_plan(graph, plan, list(groups.values()))
        torch.testing.assert_close(first_tensor(fresh_forward(model, x)), masked, rtol=1e-5, atol=1e-5)
        assert ledger.footprint() == footprint(model, x, INT8)
        return plan
    return check

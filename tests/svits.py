"""Small real SpikingJelly SViTs for CPU tests, and what tests check on them (imported by test modules as
``from svits import ...``: pytest's docs say never to import ``conftest``)."""
from __future__ import annotations

import torch

from primesvt_plugin.plugins import build_model, get_plugin_manager, hookimpl
from primesvt_plugin.pruning.attention import AttentionLayout
from primesvt_plugin.pruning.spiking import fresh_forward

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

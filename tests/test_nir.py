"""NIR export: a convolutional SNN stepped over time is written and read back with the same decisions;
what NIR cannot hold (a model repeating its input over time, a product of two spike tensors) is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron

from primesvt_plugin import ExportError, to_nir
from primesvt_plugin.deploy.nir import run_nir_graph
from primesvt_plugin.pruning.spiking import fresh_forward

from conftest import build

nir = pytest.importorskip("nir")


def conv_snn() -> nn.Module:
    """A multi-step convolutional SNN (LIF, IF) whose neurons fire on random input."""
    torch.manual_seed(0)
    model = nn.Sequential(layer.Conv2d(1, 8, 3, padding=1, step_mode="m"), neuron.LIFNode(tau=2.0, step_mode="m"),
                          layer.Flatten(step_mode="m"), layer.Linear(8 * 8 * 8, 10, step_mode="m"),
                          neuron.IFNode(step_mode="m"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def frames(n: int = 16) -> torch.Tensor:
    return torch.rand(4, n, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # [T, N, C, H, W]


def test_conv_snn_round_trips_through_nir_with_the_same_spikes(tmp_path):
    model, x = conv_snn(), frames()
    reference = fresh_forward(model, x).numpy()
    assert reference.sum() > 0  # it fires: agreement means something
    model.train()
    (path,) = to_nir(model, x, tmp_path / "model.nir")
    assert model.training  # the caller's mode is left as it was
    graph = nir.read(str(path))
    assert {type(node).__name__ for node in graph.nodes.values()} >= {"Conv2d", "LIF", "IF", "Affine"}
    np.testing.assert_array_equal(run_nir_graph(graph, x), reference)  # read from the file, stepped through time


@pytest.mark.parametrize("name, blocks", [("spikformer", "blocks.0.attn, blocks.1.attn"),
                                          ("spike_driven_transformer", "blocks.0.attn, blocks.1.attn")])
def test_an_svit_is_refused_naming_its_attention_blocks(name, blocks, tmp_path):
    model = build(name).eval()
    with pytest.raises(ExportError, match=f"spiking self-attention \\({blocks}\\): it multiplies two spike tensors"):
        to_nir(model, torch.rand(1, 3, 32, 32), tmp_path / "m.nir")
    assert list(tmp_path.iterdir()) == []


class RepeatsOverTime(nn.Module):
    """A conv SNN that repeats its image over T inside forward, as the SViTs do."""

    def __init__(self):
        super().__init__()
        self.T, self.body = 4, conv_snn()

    def forward(self, x):
        return self.body(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1))


def test_a_model_repeating_its_image_over_time_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ExportError, match="NIR holds the network of one time step, and RepeatsOverTime takes"):
        to_nir(RepeatsOverTime().eval(), torch.rand(2, 1, 8, 8), tmp_path / "m.nir")
    assert list(tmp_path.iterdir()) == []


class SpikeProduct(nn.Module):
    """Multiplies two spike tensors, as spiking self-attention does: NIR has no node for it."""

    def __init__(self):
        super().__init__()
        self.conv, self.lif = layer.Conv2d(1, 4, 3, padding=1, step_mode="m"), neuron.LIFNode(step_mode="m")
        self.flat, self.fc = layer.Flatten(step_mode="m"), layer.Linear(4 * 8 * 8, 3, step_mode="m")

    def forward(self, x):
        spikes = self.lif(self.conv(x))
        return self.fc(self.flat(spikes * spikes))


def test_a_product_of_spike_tensors_is_refused_naming_what_nir_lacks(tmp_path):
    # nirtorch's own words for the product, with ours: NIR's nodes
    with pytest.raises(ExportError, match="NIR cannot represent SpikeProduct: The only supported function is addition"
                                          r".*\(NIR graphs hold convolution, linear, pooling and neuron nodes\)"):
        to_nir(SpikeProduct().eval(), frames(2), tmp_path / "m.nir")
    assert list(tmp_path.iterdir()) == []

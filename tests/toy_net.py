"""The toy model of the core tests: ``Net`` (conv1 -> LIF -> conv2 -> LIF -> pool -> fc), whose right answers
are known by construction (its two pruning groups' bytes are worked out in test_core.py's docstring)."""
from __future__ import annotations



import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron

from primesvt_plugin.pruning.memory import Footprint
from primesvt_plugin.pruning.policy import prime


U = 1 / 64  # one unit of "accuracy"
CONV1_BYTES, CONV2_BYTES = 1640, 224  # bytes one channel of each group frees (module docstring)
CONV1_PARAM_BYTES, CONV2_PARAM_BYTES = 616, 160
PARAMS, STATE = 2732, 5120
# The toy net: weights 36 + 576 + 48 entries, 4 + 16 + 3 output channels, biases 23 entries. One sample's
# largest layer output: conv1's (and lif1's) 4 x 16 x 16 = 1024 entries; neuron state 5120 B.
INT8_FLASH = 660 * 1 + 23 * 8  # INT8: 1 B per weight entry, 8 B per output channel (scale, bias)
FP32_RAM, INT8_RAM = STATE + 1024 * 4, STATE + 1024 * 1
CONV2_INT8_FLASH = 36 + 8 + 3  # one conv2 channel: its 4 x 3 x 3 weights, scale and bias, fc's input column
# INT4 (nncf_int4): fc is matmul-like (half a byte per weight entry), the 3x3 convolutions stay INT8; 9.2 B per
# output channel; weight-only, so activations stay FP32 (no buffers: batch norms fold)
INT4_FLASH, INT4_RAM = round(612 * 1 + 48 * 0.5 + 23 * 9.2), STATE + 1024 * 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.lif1 = neuron.LIFNode()
        self.conv2 = nn.Conv2d(4, 16, 3, stride=4, padding=1)
        self.lif2 = neuron.LIFNode()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.lif1(self.conv1(x))
        x = self.lif2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for i in range(4):
            model.conv1.weight[i] = i + 1
        for j in range(16):
            model.conv2.weight[j] = (j + 1) / 16
        model.fc.weight.fill_(1 / 16)
        for layer in (model.conv1, model.conv2, model.fc):
            layer.bias.zero_()
    return model


def inputs() -> torch.Tensor:
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def alive(layer: nn.Module, scale: float) -> frozenset[int]:
    """Identities of the output channels still present and not masked."""
    rows = layer.weight.detach().flatten(1).abs().amax(1)
    return frozenset(round(float(v) / scale) - 1 for v in rows if v > 0)


def removed(model: Net) -> tuple[frozenset[int], frozenset[int]]:
    return frozenset(range(4)) - alive(model.conv1, 1.0), frozenset(range(16)) - alive(model.conv2, 1 / 16)


def scored(cost):
    """``evaluate``: 1 - cost(removed conv1 channels, removed conv2 channels)."""
    def evaluate(model):
        return 1.0 - cost(*removed(model))
    return evaluate


def per_channel(cost1: float, cost2: float):
    return scored(lambda r1, r2: cost1 * len(r1) + cost2 * len(r2))


def stored(footprint: Footprint) -> Footprint:
    """The bytes the model holds in memory now (parameters, buffers, neuron state), without the deployed ones."""
    return Footprint(footprint.param_bytes, footprint.buffer_bytes, footprint.state_bytes)


def run_prime(evaluate, rates=(0.25, 0.5, 0.75), model=None, **kwargs):
    """prime() on the toy model; by default the paper's exact algorithm (every rate tried in
    order, chosen groups at their highest feasible rate); the tests of the cheaper search and of
    the exact target pass ``search`` / ``objective`` themselves."""
    kwargs.setdefault("memory_saving", 0.2)
    kwargs.setdefault("objective", "max_saving")
    kwargs.setdefault("search", "sweep")
    if "min_accuracy" not in kwargs:
        kwargs.setdefault("max_accuracy_drop", 8 * U)
    return prime(model or net(), inputs(), evaluate, rates=rates, progress=False, **kwargs)


def records(report) -> dict[str, dict]:
    return {g.name: g for g in report.groups}

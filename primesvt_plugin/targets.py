"""Deployment targets: how many bytes each kind of tensor takes on the device a model is deployed to.

A ``Deployment`` says how a model sits in a device's two memories:

- *flash* (the weight file): conv/linear weight entries at ``weight_bytes`` each (those of
  layers a runtime runs as a matrix product, ``matmul_like``, at ``matmul_weight_bytes`` when
  the deployment compresses them further, e.g. INT4), plus
  ``channel_bytes`` per output channel of those weights (a quantizer's scale and the folded
  bias), plus the other parameters and buffers at ``other_bytes`` each, plus ``file_bytes``
  the runtime's file adds (measured once on the unpruned model: ``calibrated``);
- *RAM*: neuron state + buffers (at ``other_bytes``) + the largest output of any layer for
  one sample (all time steps, as a multi-step model holds it) at ``activation_bytes`` per entry.

The bottom of the package with ``errors``: the pruning search counts bytes with these, and
the quantizers in ``deploy`` declare which one their files follow.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn
from spikingjelly.activation_based import layer as sj_layer


@dataclass(frozen=True)
class Deployment:
    """Bytes per entry of each kind of tensor on the target device (see the module docstring)."""

    name: str = "fp32"
    weight_bytes: float = 4  # per entry of a conv/linear weight
    channel_bytes: float = 0  # per output channel of a conv/linear weight
    other_bytes: float = 4  # per entry of the other parameters and buffers
    activation_bytes: float = 4  # per entry of a layer's output
    file_bytes: int = 0  # what the weight file adds beyond the tensors
    margin_bytes: int = 0  # how far below a flash budget the search aims: the prediction's uncertainty
    matmul_weight_bytes: float | None = None  # per entry of a matmul-like layer's weight (None: weight_bytes)
    energy_precision: str = "fp32"  # the op_counter costs its arithmetic is estimated at
    weight_precision: str = ""  # what conv/linear weights deploy at, in words ("": the name)
    matmul_precision: str = ""  # what matmul-like layers' weights deploy at ("": as the others)

    def precision_of(self, layer: nn.Module) -> str:
        """The precision ``layer``'s weights deploy at."""
        if self.matmul_precision and matmul_like(layer):
            return self.matmul_precision
        return self.weight_precision or self.name

    def calibrated(self, predicted_flash: int, measured_flash: int, margin_bytes: int = 0) -> "Deployment":
        """This deployment with ``file_bytes`` set so that its flash prediction equals a measured file,
        and ``margin_bytes`` kept free below a flash budget."""
        return replace(self, file_bytes=self.file_bytes + measured_flash - predicted_flash, margin_bytes=margin_bytes)


FP32 = Deployment()
# NNCF INT8 on OpenVINO IR, measured on trained Spikformers: 1 B per weight entry, about 8 B per output channel of a
# quantized layer (its scale and its bias, batch norms folded in), the other tensors no separate bytes.
INT8 = Deployment("int8", weight_bytes=1, channel_bytes=8, other_bytes=0, activation_bytes=1, energy_precision="int8")
# NNCF weight compression (``nncf_int4``): matmul-like weights INT4 (half a byte), the other conv weights INT8, per
# output channel a scale (and for INT8 a zero point) plus the folded batch norm: 9.2 B fitted on the digits Spikformer
# pruned 0-60% (within 40 B of those files, 170 B of PrimeSVT-pruned ones). Weight-only: activations and arithmetic
# stay FP32.
INT4 = Deployment("int4", weight_bytes=1, channel_bytes=9.2, other_bytes=0, activation_bytes=4, matmul_weight_bytes=0.5,
                  weight_precision="int8", matmul_precision="int4")


# Convolutions whose kernel-1 form is a matrix product over the channel axis (SpikingJelly's multi-step
# wrappers only fold time into the batch around the same convolution)
POINTWISE_CONVS = (nn.Conv1d, nn.Conv2d, sj_layer.Conv1d, sj_layer.Conv2d)


def matmul_like(layer: nn.Module) -> bool:
    """A linear layer, or a plain convolution that is one (kernel 1, stride 1, no padding, no groups): what a
    runtime can hold as a MatMul, the only weights NNCF compresses below 8 bits."""
    if isinstance(layer, nn.Linear):
        return True
    # exact types: another subclass may compute something else in its forward
    return (type(layer) in POINTWISE_CONVS and layer.groups == 1 and layer.padding_mode == "zeros"
            and set(layer.kernel_size) == set(layer.stride) == {1} and layer.padding in ("valid", (0,), (0, 0)))


def quantized_weights(model: nn.Module, deployment: Deployment) -> dict[int, tuple[int, float]]:
    """``id(weight) -> (its output-channel dim, bytes per entry)`` for every conv/linear weight (what a quantizer
    quantizes), at ``deployment``'s precision."""
    def entry_bytes(layer):
        low = deployment.matmul_weight_bytes
        return low if low is not None and matmul_like(layer) else deployment.weight_bytes
    return {id(m.weight): (1 if getattr(m, "transposed", False) else 0, entry_bytes(m)) for m in model.modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight is not None}



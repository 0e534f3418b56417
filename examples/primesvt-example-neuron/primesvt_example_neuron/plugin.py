"""Hook implementations: the only file primesvt loads (entry point ``example_neuron``)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from primesvt_plugin import DataSplits, Deployment, OpenVINOArtifact, digits_splits, hookimpl, to_openvino_model
from spikingjelly.activation_based.model import spikformer

from .neuron import ChannelThresholdLIF


@hookimpl
def primesvt_spiking_layer_types():
    return [ChannelThresholdLIF]


@hookimpl
def primesvt_prune_spiking_layer(layer, idxs):
    if not isinstance(layer, ChannelThresholdLIF):
        return None
    removed = set(idxs)  # a sorted list[int] of the channels to remove
    keep = [i for i in range(layer.threshold.numel()) if i not in removed]
    # a new Parameter, frozen if the old one was (nn.Parameter defaults to requires_grad=True)
    layer.threshold = nn.Parameter(layer.threshold.data[keep].clone(), requires_grad=layer.threshold.requires_grad)
    return True


def example_spikformer(**args) -> nn.Module:
    """A Spikformer (any ``Spikformer`` argument) whose MLP hidden neurons are ChannelThresholdLIF."""
    model = spikformer.Spikformer(**args)
    for block in model.blocks:
        hidden = block.mlp.fc1[0].out_channels
        block.mlp.neuron1 = ChannelThresholdLIF(hidden)
    return model


def mirrored_digits(**args) -> DataSplits:
    """scikit-learn's digits, mirrored left-right (shows a plugin dataset in a recipe)."""
    splits = digits_splits(**args)
    return splits.map_images(lambda images: np.ascontiguousarray(images[..., ::-1]))


def export_state_dict_fp16(model: nn.Module, example_input: torch.Tensor, path, *, verification=None, calibration=None,
                           pm=None) -> list:
    """Write the model's parameters in half precision (``path`` + ``.fp16.pt``); a state dict runs nothing,
    so there is nothing to verify."""
    target = path.with_suffix(".fp16.pt")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, target)
    return [target]


export_state_dict_fp16.time_major = False


@hookimpl
def primesvt_export_forward(layer):
    if not isinstance(layer, ChannelThresholdLIF):
        return None

    def forward(x_seq: torch.Tensor) -> torch.Tensor:  # plain ops: exporters cannot trace the surrogate
        v, spikes = torch.zeros_like(x_seq[0]), []
        for x in x_seq:
            v = v + (x - v) / layer.tau
            spike = (v >= layer._threshold_like(x)).to(x.dtype)
            v = v * (1.0 - spike)
            spikes.append(spike)
        return torch.stack(spikes)

    return forward


def int8_weights_only(model, example_input, calibration, *, subset_size: int = 300, inference_precision: str = "f32",
                      pm=None):
    """NNCF weight-only INT8 compression (no calibration needed) on the OpenVINO IR."""
    import nncf

    return OpenVINOArtifact(nncf.compress_weights(to_openvino_model(model, example_input, pm)), inference_precision)


# What the quantizer's files hold: INT8 weights (1 B each) with per-channel scales, activations left in float
int8_weights_only.deployment = Deployment("int8-weights", weight_bytes=1, channel_bytes=8, other_bytes=4,
                                          activation_bytes=4, weight_precision="int8")
int8_weights_only.precisions = ("int8",)


@hookimpl
def primesvt_register(registrar):
    registrar.models.add("example_spikformer", example_spikformer)
    registrar.datasets.add("digits_mirrored", mirrored_digits)
    registrar.exporters.add("state_dict_fp16", export_state_dict_fp16)
    registrar.quantizers.add("int8_weights_only", int8_weights_only)

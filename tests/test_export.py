"""Exported neurons compute what SpikingJelly's kernels compute; exports match the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import functional, neuron

from primesvt_plugin.export import (ExportError, exportable, quantize_int8, run_openvino, to_onnx, to_openvino,
                                    to_openvino_model)
from primesvt_plugin.plugins import get_plugin_manager, hookimpl, new_plugin_manager
from primesvt_plugin.quantized import OpenVINOArtifact, load_quantized

from conftest import build

NEURONS = {
    "lif": lambda: neuron.LIFNode(step_mode="m"),
    "lif_soft_reset_no_decay_input": lambda: neuron.LIFNode(tau=3.0, v_reset=None, decay_input=False, step_mode="m"),
    "if": lambda: neuron.IFNode(v_threshold=0.7, step_mode="m"),
    "plif": lambda: neuron.ParametricLIFNode(init_tau=1.5, step_mode="m"),
}


@pytest.mark.parametrize("name", list(NEURONS))
def test_export_forward_equals_spikingjelly_neuron(name):
    layer = NEURONS[name]()
    x_seq = torch.randn(6, 3, 8, 5, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        expected = layer(x_seq)
        functional.reset_net(layer)
        got = get_plugin_manager().hook.primesvt_export_forward(layer=layer)(x_seq)
    assert expected.sum() > 0  # the neurons do fire on this input
    assert torch.equal(got, expected)


def test_example_plugin_export_forward_equals_its_neuron():
    example = pytest.importorskip("primesvt_example_neuron")
    layer = example.ChannelThresholdLIF(8)
    with torch.no_grad():
        layer.threshold.copy_(torch.linspace(0.2, 1.5, 8))
        x_seq = torch.rand(4, 2, 8, 3, generator=torch.Generator().manual_seed(0)) * 2
        expected = layer(x_seq)
        functional.reset_net(layer)
        got = get_plugin_manager().hook.primesvt_export_forward(layer=layer)(x_seq)
    assert expected.sum() > 0 and torch.equal(got, expected)


def test_model_without_exportable_neuron_is_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), neuron.QIFNode(step_mode="m"))
    with pytest.raises(ExportError, match=r"layer '1' \(QIFNode\)"):
        with exportable(model):
            pass
    assert "forward" not in model[1].__dict__


def firing(name: str) -> torch.nn.Module:
    """An untrained SViT whose batch norms are pushed above threshold, so its neurons fire."""
    model = build(name).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.mul_(3.0)
                m.bias.add_(1.5)
    return model


class SilentLIF:
    """A wrong export forward: never fires."""

    @hookimpl(tryfirst=True)
    def primesvt_export_forward(self, layer):
        return (lambda x_seq: (x_seq > 1e6).to(x_seq.dtype)) if isinstance(layer, neuron.LIFNode) else None


@pytest.mark.parametrize("export", [to_onnx, to_openvino], ids=["onnx", "openvino"])
def test_export_disagreeing_with_the_model_is_refused(export, tmp_path):
    pm = new_plugin_manager()
    pm.register(SilentLIF(), name="silent")
    path = tmp_path / ("m.onnx" if export is to_onnx else "m.xml")
    with pytest.raises(ExportError, match="disagrees with the PyTorch model"):
        export(firing("spikformer"), torch.rand(1, 3, 32, 32), path, pm)
    assert list(tmp_path.iterdir()) == []


def test_quantized_model_saves_and_loads_with_identical_outputs(tmp_path):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    artifact = OpenVINOArtifact(quantize_int8(firing("spikformer"), x[:1], [x[i:i + 1].numpy() for i in range(4)],
                                              subset_size=4))
    files = artifact.save(tmp_path / "model_int8")
    assert [f.name for f in files] == ["model_int8.xml", "model_int8.bin"]
    assert np.array_equal(load_quantized(files[0]).predict(x.numpy()), artifact.predict(x.numpy()))


@pytest.mark.parametrize("name", ["spikformer", "spike_driven_transformer", "qkformer", "maxformer"])
def test_openvino_fp32_matches_and_int8_runs(name):
    model = firing(name)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    functional.reset_net(model)
    with torch.no_grad():
        expected = model(x).numpy()
    functional.reset_net(model)
    assert np.abs(expected).sum() > 0
    ov_model = to_openvino_model(model, x[:1])
    np.testing.assert_allclose(run_openvino(ov_model, x.numpy()), expected, atol=1e-4)
    int8 = quantize_int8(model, x[:1], [x[i:i + 1].numpy() for i in range(2)], subset_size=2)
    assert run_openvino(int8, x.numpy()).shape == expected.shape

"""Exported neurons compute what SpikingJelly's kernels compute; exports match the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import functional, neuron

from pathlib import Path

from primesvt_plugin.deploy.export import (ExportError, Verification, compile_openvino, compiled_precision, exportable,
                                           predict_compiled, run_openvino, to_onnx, to_openvino, to_openvino_model)
from primesvt_plugin.deploy.quantization import OpenVINOArtifact, load_quantized, onnx_int8, quantize_int8
from primesvt_plugin.errors import CheckpointError
from primesvt_plugin.plugins import get_plugin_manager, hookimpl, new_plugin_manager

from svits import build, run

NEURONS = {
    "lif": lambda: neuron.LIFNode(step_mode="m"),
    "lif_soft_reset_no_decay_input": lambda: neuron.LIFNode(tau=3.0, v_reset=None, decay_input=False, step_mode="m"),
    "if": lambda: neuron.IFNode(v_threshold=0.7, step_mode="m"),
    "plif": lambda: neuron.ParametricLIFNode(init_tau=1.5, step_mode="m"),
}


@pytest.mark.parametrize("name", list(NEURONS))
def test_export_forward_equals_spikingjelly_neuron(name):
    """Exact: SpikingJelly 2.0 picks its neuron kernel by the tensor's device, and both run on CPU tensors
    in float32 with the same operations; CUDA/Triton kernels would only be chosen for CUDA tensors."""
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
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), neuron.LIFNode(step_mode="m"), torch.nn.Conv2d(4, 4, 1),
                                neuron.QIFNode(step_mode="m"))
    with pytest.raises(ExportError, match=r"layer '3' \(QIFNode\) has no exportable forward"):
        with exportable(model):
            pass


def test_export_forwards_are_removed_even_when_the_export_fails():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), neuron.LIFNode(step_mode="m"))
    with pytest.raises(RuntimeError, match="converter failed"):
        with exportable(model):
            assert "forward" in model[1].__dict__  # the plain-PyTorch forward is in place while exporting
            raise RuntimeError("converter failed")
    assert "forward" not in model[1].__dict__ and model.training


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


def many_images(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("export", [to_onnx, to_openvino], ids=["onnx", "openvino"])
def test_export_disagreeing_with_the_model_is_refused(export, tmp_path):
    pm = new_plugin_manager()
    pm.register(SilentLIF(), name="silent")
    model, x = firing("spikformer"), many_images()
    verification = Verification.of(model, x.numpy())
    assert (verification.reference.mean(0).argmax(-1) != 0).any()  # a silent model (argmax 0) must disagree
    path = tmp_path / ("m.onnx" if export is to_onnx else "m.xml")
    with pytest.raises(ExportError, match=r"agrees with the PyTorch model on \d+\.\d+% of 32 samples at f32"):
        export(model, x[:1], path, pm, verification=verification)
    assert list(tmp_path.iterdir()) == []


def bf16_or_skip(ov_model):
    """The model compiled with the bf16 hint, or skip where this CPU cannot run bf16 (read back, not assumed)."""
    compiled = compile_openvino(ov_model, "bf16")
    if compiled_precision(compiled) != "bf16":
        pytest.skip(f"this CPU runs bf16 requests at {compiled_precision(compiled)} (no AVX512/AMX BF16)")
    return compiled


def test_precision_is_forced_not_left_to_the_cpu_default():
    model, x = firing("spikformer"), many_images()
    ov_model = to_openvino_model(model, x[:1])
    f32 = compile_openvino(ov_model, "f32")
    assert compiled_precision(f32) == "f32"
    reference = Verification.of(model, x.numpy()).reference
    np.testing.assert_allclose(predict_compiled(f32, x.numpy()), reference, atol=1e-4)
    bf16 = bf16_or_skip(ov_model)
    # bf16 really computes differently: the hint is not ignored (the gap is what f32 pinning protects from)
    assert np.abs(predict_compiled(bf16, x.numpy()) - reference).max() > 1e-3


@pytest.mark.parametrize("export", [to_onnx, to_openvino], ids=["onnx", "openvino"])
def test_export_at_bf16_is_written_or_refused_by_its_agreement(export, tmp_path):
    model, x = firing("spikformer"), many_images()
    compiled = bf16_or_skip(to_openvino_model(model, x[:1]))
    agreement = float((predict_compiled(compiled, x.numpy()).mean(0).argmax(-1)
                        == Verification.of(model, x.numpy()).reference.mean(0).argmax(-1)).mean())
    path = tmp_path / ("m.onnx" if export is to_onnx else "m.xml")
    for threshold in (0.995, 0.5):
        verification = Verification.of(model, x.numpy(), precision="bf16", min_agreement=threshold)
        if agreement < threshold:  # decisions compared, never raw floats: refused with one line, nothing written
            with pytest.raises(ExportError, match=r"at bf16 \(needs") as refused:
                export(model, x[:1], path, verification=verification)
            assert "\n" not in str(refused.value) and list(tmp_path.iterdir()) == []
        else:
            files = export(model, x[:1], path, verification=verification)
            assert all(Path(f).is_file() for f in files)
            (result,) = verification.results.values()
            assert result["precision"] == "bf16" and result["agreement"] >= threshold


def test_every_openvino_compile_states_its_precision():
    """One place compiles OpenVINO models, with INFERENCE_PRECISION_HINT: nothing runs at the CPU's default."""
    package = Path(__file__).resolve().parents[1] / "primesvt_plugin"
    calls = {str(f.relative_to(package)) for f in package.rglob("*.py") if "compile_model(" in f.read_text()}
    assert calls == {"deploy/export.py"}
    assert "INFERENCE_PRECISION_HINT" in (package / "deploy" / "export.py").read_text()


def test_quantized_model_saves_and_loads_with_identical_outputs(tmp_path):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    artifact = OpenVINOArtifact(quantize_int8(firing("spikformer"), x[:1], [x[i:i + 1].numpy() for i in range(4)],
                                              subset_size=4))
    files = artifact.save(tmp_path / "model_int8")
    assert [f.name for f in files] == ["model_int8.xml", "model_int8.bin"]
    assert np.array_equal(load_quantized(files[0]).predict(x.numpy()), artifact.predict(x.numpy()))
    assert artifact.compiled_precision == load_quantized(files[0]).compiled_precision == "f32"


@pytest.mark.parametrize("damage", ["truncated", "random", "missing_bin", "onnx_beside_a_bin", "no_layers"])
def test_damaged_quantized_files_are_clear_errors(damage, tmp_path):
    x = many_images(2)
    files = OpenVINOArtifact(quantize_int8(firing("spikformer"), x[:1], [x[:1].numpy()], subset_size=1)).save(
        tmp_path / "model_int8")
    xml, bin_file = files
    if damage == "truncated":
        bin_file.write_bytes(bin_file.read_bytes()[:100])
    elif damage == "random":
        xml.write_bytes(np.random.default_rng(0).bytes(500))
    elif damage == "missing_bin":
        bin_file.unlink()
    elif damage == "onnx_beside_a_bin":  # a real model.onnx next to a model.bin: OpenVINO would read the ONNX
        import onnx
        from onnx import TensorProto, helper

        xml = xml.with_suffix(".onnx")
        images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])
        scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4])
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["images"], ["scores"])],
                                                      "identity", [images], [scores])), str(xml))
    else:
        xml.write_text('<?xml version="1.0"?><net name="empty" version="11"><layers/><edges/></net>')
    with pytest.raises(CheckpointError, match="model_int8"):
        load_quantized(xml)


@pytest.mark.parametrize("name", ["spikformer", "spike_driven_transformer", "qkformer", "maxformer"])
def test_openvino_fp32_matches_and_int8_runs(name):
    """At the pinned f32, whatever the CPU's default (bf16 on CPUs with native BF16)."""
    model, x = firing(name), many_images(16)
    verification = Verification.of(model, x.numpy(), min_agreement=0.0)
    assert np.abs(verification.reference).sum() > 0
    fp32 = verification.check("fp32", run_openvino(to_openvino_model(model, x[:1]), x.numpy()), "f32")
    # oneDNN and ATen kernels may round differently, and a membrane at the threshold then flips a spike:
    # allow one flipped decision in 16, and judge the logits by their median gap, which a flip does not move.
    assert fp32["agreement"] >= 15 / 16
    got = run_openvino(to_openvino_model(model, x[:1]), x.numpy())
    assert np.median(np.abs(got - verification.reference)) < 1e-4
    int8 = quantize_int8(model, x[:1], [x[i:i + 1].numpy() for i in range(16)], subset_size=16)
    # INT8 rounds activations and weights, so more spikes flip (measured 94-100% agreement on these models);
    # a quantization that broke the model would keep few of the PyTorch model's decisions.
    assert verification.check("int8", run_openvino(int8, x.numpy()), "f32")["agreement"] >= 0.75


def test_int8_onnx_is_qdq_and_keeps_the_models_decisions_on_onnxruntime(tmp_path):
    import onnx
    import onnxruntime as ort

    model, x = firing("spikformer"), many_images(32)
    verification = Verification.of(model, x.numpy(), min_int8_agreement=0.75)
    calibration = [x[i:i + 1].numpy() for i in range(16)]
    (path,) = onnx_int8(model, x[:1], tmp_path / "model_int8.onnx", calibration, verification, subset_size=16)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # judged independently of the exporter's own check: onnxruntime's decisions against PyTorch's
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = np.concatenate([session.run(None, {"images": x[i:i + 1].numpy()})[0] for i in range(32)], axis=1)
    agreement = (outputs.mean(0).argmax(-1) == verification.reference.mean(0).argmax(-1)).mean()
    assert agreement >= 0.75 and verification.results["INT8 ONNX (QDQ) export"]["agreement"] == agreement
    assert verification.results["INT8 ONNX (QDQ) export"]["precision"] == "int8 on onnxruntime"


def test_int8_onnx_disagreeing_with_the_model_is_refused_and_not_written(tmp_path):
    pm = new_plugin_manager()
    pm.register(SilentLIF(), name="silent")
    model, x = firing("spikformer"), many_images(32)
    verification = Verification.of(model, x.numpy(), min_int8_agreement=0.75)
    with pytest.raises(ExportError, match=r"INT8 ONNX \(QDQ\) export agrees with the PyTorch model on"):
        onnx_int8(model, x[:1], tmp_path / "m.onnx", [x[:1].numpy()], verification, subset_size=1, pm=pm)
    assert list(tmp_path.iterdir()) == []


# -- mixed INT4/INT8 weights (nncf_int4) ------------------------------------------------------

@pytest.mark.parametrize("name", ["spikformer", "spike_driven_transformer", "qkformer", "maxformer"])
def test_kernel_1_convolutions_become_matmuls_with_the_same_outputs(name):
    from primesvt_plugin.deploy.quantization import PointwiseMatMul, with_matmuls
    from primesvt_plugin.targets import matmul_like

    def pointwise(candidate):
        return [m for m in candidate.modules() if matmul_like(m) and not isinstance(m, torch.nn.Linear)]

    model, x = firing(name), many_images(4)
    before = pointwise(model)
    converted = with_matmuls(model).eval()
    assert before and pointwise(model) == before  # the original is left as it was
    assert len([m for m in converted.modules() if isinstance(m, PointwiseMatMul)]) == len(before)
    assert not pointwise(converted)
    assert torch.allclose(run(converted, x), run(model, x), atol=1e-5)


@pytest.mark.parametrize("layer, matmul", [
    (torch.nn.Conv1d(6, 4, 1), True), (torch.nn.Conv2d(6, 4, 1, bias=False), True), (torch.nn.Linear(6, 4), True),
    (torch.nn.Conv1d(6, 4, 1, groups=2), False), (torch.nn.Conv2d(6, 4, 1, stride=2), False),
    (torch.nn.Conv2d(6, 4, 1, padding=1), False), (torch.nn.Conv2d(6, 4, 3), False),
    (torch.nn.ConvTranspose2d(6, 4, 1), False), (torch.nn.Conv3d(6, 4, 1), False),
], ids=["conv1d", "conv2d-1x1", "linear", "grouped", "strided", "padded", "3x3", "transposed", "conv3d"])
def test_only_layers_that_are_matrix_products_become_matmuls_and_they_compute_the_same(layer, matmul):
    from primesvt_plugin.deploy.quantization import PointwiseMatMul, with_matmuls
    from primesvt_plugin.targets import matmul_like

    assert matmul_like(layer) == matmul
    model = with_matmuls(torch.nn.Sequential(layer)).eval()
    converted = isinstance(model[0], PointwiseMatMul)
    assert converted == (matmul and not isinstance(layer, torch.nn.Linear))  # a linear layer exports as MatMul
    shape = {torch.nn.Linear: (5, 6), torch.nn.Conv1d: (5, 6, 7), torch.nn.Conv3d: (5, 6, 3, 3, 3)}.get(
        type(layer), (5, 6, 7, 7))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), layer(x), atol=1e-6)
        if converted:  # a multi-step SpikingJelly layer's input: time ahead of the batch
            assert torch.allclose(model(x.unsqueeze(0).repeat(2, *[1] * x.dim())), layer(x).unsqueeze(0).repeat(
                2, *[1] * x.dim()), atol=1e-6)


def int4_constants(ov_model) -> int:
    """Weight constants stored at 4 bits in an OpenVINO model."""
    import openvino as ov

    return sum(1 for op in ov_model.get_ops() if op.get_type_name() == "Constant"
               and op.get_output_element_type(0) in (ov.Type.i4, ov.Type.u4))


def test_int4_reaches_every_matmul_layer_and_the_flash_ledger_predicts_the_file(tmp_path):
    """Weight compression: the matmul-like layers at INT4, the other convolutions INT8, a smaller file than
    NNCF INT8, decisions kept; the ledger calibrated on the unpruned file predicts a pruned model's file."""
    import primesvt_plugin as ps
    from primesvt_plugin.deploy.quantization import nncf_int4
    from primesvt_plugin.pruning.memory import flash_bytes
    from primesvt_plugin.targets import INT4, matmul_like

    model, x = firing("spikformer"), many_images(16)
    with torch.no_grad():  # batch norms as training leaves them: OpenVINO stores equal constants only once
        for bn in model.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                for tensor, low, high in ((bn.weight, 2.0, 4.0), (bn.bias, 1.0, 2.0), (bn.running_mean, -0.1, 0.1),
                                          (bn.running_var, 0.5, 2.0)):
                    tensor.uniform_(low, high)
    calibration = [x[i:i + 1].numpy() for i in range(8)]

    def written(candidate, name):
        artifact = nncf_int4(candidate, x[:1], calibration)
        return artifact, artifact.weight_bytes(artifact.save(tmp_path / name))

    int4, int4_bytes = written(model, "unpruned_int4")
    assert int4_constants(int4.ov_model) == sum(matmul_like(m) for m in model.modules()) > 0
    int8 = OpenVINOArtifact(quantize_int8(model, x[:1], calibration, subset_size=8))
    assert int4_bytes < 0.9 * int8.weight_bytes(int8.save(tmp_path / "int8"))
    verification = Verification.of(model, x.numpy(), min_agreement=0.0)
    assert verification.check("int4", int4.predict(x.numpy()), "f32")["agreement"] >= 0.75
    deployment = INT4.calibrated(flash_bytes(model, INT4), int4_bytes)
    ps.SpikingPruner(model, x[:1], pruning_ratio=0.4).step()
    _, pruned_bytes = written(model.eval(), "pruned_int4")
    assert pruned_bytes < 0.7 * int4_bytes
    assert abs(flash_bytes(model, deployment) - pruned_bytes) <= 0.005 * int4_bytes  # the runner's margin


def test_an_int4_group_size_the_widths_do_not_divide_is_one_clear_error():
    from primesvt_plugin.deploy.quantization import nncf_int4

    model, x = firing("spikformer"), many_images(2)
    with pytest.raises(ExportError, match="group_size 48.*prune.round_to"):
        nncf_int4(model, x[:1], [x[:1].numpy()], group_size=48)

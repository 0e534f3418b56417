"""Per-layer weight precision (issue 28, step 0): a hand-chosen INT4/INT8/FP32 assignment written to an OpenVINO IR
by NNCF and read back from the file."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based import layer as sj_layer

from primesvt_plugin.deploy.export import Verification
from primesvt_plugin.deploy.mixed_precision import (UnfoldMatMul, compress_per_layer, ir_weight_precisions, named_ir,
                                                    torch_layout, weighted_layers, weighted_ops)
from primesvt_plugin.deploy.quantization import OpenVINOArtifact
from primesvt_plugin.errors import ArgumentError, ExportError
from primesvt_plugin.plugins import build_model
from primesvt_plugin.pruning.spiking import fresh_forward

DIGITS = dict(T=2, in_channels=1, img_size_h=16, img_size_w=16, patch_size=4, num_classes=10, embed_dims=64,
              num_heads=4, mlp_ratio=4, depths=1)  # recipes/spikformer_digits.yaml
ASKED = {"blocks.0.attn.qkv_conv_bn.0": "int4", "blocks.0.mlp.fc1.0": "int4",
         "patch_embed.stages.3.conv_bn.block.0": "int4",  # a 3x3 convolution, through UnfoldMatMul
         "blocks.0.mlp.fc2.0": "int8", "head": "fp32"}  # every other layer: int8 by default


@pytest.fixture(scope="module", autouse=True)
def quiet_nncf():
    import nncf

    level = logging.getLogger("nncf").level
    nncf.set_log_level(logging.ERROR)  # no bit-width tables per pass
    yield
    nncf.set_log_level(level)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The digits Spikformer, untrained, its batch norms fitted to random images (so its neurons fire on some inputs
    and not others) and a wide random head centred on their outputs: decisions vary from image to image."""
    torch.manual_seed(0)
    model = build_model("spikformer", DIGITS)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                bn.reset_running_stats()
                bn.momentum = None  # one batch's statistics
                bn.weight.fill_(2.0)
                bn.bias.fill_(1.0)
        model.train()
        functional.reset_net(model)
        model(images(256, seed=1))
        functional.reset_net(model)
        model.head.weight.normal_(std=1.0)
        model.eval()
        model.head.bias.sub_(fresh_forward(model, images(256, seed=1)).mean((0, 1)))  # no class favoured
    return model


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    """``assignment -> (artifact, bytes of its .bin)`` for the assignments the tests compare, each written once."""
    folder = tmp_path_factory.mktemp("ir")
    layers = list(weighted_layers(model))
    artifacts = {tag: compress_per_layer(model, images(1), precisions) for tag, precisions in
                 {"int8": {}, "asked": ASKED, "int4": {name: "int4" for name in layers}}.items()}
    artifacts["fp32"] = OpenVINOArtifact(named_ir(model, images(1), ASKED)[0])  # ASKED's graph before NNCF
    return {tag: (artifact, artifact.weight_bytes(artifact.save(folder / f"{tag}.xml")), folder / f"{tag}.xml")
            for tag, artifact in artifacts.items()}


# -- UnfoldMatMul ------------------------------------------------------------------------------


@pytest.mark.parametrize("conv, shape", [
    (torch.nn.Conv2d(3, 8, 3, padding=1), (2, 3, 9, 9)),
    (torch.nn.Conv2d(3, 8, 3, bias=False), (2, 3, 9, 7)),
    (torch.nn.Conv2d(4, 5, (3, 2), stride=2, padding=(1, 0)), (3, 4, 11, 8)),
    (torch.nn.Conv2d(4, 5, 3, dilation=2, padding=2, stride=(1, 2)), (1, 4, 10, 10)),
    (torch.nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 7, 6)),
    (torch.nn.Conv2d(2, 3, 5, padding="valid"), (2, 2, 7, 6)),
    (torch.nn.Conv2d(6, 4, 1, stride=2), (2, 6, 7, 7)),
    (sj_layer.Conv2d(3, 8, 3, padding=1, step_mode="m"), (2, 3, 3, 8, 8)),  # time, batch, channels, h, w
], ids=["3x3-pad", "no-bias", "rect-stride", "dilated", "same-even", "valid", "1x1-strided", "multi-step"])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unfold_matmul_computes_the_convolution(conv, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(UnfoldMatMul(conv)(x), conv(x), atol=1e-5)


def test_a_grouped_convolution_has_no_unfolded_form():
    with pytest.raises(ExportError, match="groups=2"):
        UnfoldMatMul(torch.nn.Conv2d(4, 4, 3, groups=2))


# -- the route to the file ---------------------------------------------------------------------


def test_the_written_ir_holds_each_layer_at_the_precision_asked(model, written):
    import openvino as ov

    _, _, path = written["asked"]
    read = ov.Core().read_model(str(path))
    expected = {name: ASKED.get(name, "int8") for name in weighted_layers(model)}
    assert ir_weight_precisions(read) == expected
    kinds = {op.get_friendly_name(): (op.get_type_name(), constant.get_element_type().get_type_name())
             for op, _, constant in weighted_ops(read)}
    assert kinds["patch_embed.stages.3.conv_bn.block.0"] == ("MatMul", "i4")  # unfolded, then compressed
    assert kinds["patch_embed.stages.2.conv_bn.block.0"] == ("Convolution", "i8")
    assert kinds["head"] == ("MatMul", "f32")  # FP32 stays f32 in the file, not f16


def test_the_artifact_computes_the_model_with_the_weights_the_file_holds(model, written):
    """The IR (read back) runs the PyTorch model whose layers carry the IR's decompressed weights: as an FP32 export
    agrees with its model (one flipped decision in 16 allowed), on images whose decisions vary."""
    import openvino as ov

    read = ov.Core().read_model(str(written["asked"][2]))
    fp32 = decompressed_weights(written["fp32"][0].ov_model)  # the same graph before NNCF
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in decompressed_weights(read).items():
            layer = rounded.get_submodule(name)
            original = layer.weight.detach().double().flatten(1).numpy()
            # the IR holds W times a folded batch norm's per-row scale: undo it
            scale = (fp32[name] * original).sum(1) / (original * original).sum(1)
            layer.weight.copy_(torch.from_numpy(weight / scale[:, None]).reshape(layer.weight.shape))
    x = images(64).numpy()
    verification = Verification.of(rounded, x, min_agreement=0.0)
    assert len(set(verification.reference.mean(0).argmax(-1))) >= 4
    result = verification.check("per-layer IR", OpenVINOArtifact(read).predict(x), "f32")
    assert result["agreement"] >= 15 / 16
    # and the rounding is real: the original model's weights are not what the file holds
    assert torch.allclose(rounded.head.weight, model.head.weight)  # FP32
    assert not torch.allclose(rounded.get_submodule("blocks.0.mlp.fc1.0").weight,
                              model.get_submodule("blocks.0.mlp.fc1.0").weight)


def decompressed_weights(ov_model) -> dict[str, np.ndarray]:
    """Each layer's weight as the IR computes it (its decompression subgraph folded on the CPU), ``[out, -1]``."""
    import openvino as ov

    ops = weighted_ops(ov_model)
    results = [ov.opset13.result(op.input(port).get_source_output()) for op, port, _ in ops]
    outputs = ov.Core().compile_model(ov.Model(results, [], "weights"), "CPU")({})
    return {op.get_friendly_name(): torch_layout(op, port, outputs[i]) for i, (op, port, _) in enumerate(ops)}


def test_unknown_layers_and_precisions_are_refused_by_name(model):
    with pytest.raises(ArgumentError, match="unknown layer 'blocks.0.mlp.fc3'") as error:
        compress_per_layer(model, images(1), {**ASKED, "blocks.0.mlp.fc3": "int4"})
    assert "\n" not in str(error.value)
    with pytest.raises(ArgumentError, match="layer 'head': unknown precision 'int2'"):
        compress_per_layer(model, images(1), {"head": "int2"})


def test_int4_for_a_layer_nncf_cannot_reach_is_refused_saying_why():
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with pytest.raises(ExportError, match=r"layer '0' cannot be INT4: NNCF compresses only MatMul weights .*groups=2"):
        compress_per_layer(grouped, torch.rand(1, 4, 6, 6), {"0": "int4"})


def test_the_file_shrinks_as_layers_go_to_fewer_bits(written):
    sizes = [written[tag][1] for tag in ("fp32", "int8", "asked", "int4")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes

"""Per-layer weight precision on the OpenVINO IR: each conv/linear layer's weights at INT4, INT8 or FP32, as asked.

NNCF's ``compress_weights`` has one mode per call and ``ignored_scope`` leaves a layer in floating point, so the
assignment is written in two passes over the same IR: an INT4_SYM pass (no INT8 backup) that ignores every layer
not asked INT4, then an INT8_SYM pass that ignores the FP32 layers (weights already INT4 are no longer floating
point, and NNCF skips them). NNCF compresses only MatMul weights below 8 bits, so a layer asked INT4 is exported as
a MatMul first: kernel-1 convolutions as ``PointwiseMatMul`` (``with_matmuls``), k x k 2-d ones as
``UnfoldMatMul`` (im2col + MatMul).

The weighted IR operations are renamed after the PyTorch layers they compute (``model.named_modules()`` names),
so the written IR says which layer each weight belongs to; ``ir_weight_precisions`` reads them back.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import layer as sj_layer

from ..errors import ArgumentError, ExportError, first_line, shorten
from ..targets import matmul_like
from .export import cpu_model, to_openvino_model
from .quantization import OpenVINOArtifact, with_matmuls

LAYER_PRECISIONS = ("int4", "int8", "fp32")
DEFAULT_PRECISION = "int8"
ELEMENT_PRECISIONS = {"u4": "int4", "i4": "int4", "u8": "int8", "i8": "int8", "f32": "fp32", "f16": "fp32",
                      "bf16": "fp32"}
WEIGHTED_OPS = ("MatMul", "Convolution")
# operations between a weight Constant and the MatMul/Convolution using it (NNCF's decompression, layout changes)
DATA_PASS_THROUGH = ("Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze")
WEIGHT_ARITHMETIC = ("Multiply", "Subtract")
UNFOLDABLE_CONVS = (nn.Conv2d, sj_layer.Conv2d)


class UnfoldMatMul(nn.Module):
    """A 2-d convolution (groups 1, zero padding) computed as ``F.unfold`` + matmul, so that its weight is a MatMul
    constant in the exported graph (what NNCF compresses to INT4); same outputs as the convolution.

    Leading axes before ``[C, H, W]`` (batch, or time and batch of multi-step layers) are kept."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        why = unfold_refusal(conv)
        if why:
            raise ExportError(f"UnfoldMatMul: {why}")
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.pad = explicit_padding(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]
        images = x.reshape(-1, *x.shape[-3:])
        images = F.pad(images, self.pad) if any(self.pad) else images
        height, width = (output_size(images.shape[-2 + i], self.kernel_size[i], self.stride[i], self.dilation[i])
                         for i in range(2))
        columns = F.unfold(images, self.kernel_size, dilation=self.dilation, stride=self.stride)
        y = torch.matmul(self.weight, columns).reshape(*lead, -1, height, width)
        return y if self.bias is None else y + self.bias.view(-1, 1, 1)


def output_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Output length of an unpadded convolution along one axis."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``conv``'s zero padding as ``F.pad`` arguments (left, right, top, bottom); 'same' splits as PyTorch does."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        pads = []
        for kernel, dilation in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = dilation * (kernel - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    height, width = conv.padding
    return (width, width, height, height)


def unfold_refusal(conv: nn.Module) -> str:
    """Why ``conv`` has no ``UnfoldMatMul`` form ("" when it has one)."""
    if type(conv) not in UNFOLDABLE_CONVS:  # exact types: a subclass may compute something else
        return (f"{type(conv).__qualname__} is not a plain 2-d convolution (only nn.Conv2d and SpikingJelly's "
                "Conv2d are unfolded into a MatMul)")
    if conv.groups != 1:
        return f"a grouped convolution (groups={conv.groups}) is no single MatMul"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} is not unfolded (only zero padding)"
    return ""


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The conv/linear layers of ``model`` by their ``named_modules`` name: what gets a precision."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight is not None}


def checked_precisions(layers: dict[str, nn.Module], precisions: dict[str, str]) -> dict[str, str]:
    """Every layer's precision (unlisted ones ``DEFAULT_PRECISION``); refuses an unknown layer or precision and
    INT4 for a layer that cannot be written as a MatMul."""
    for name, precision in precisions.items():
        if name not in layers:
            raise ArgumentError(f"unknown layer {name!r} in precisions: not a conv/linear layer of the model "
                                f"(those are {shorten(', '.join(layers), 300)})")
        if precision not in LAYER_PRECISIONS:
            raise ArgumentError(f"layer {name!r}: unknown precision {precision!r}; use one of {LAYER_PRECISIONS}")
        layer = layers[name]
        if precision == "int4" and not matmul_like(layer) and unfold_refusal(layer):
            raise ExportError(f"layer {name!r} cannot be INT4: NNCF compresses only MatMul weights below 8 bits, "
                              f"and {unfold_refusal(layer)}")
    return {name: precisions.get(name, DEFAULT_PRECISION) for name in layers}


def with_int4_matmuls(model: nn.Module, precisions: dict[str, str]) -> nn.Module:
    """A copy of ``model`` whose kernel-1 convolutions are ``PointwiseMatMul`` and whose k x k convolutions asked
    INT4 are ``UnfoldMatMul``: every layer asked INT4 is a MatMul; names are unchanged."""
    model = with_matmuls(model)
    for name, module in list(model.named_modules()):
        if precisions.get(name) == "int4" and isinstance(module, nn.modules.conv._ConvNd):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, UnfoldMatMul(module))
    return model


def weight_constant(output):
    """The Constant holding the weight that ``output`` (an op's input source) carries, through NNCF's
    decompression and layout ops; None when it carries activations."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return node
    if kind in DATA_PASS_THROUGH:
        return weight_constant(node.input(0).get_source_output())
    if kind in WEIGHT_ARITHMETIC:  # weight (first, largest) times a scale, minus a zero point
        constants = [weight_constant(i.get_source_output()) for i in node.inputs()]
        if any(c is None for c in constants):
            return None
        return max(constants, key=lambda c: int(np.prod(c.get_output_shape(0))))
    return None


def weighted_ops(ov_model) -> list[tuple[object, int, object]]:
    """``(op, weight input port, weight Constant)`` of every MatMul/Convolution with a constant weight, in order."""
    found = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in WEIGHTED_OPS:
            continue
        ports = (1,) if op.get_type_name() == "Convolution" else (1, 0)
        for port in ports:
            constant = weight_constant(op.input(port).get_source_output())
            if constant is not None:
                found.append((op, port, constant))
                break
    return found


def torch_layout(op, port: int, weight: np.ndarray) -> np.ndarray:
    """``weight`` (what input ``port`` of ``op`` holds) as a PyTorch layer holds it, flattened to ``[out, -1]``."""
    weight = np.asarray(weight, dtype=np.float64)
    if op.get_type_name() == "MatMul":
        if weight.ndim != 2:
            return weight.reshape(weight.shape[0], -1)
        attributes = op.get_attributes()
        transposed = attributes["transpose_b"] if port == 1 else attributes["transpose_a"]
        weight = weight if transposed == (port == 1) else weight.T  # [out, in] is (x @ W.T) or (W @ x)
    return weight.reshape(weight.shape[0], -1)


def same_up_to_row_scale(ir_weight: np.ndarray, weight: np.ndarray) -> bool:
    """Whether ``ir_weight`` is ``weight`` with each output row scaled (a batch norm folded into it)."""
    if ir_weight.shape != weight.shape:
        return False
    scale = (ir_weight * weight).sum(1) / np.maximum((weight * weight).sum(1), 1e-30)
    return np.allclose(ir_weight, scale[:, None] * weight, rtol=1e-4, atol=1e-6 * np.abs(ir_weight).max())


def layer_of_ops(ov_model, layers: dict[str, nn.Module]) -> dict[str, list[object]]:
    """``layer name -> [its MatMul/Convolution ops]`` in the converted (uncompressed) ``ov_model``: by the weight
    Constant's traced name (``self.model.<layer>.weight``), else by value (a folded batch norm renames it and
    scales each output row). Refuses a layer found nowhere or a weight matching two layers."""
    by_name = {f"self.model.{name}.weight": name for name in layers}
    weights = {name: layer.weight.detach().double().flatten(1).numpy() for name, layer in layers.items()}
    found: dict[str, list[object]] = {name: [] for name in layers}
    for op, port, constant in weighted_ops(ov_model):
        name = by_name.get(constant.get_friendly_name())
        if name is None:
            ir_weight = torch_layout(op, port, constant.get_data())
            matches = [n for n, w in weights.items() if same_up_to_row_scale(ir_weight, w)]
            if len(matches) > 1:
                raise ExportError(f"the OpenVINO weight of {op.get_friendly_name()!r} matches layers "
                                  f"{', '.join(matches)}: cannot tell which it is")
            name = matches[0] if matches else None
        if name is not None:
            found[name].append(op)
    missing = [name for name, ops in found.items() if not ops]
    if missing:
        raise ExportError(f"layer {missing[0]!r} has no MatMul/Convolution weight in the OpenVINO graph "
                          "(folded or computed otherwise): its precision cannot be set")
    return found


def name_ops_after_layers(found: dict[str, list[object]]) -> dict[str, list[str]]:
    """Rename each layer's ops to the layer's name (``name#2``... for further uses of one weight); their names."""
    names = {}
    for layer, ops in found.items():
        names[layer] = [layer if i == 0 else f"{layer}#{i + 1}" for i in range(len(ops))]
        for op, name in zip(ops, names[layer]):
            op.set_friendly_name(name)
    return names


def compress_pass(ov_model, mode, ignored: list[str], **options):
    """One ``nncf.compress_weights`` pass at ``mode``, leaving the ops named ``ignored`` as they are."""
    import nncf

    try:
        return nncf.compress_weights(ov_model, mode=mode, ignored_scope=nncf.IgnoredScope(names=ignored), **options)
    except Exception as error:
        raise ExportError(f"NNCF {mode.value} pass failed: {first_line(error)}") from error


def named_ir(model: nn.Module, example_input: torch.Tensor, precisions: dict[str, str], pm=None):
    """The FP32 OpenVINO IR ``compress_per_layer`` compresses (every layer asked INT4 a MatMul, each layer's
    MatMul/Convolution named after it), with ``{layer: [its op names]}``."""
    precisions = checked_precisions(weighted_layers(model), precisions)
    exported = with_int4_matmuls(cpu_model(model), precisions)
    ov_model = to_openvino_model(exported, example_input, pm)
    layers = {name: exported.get_submodule(name) for name in precisions}
    return ov_model, name_ops_after_layers(layer_of_ops(ov_model, layers))


def compress_per_layer(model: nn.Module, example_input: torch.Tensor, precisions: dict[str, str],
                       pm=None) -> OpenVINOArtifact:
    """The OpenVINO IR of ``model`` with each conv/linear layer's weights at ``precisions[name]`` ("int4", "int8"
    or "fp32"; layers not listed "int8"); activations stay FP32. Checked on the result: every layer's weight has
    the element type asked (``ir_weight_precisions``)."""
    import nncf

    precisions = checked_precisions(weighted_layers(model), precisions)
    ov_model, names = named_ir(model, example_input, precisions, pm)
    ops_at = {p: [n for layer, ns in names.items() if precisions[layer] == p for n in ns] for p in LAYER_PRECISIONS}
    # weighted ops of no conv/linear layer (a constant matrix in a forward) go with the unlisted layers: INT8
    not_int4 = [op.get_friendly_name() for op, _, _ in weighted_ops(ov_model)
                if op.get_friendly_name() not in set(ops_at["int4"])]
    if ops_at["int4"]:
        backup = {"backup_mode": nncf.BackupMode.NONE} if hasattr(nncf, "BackupMode") else {}
        ov_model = compress_pass(ov_model, nncf.CompressWeightsMode.INT4_SYM, not_int4, ratio=1.0, all_layers=True,
                                 group_size=-1, **backup)
    if len(not_int4) > len(ops_at["fp32"]):
        ov_model = compress_pass(ov_model, nncf.CompressWeightsMode.INT8_SYM, ops_at["fp32"])
    written = ir_weight_precisions(ov_model)
    wrong = [layer for layer in precisions if written.get(layer) != precisions[layer]]
    if wrong:
        raise ExportError(f"layer {wrong[0]!r} came out {written.get(wrong[0])} from NNCF, asked "
                          f"{precisions[wrong[0]]}")
    return OpenVINOArtifact(ov_model)


def ir_weight_precisions(ov_model) -> dict[str, str]:
    """``layer name -> "int4" | "int8" | "fp32"``: the element type of each weight Constant in an IR written by
    ``compress_per_layer`` (its MatMul/Convolution ops bear the layers' names), read from the graph."""
    precisions = {}
    for op, _, constant in weighted_ops(ov_model):
        element = constant.get_element_type().get_type_name()
        precisions[op.get_friendly_name().split("#")[0]] = ELEMENT_PRECISIONS.get(element, element)
    return precisions

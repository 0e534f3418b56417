"""The primesvt plugin contract.

A plugin is any module or object carrying functions decorated with
``primesvt_plugin.hookimpl`` whose names match the specifications below.
Plugins are found through the ``primesvt`` entry-point group, e.g. in a
third party's ``pyproject.toml``::

    [project.entry-points.primesvt]
    my_neurons = "my_package.primesvt_hooks"

Our own builtins (``primesvt_plugin.builtins.*``) are declared the same way and
load through the same path, so anything they do a third party can do too.

Hooks returning a ``dict`` of named factories are merged over all plugins; a
name registered twice is an error (see ``primesvt_plugin.plugins``).
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("primesvt")


# -- pruning: layers and attention ---------------------------------------------


@hookspec
def primesvt_spiking_layer_types():
    """Return the stateful, channel-wise layer classes (spiking neurons) this plugin handles.

    A handled layer is treated as channel-transparent by the dependency graph:
    channel ``c`` of its input is channel ``c`` of its output, and pruning that
    channel also removes it from the layer's state. Subclasses of a returned
    class are handled too. Any ``spikingjelly`` ``MemoryModule`` with state that
    no plugin handles makes pruning stop with an error naming the module.
    """


@hookspec(firstresult=True)
def primesvt_prune_spiking_layer(layer, idxs):
    """Remove channels ``idxs`` from the per-channel parameters of ``layer``.

    Called for every spiking layer in a pruned group. Return ``True`` when this
    plugin handled the layer (the first ``True`` wins). Layers whose state is
    re-created on ``reset_net`` and that hold no per-channel parameters need
    nothing removed, but a plugin must still claim them.
    """


@hookspec(firstresult=True)
def primesvt_export_forward(layer):
    """Return a plain-PyTorch multi-step forward ``f(x_seq) -> spikes`` for ``layer``, or ``None``.

    Exporters (ONNX, OpenVINO, and NNCF quantization through OpenVINO) trace the
    model; SpikingJelly's fused neuron kernels are custom operators no exporter
    can convert, so while exporting each spiking layer runs this forward
    instead. It must compute what the layer computes at inference, from a
    fresh state (the exporter resets the model before every call).
    """


@hookspec(firstresult=True)
def primesvt_attention_layout(module):
    """Describe ``module`` as a spiking self-attention block, or return ``None``.

    Return a ``primesvt_plugin.attention.AttentionLayout`` naming the layers that
    read and write the residual stream, the q/k/v (inner) layers and their
    chunking, the number of heads, and how to update the module's attributes
    (``head_dim``, ``dim``) after pruning. The pruning engine keeps heads
    aligned: every head loses the same number of dimensions.
    """


@hookspec
def primesvt_importances():
    """Return ``{name: factory}`` of importance criteria usable by name.

    ``factory(**kwargs)`` returns a ``torch_pruning.importance.Importance``.
    Names are what recipes put in ``prune.importance``.
    """


# -- recipes: models, data, quantizers, exporters ------------------------------


@hookspec
def primesvt_model_builders():
    """Return ``{name: builder}``; ``builder(**args)`` returns an ``nn.Module``.

    Names are what recipes put in ``model.name``.
    """


@hookspec
def primesvt_datasets():
    """Return ``{name: loader}``; ``loader(**args)`` returns a ``primesvt_plugin.data.DataSplits``.

    Names are what recipes put in ``data.name``.
    """


@hookspec
def primesvt_quantizers():
    """Return ``{name: quantize}``.

    ``quantize(model, example_input, calibration, **args)`` gets the FP32 model,
    one example batch and an iterable of calibration batches (numpy arrays), and
    returns an artifact with ``save(path) -> list[Path]``, ``predict(images) ->
    outputs``, ``latency_ms(image) -> float`` and ``weight_bytes(files) -> int``
    (``primesvt_plugin.quantized.OpenVINOArtifact`` is one).
    Names are what recipes put in ``quantize.method``.
    """


@hookspec
def primesvt_exporters():
    """Return ``{name: export}``.

    ``export(model, example_input, path)`` writes files named after ``path``
    (a stem; the exporter picks the suffix) and returns the list of files written. Names are what recipes put in ``export.formats``.
    """

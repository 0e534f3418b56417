"""The primesvt plugin contract.

A plugin is any module or object carrying functions decorated with
``primesvt_plugin.hookimpl`` whose names match the specifications below.
Plugins are found through the ``primesvt`` entry-point group, e.g. in a
third party's ``pyproject.toml``::

    [project.entry-points.primesvt]
    my_neurons = "my_package.primesvt_hooks"

Our own builtins (``primesvt_plugin.builtins.*``) are listed by module name
(``plugins.DEFAULT_PLUGINS``, as pytest's ``default_plugins``) and registered through
the same calls, so anything they do a third party can do too.

Named factories (models, datasets, importances, quantizers, exporters) are added
through one hook, ``primesvt_register``, which receives a ``Registrar`` (the way
tox's ``tox_register_tox_env(register)`` does); a name registered twice is an
error naming both plugins, and a factory not following its kind's protocol
(``primesvt_plugin/registry.py``) is refused naming the plugin. The 0.1 hooks
returning ``{name: factory}`` dicts were removed in 0.3; a plugin still
implementing one is refused with the line that replaces it.

A ``primesvt_*`` function with no specification here makes registering the plugin
fail with an error naming it (and the hook it probably meant); one without
``@hookimpl`` warns that it is never called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from .registry import Registrar
    # AttentionLayout (primesvt_plugin.AttentionLayout) lives in pruning/, which builds on this contract: the
    # annotation names it without importing it

hookspec = pluggy.HookspecMarker("primesvt")
hookimpl = pluggy.HookimplMarker("primesvt")  # what plugins decorate their implementations with


# -- pruning: layers and attention ---------------------------------------------
#
# The per-module hooks (``primesvt_prune_spiking_layer``, ``primesvt_export_forward``,
# ``primesvt_attention_layout``) are ``firstresult``: they are called for modules of
# every plugin's types, so an implementation returns ``None`` for a module it does
# not know, and the first non-``None`` answer wins.


@hookspec
def primesvt_spiking_layer_types() -> list[type]:
    """Return the stateful, channel-wise layer classes (spiking neurons) this plugin handles.

    A handled layer is treated as channel-transparent by the dependency graph:
    channel ``c`` of its input is channel ``c`` of its output, and pruning that
    channel also removes it from the layer's state. Subclasses of a returned
    class are handled too. Any ``spikingjelly`` ``MemoryModule`` with state that
    no plugin handles (outside an attention block, see
    ``primesvt_attention_layout``) makes pruning stop with an error naming the module.

    Every handled layer in a model is passed to ``primesvt_prune_spiking_layer``
    when its channels are pruned, so a plugin returning a class must also claim
    its layers there.

    :returns: a list of classes (all plugins' lists are concatenated).
    """


@hookspec(firstresult=True)
def primesvt_prune_spiking_layer(layer: nn.Module, idxs: list[int]) -> bool | None:
    """Remove channels ``idxs`` from the per-channel parameters of ``layer``, in place.

    Called for every spiking layer (of a type from ``primesvt_spiking_layer_types``)
    in a pruned group, while the group's convolutions are cut.

    Replace each per-channel tensor by its kept slice and keep its
    ``requires_grad`` (a frozen parameter must stay frozen)::

        keep = [i for i in range(len(layer.threshold)) if i not in set(idxs)]
        layer.threshold = nn.Parameter(layer.threshold.data[keep].clone(),
                                       requires_grad=layer.threshold.requires_grad)

    Registered buffers are replaced the same way (``layer.register_buffer``).
    Neuron *state* (membrane potential, registered with ``register_memory``)
    need not be cut: the engine calls ``functional.reset_net`` after every
    structural change, and state is rebuilt from the next input. Layers with no
    per-channel parameters need nothing removed, but a plugin must still claim
    them by returning ``True``, or pruning stops with an error.

    :param layer: the spiking layer (an ``nn.Module``), in its current width.
    :param idxs: the channels to REMOVE: a sorted ``list[int]`` of distinct
        indices into the layer's current channels (``0 <= i < channels``).
    :returns: ``True`` when this plugin handled ``layer``; ``None`` for a layer it
        does not know. firstresult: the first non-``None`` answer wins, later
        plugins are not called.
    """


@hookspec(firstresult=True)
def primesvt_export_forward(
        layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Return a plain-PyTorch multi-step forward ``f(x_seq) -> spikes`` for ``layer``, or ``None``.

    Exporters (ONNX, OpenVINO, TorchScript, and NNCF quantization through
    OpenVINO) trace the model; SpikingJelly's fused neuron kernels are custom
    operators no exporter can convert, so while exporting each spiking layer
    runs this forward instead. It must compute what the layer computes at
    inference, from a fresh state (the exporter resets the model before every
    call), using only traceable tensor operations (no Python branches on values,
    no surrogate-gradient functions).

    :param layer: a spiking layer of the model being exported.
    :returns: ``f(x_seq)`` taking ``[T, N, ...]`` and returning the spikes with the
        same shape, or ``None`` for a layer this plugin does not know.
        firstresult: the first non-``None`` answer wins. A spiking layer no
        plugin answers for makes the export fail with an error naming it.
    """


@hookspec(firstresult=True)
def primesvt_attention_layout(module: nn.Module) -> AttentionLayout | None:  # noqa: F821
    """Describe ``module`` as a spiking self-attention block, or return ``None``.

    Called for every submodule of a model whenever a pruning graph is built.
    The returned ``primesvt_plugin.AttentionLayout`` names the layers
    that read and write the residual stream, the q/k/v (inner) layers and their
    chunking, the neurons inside, the number of heads, and how to update the
    module's attributes (``head_dim``, ``dim``) after pruning; its docstring
    defines every field. The whole block becomes one channel-transparent node
    of the dependency graph, and the engine keeps heads aligned: every head
    loses the same number of dimensions.

    :param module: any submodule of the model being pruned.
    :returns: an ``AttentionLayout`` for ``module``, or ``None`` when ``module``
        is not an attention block this plugin knows. firstresult: the first
        non-``None`` answer wins.
    """


# -- named factories: models, data, importances, quantizers, exporters ------------


@hookspec
def primesvt_register(registrar: Registrar) -> None:
    """Add this plugin's named factories to ``registrar`` (a ``primesvt_plugin.Registrar``)::

        @hookimpl
        def primesvt_register(registrar):
            registrar.models.add("my_svit", build_my_svit)
            registrar.exporters.add("tflite", export_tflite)

    Each registry maps the names recipes use to a factory, called exactly as below
    (``primesvt_plugin/registry.py`` declares these protocols; a factory that cannot be
    called this way, or lacks a declared attribute, is refused when it is added, naming
    the plugin):

    - ``registrar.models``: ``builder(**model.args) -> nn.Module``; recipe ``model.name``.
      The model takes one batch; a multi-step model stores its time steps as an integer
      ``T`` attribute (tracing sets it to 1), unless every SpikingJelly layer of it runs
      multi-step and its input is time-major ``[T, N, ...]``.
    - ``registrar.datasets``: ``loader(*, seed, **data.args)`` returns a
      ``primesvt_plugin.Datasets`` (torch Datasets ``train``, ``val``, ``test`` of
      ``(image, label)``, ``num_classes``, optional ``augment``, ``time_major``) or a
      ``primesvt_plugin.DataSplits`` (arrays ``x_train``, ``y_train``, ``x_val``, ``y_val``,
      ``x_test``, ``y_test``, ``num_classes``); ``seed`` is the recipe's, for random splits.
      Recipe ``data.name``; a ``DataError`` it raises is bad input (exit 2).
    - ``registrar.importances``: ``factory(**prune.importance_args)`` returns a
      ``torch_pruning.importance.Importance``; recipe ``prune.importance``.
    - ``registrar.quantizers``: ``quantize(model, example_input, calibration, *,
      subset_size, inference_precision, pm, **quantize.args)`` gets the FP32 model, one
      example batch, a list of calibration batches (numpy arrays), how many of them to
      use, the precision its floating-point operations must run at (``"f32"``, ``"bf16"``,
      ``"f16"``: never the CPU's default) and the plugin manager (for export forwards of
      other plugins' neurons). It returns an artifact with ``save(path) -> list[Path]``,
      ``predict(images) -> outputs``, ``latency_ms(image) -> float`` and
      ``weight_bytes(files) -> int`` (``primesvt_plugin.OpenVINOArtifact`` is one; a
      ``compiled_precision`` attribute is recorded in the report). The function declares
      ``deployment`` (a ``primesvt_plugin.Deployment``: the bytes its files take, at which
      flash budgets are searched), ``precisions`` (a tuple of the weight precisions it can
      write, e.g. ``("int8",)``) and may declare ``arguments`` (a pydantic model of its
      ``quantize.args``, checked by ``primesvt validate`` and before training). Recipe
      ``quantize.method``.
    - ``registrar.exporters``: ``export(model, example_input, path, *, verification,
      calibration, pm) -> list[Path]`` writes files named after ``path`` (a ``pathlib.Path``
      stem; the exporter picks the suffix). ``verification`` is a
      ``primesvt_plugin.Verification`` (test images, the PyTorch model's outputs on them,
      ``min_agreement``, ``precision``): the exporter runs its artifact on
      ``verification.images`` and calls ``verification.check(what, outputs, precision)``,
      which raises ``ExportError`` below the agreement asked (nothing may then be written;
      an export quantized on the way passes ``min_agreement=verification.min_int8_agreement``);
      after it returns, every result it recorded is held to the bar again, so an export
      below it fails the run like a builtin one. ``calibration`` is a list of one-image
      batches of training images (for an exporter quantizing on the way). The function
      declares ``time_major`` (``True``: it exports models stepped over event frames, and
      ``example_input`` and the verification images are ``[T, N, ...]`` frames). Recipe
      ``export.formats``.

    A name another plugin already registered raises ``PluginError`` naming both
    plugins; rename yours.

    :param registrar: a ``primesvt_plugin.Registrar``; call ``add(name, factory)`` on its
        registries (``models``, ``datasets``, ``importances``, ``quantizers``, ``exporters``).
    :returns: nothing (``None``); every plugin's implementation is called.
    """

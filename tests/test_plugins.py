"""The plugin contract: builtins by module name, entry points, the checks every plugin and factory passes."""
from __future__ import annotations

import contextlib
import sys
import textwrap
from importlib import metadata

import numpy as np
import pydantic
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import base, neuron

from primesvt_plugin import INT8, ExportError, RecipeError, SpikingGraph, SpikingPruner, UnhandledLayerError
from primesvt_plugin.pipeline.preflight import preflight
from primesvt_plugin.pipeline.recipe import load_recipe
from primesvt_plugin.pipeline.runner import run_recipe
from primesvt_plugin.plugins import (PluginError, get_plugin_manager, hookimpl, new_plugin_manager, plugin_details,
                                     plugin_table, registries, spiking_layer_types)
from primesvt_plugin.pruning.spiking import fresh_forward

BUILTINS = ["neurons", "attention", "importances", "models", "datasets", "quantizers", "exporters"]


def builtins_only():
    return new_plugin_manager(load_entry_points=False)


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


class Registers:
    """A plugin adding ``factory`` as ``kind`` ``name`` (counts how often primesvt asks it)."""

    def __init__(self, kind, name, factory):
        self.kind, self.name, self.factory, self.calls = kind, name, factory, 0

    @hookimpl
    def primesvt_register(self, registrar):
        self.calls += 1
        getattr(registrar, self.kind).add(self.name, self.factory)


def with_attributes(function, **attributes):
    function.__dict__.update(attributes)
    return function


def quantizer_with(**attributes):  # a fresh function each time: the attributes are its own
    def quantizer(model, example_input, calibration, *, subset_size, inference_precision, pm): ...
    return with_attributes(quantizer, **attributes)


def exporter_with(**attributes):
    def exporter(model, example_input, path, *, verification, calibration, pm): ...
    return with_attributes(exporter, **attributes)


def loader_with_seed(*, seed, image_size=8): ...


def loader_without_seed(image_size=8): ...


# -- loading ----------------------------------------------------------------------------


def test_builtins_are_registered_by_module_name_not_entry_points():
    assert plugin_table(builtins_only()) == [(name, f"primesvt_plugin.builtins.{name}", "primesvt-plugin (builtin)")
                                             for name in BUILTINS]
    assert [ep for ep in metadata.entry_points(group="primesvt") if ep.dist.name == "primesvt-plugin"] == []
    registrar = registries(builtins_only())
    assert registrar.models.owner("spikformer") == "models" and registrar.exporters.owner("nir") == "exporters"
    assert registrar.importances.names("importances") == ["l1", "l2", "memory", "random", "taylor"]
    with pytest.raises(PluginError, match=r"^unknown quantizer 'int2'; available: nncf_int4, nncf_int8$"):
        registrar.quantizers["int2"]
    pm = builtins_only()
    pm.register(Registers("importances", "mine", lambda **kw: None), name="mine")
    assert plugin_table(pm)[-1][::2] == ("mine", "(registered in code)")


def test_an_entry_point_failing_to_import_is_one_line_naming_it_and_its_distribution(tmp_path, monkeypatch):
    (tmp_path / "broken_primesvt_hooks.py").write_text("import primesvt_missing_dependency\n")
    info = tmp_path / "broken_primesvt-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-primesvt\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[primesvt]\nbroken = broken_primesvt_hooks\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # installed, as far as importlib.metadata can tell
    with pytest.raises(PluginError) as error:
        new_plugin_manager()
    assert one_line(error) == (
        "plugin 'broken' (broken_primesvt_hooks, from broken-primesvt) fails to import: ModuleNotFoundError: "
        "No module named 'primesvt_missing_dependency'; fix or uninstall it")
    assert "broken_primesvt_hooks" not in sys.modules


# -- what check_plugin refuses when a plugin is registered -------------------------------


def test_a_misspelled_hook_is_refused_with_a_did_you_mean():
    class Typo:
        primesvt_notes = "not callable: no hook, not refused"

        @hookimpl
        def primesvt_registr(self, registrar):
            pass

    pm = builtins_only()
    with pytest.raises(PluginError) as error:
        pm.register(Typo(), name="typo")
    assert one_line(error).startswith("plugin 'typo': primesvt_registr is no primesvt hook; did you mean "
                                      "primesvt_register? (the hooks: primesvt_attention_layout, ")
    assert pm.get_plugin("typo") is None


@pytest.mark.parametrize("hook, registry", [("primesvt_model_builders", "models"), ("primesvt_datasets", "datasets"),
                                            ("primesvt_importances", "importances"),
                                            ("primesvt_quantizers", "quantizers"), ("primesvt_exporters", "exporters")])
def test_removed_0_1_hooks_are_refused_in_one_line_naming_the_release_and_the_replacement(hook, registry):
    old_style = type("OldStyle", (), {hook: hookimpl(lambda self: {"x": lambda **kw: None})})
    pm = builtins_only()
    with pytest.raises(PluginError) as error:
        pm.register(old_style(), name="old")
    assert one_line(error) == (f"plugin 'old': hook {hook} was removed in primesvt-plugin 0.3; implement "
                               f"primesvt_register(registrar): registrar.{registry}.add(name, factory) instead "
                               "(docs/plugins.md)")
    assert pm.get_plugin("old") is None


def test_a_hook_without_hookimpl_warns_that_it_is_never_called():
    class Unmarked:
        def primesvt_register(self, registrar):
            registrar.importances.add("unmarked", lambda **kw: None)

    pm = builtins_only()
    with pytest.warns(UserWarning, match=r"^plugin 'unmarked': primesvt_register is not decorated with "
                                         r"@primesvt_plugin.hookimpl and is never called$"):
        pm.register(Unmarked(), name="unmarked")
    assert "unmarked" not in registries(pm).importances


# -- what the hooks return ---------------------------------------------------------------


def test_primesvt_register_returning_a_value_is_refused():
    class ReturnsDict:  # the 0.1 habit: {name: factory}
        @hookimpl
        def primesvt_register(self, registrar):
            return {"l3": lambda **kw: None}

    pm = builtins_only()
    pm.register(ReturnsDict(), name="dict_plugin")
    with pytest.raises(PluginError) as error:
        registries(pm)
    assert one_line(error) == ("plugin 'dict_plugin': primesvt_register returned a dict; it adds its factories with "
                               "registrar.<kind>.add(name, factory) and returns nothing")


@pytest.mark.parametrize("answer", [neuron.LIFNode, ["LIFNode"], [neuron.LIFNode, neuron.LIFNode(step_mode="m")],
                                    None])
def test_spiking_layer_types_must_be_a_list_of_classes(answer):
    class Types:
        @hookimpl
        def primesvt_spiking_layer_types(self):
            return answer

    pm = builtins_only()
    assert neuron.LIFNode in spiking_layer_types(pm)  # the builtins' answer passes
    pm.register(Types(), name="types")
    with pytest.raises(PluginError) as error:
        spiking_layer_types(pm)
    shown = " ".join(repr(answer).split())  # an instance's repr spans lines; the message does not
    assert one_line(error) == (f"plugin 'types': primesvt_spiking_layer_types returned {shown}; it returns a list "
                               "of classes (e.g. [MyNeuron])")


# -- the registries: protocols, duplicates, cache -----------------------------------------


@pytest.mark.parametrize("kind, name, factory, refusal", [
    ("quantizers", "q", quantizer_with(precisions=("int8",)), "declares no deployment (Deployment); set quantizer."),
    ("quantizers", "q", quantizer_with(deployment=INT8), "declares no precisions (tuple)"),
    ("quantizers", "q", with_attributes(lambda m, e, c, *, subset_size, inference_precision: None, deployment=INT8,
                                        precisions=("int8",)), "cannot be called with the keyword argument(s) pm"),
    ("exporters", "e", exporter_with(), "declares no time_major (bool); set exporter.time_major"),
    ("exporters", "e", exporter_with(time_major="no"), "declares no time_major (bool)"),
    ("datasets", "d", loader_without_seed, "cannot be called with the keyword argument(s) seed the pipeline passes"),
])
def test_a_factory_breaking_its_protocol_is_refused_naming_the_plugin(kind, name, factory, refusal):
    pm = builtins_only()
    pm.register(Registers(kind, name, factory), name="bad")
    with pytest.raises(PluginError) as error:
        registries(pm)
    singular = {"quantizers": "quantizer", "exporters": "exporter", "datasets": "dataset"}[kind]
    assert one_line(error).startswith(f"plugin 'bad': {singular} {name!r} ")
    assert refusal in str(error.value)


def test_factories_following_their_protocols_are_registered_under_their_plugin():
    good = {"models": lambda **args: nn.Identity(), "datasets": loader_with_seed, "importances": lambda **kw: None,
            "quantizers": with_attributes(lambda m, e, c, **kw: None, deployment=INT8, precisions=("int8",)),
            "exporters": with_attributes(lambda m, e, p, **kw: [], time_major=False)}
    pm = builtins_only()
    for kind, factory in good.items():
        pm.register(Registers(kind, f"my_{kind}", factory), name=f"plugin_{kind}")
    registrar = registries(pm)
    for kind, factory in good.items():
        registry = getattr(registrar, kind)
        assert registry[f"my_{kind}"] is factory and registry.owner(f"my_{kind}") == f"plugin_{kind}"


@pytest.mark.parametrize("kind, name, builtin", [("importances", "l2", "importances"), ("exporters", "onnx", "exporters")])
def test_a_name_registered_twice_names_both_plugins(kind, name, builtin):
    factory = with_attributes(lambda *a, **kw: [], time_major=False)
    pm = builtins_only()
    pm.register(Registers(kind, name, factory), name="clash")
    with pytest.raises(PluginError) as error:
        registries(pm)
    assert one_line(error) == (f"{kind[:-1]} {name!r} is registered twice, by plugins 'clash' and {builtin!r}; "
                               "rename one of them")


def test_registries_are_cached_per_plugin_manager_and_rebuilt_when_plugins_change():
    pm, other = builtins_only(), builtins_only()
    first = registries(pm)
    assert registries(pm) is first and registries(other) is not first
    extra = Registers("importances", "extra", lambda **kw: None)
    pm.register(extra, name="extra")
    assert registries(pm).importances.owner("extra") == "extra" and extra.calls == 1
    assert registries(pm) is registries(pm) and extra.calls == 1  # not asked again while nothing changed
    assert "extra" not in registries(other).importances
    pm.unregister(name="extra")
    assert "extra" not in registries(pm).importances
    for i in range(20):  # a new plugin object may get a freed one's address: the cache must still see the change
        pm.register(Registers("importances", f"extra_{i}", lambda **kw: None), name="extra")
        assert registries(pm).importances.names("extra") == [f"extra_{i}"]
        pm.unregister(name="extra")


# -- recipes: preflight and run_recipe with a plugin manager of one's own -------------------


def write_recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return load_recipe(path)


class BitsOnly(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    bits: int = pydantic.Field(8, ge=8, le=8)


@pytest.mark.parametrize("method, args, refusal", [
    ("nncf_int4", "{ratio: 2}", "quantize.args.ratio: Input should be less than or equal to 1"),
    ("nncf_int4", "{group_size: abc}", "quantize.args.group_size: Input should be a valid integer"),
    ("nncf_int4", "{ratio: 0.5, group_size: 32, bits: 4}", "quantize.args: got an unexpected keyword argument 'bits'"),
    ("nncf_int8", "{ratio: 0.5}", "quantize.args: got an unexpected keyword argument 'ratio'"),
    ("bits_only", "{bits: 4}", "quantize.args.bits: Input should be greater than or equal to 8"),  # its own model
    ("bits_only", "{bitz: 8}", "quantize.args.bitz: Extra inputs are not permitted"),
    ("nncf_int8", "{subset_size: 3}", "quantize.args.subset_size: set by the run from quantize.calibration_size"),
    ("nncf_int4", "{ratio: 0.5, group_size: 32}", None), ("bits_only", "{bits: 8}", None),
])
def test_quantize_args_are_checked_by_the_quantizers_arguments_model_at_preflight(tmp_path, method, args, refusal):
    pm = builtins_only()
    pm.register(Registers("quantizers", "bits_only", with_attributes(
        lambda m, e, c, **kw: None, deployment=INT8, precisions=("int8",), arguments=BitsOnly)), name="bits")
    recipe = write_recipe(tmp_path, f"""\
        model: {{name: spikformer}}
        quantize: {{method: {method}, args: {args}}}
        """)
    with pytest.raises(RecipeError) if refusal else contextlib.nullcontext() as error:
        preflight(recipe, pm)
    assert refusal is None or one_line(error).startswith(f"{recipe.source}: {refusal}")


def test_importance_args_the_factory_cannot_take_are_refused_at_preflight(tmp_path):
    def scaled(*, scale: float = 1.0): ...

    pm = builtins_only()
    pm.register(Registers("importances", "scaled", scaled), name="scaled")
    recipe = write_recipe(tmp_path, """\
        model: {name: spikformer}
        prune: {method: uniform, importance: scaled, importance_args: {scael: 2.0}}
        """)
    with pytest.raises(RecipeError) as error:
        preflight(recipe, pm)
    assert one_line(error) == f"{recipe.source}: prune.importance_args: got an unexpected keyword argument 'scael'"
    preflight(recipe.model_copy(update={"prune": recipe.prune.model_copy(update={"importance_args": {"scale": 2.0}})}),
              pm)


@pytest.mark.parametrize("importance, args, refused", [("l2", "{bogus: 1}", True), ("memory", "{bogus: 1}", True),
                                                      ("memory", "{memory_weight: 0.5, p: 1}", False)])
def test_builtin_importances_check_their_arguments_at_preflight(tmp_path, importance, args, refused):
    """The builtin factories are the importance classes themselves: an argument they do not take is refused before
    anything runs (``memory`` passes extra keywords on to L2, so it is built once to know)."""
    recipe = write_recipe(tmp_path, f"""\
        model: {{name: spikformer}}
        prune: {{method: uniform, importance: {importance}, importance_args: {args}}}
        """)
    if refused:
        with pytest.raises(RecipeError, match=r"prune\.importance_args: .*unexpected keyword argument 'bogus'"):
            preflight(recipe, builtins_only())
    else:
        preflight(recipe, builtins_only())


class ExportPlugin:
    """A model and an exporter that exist only on the plugin manager this plugin is registered on."""

    def __init__(self, agreement_bar=None):
        self.calls, self.agreement_bar = [], agreement_bar

    @hookimpl
    def primesvt_register(self, registrar):
        registrar.models.add("linear_digits", lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
        registrar.exporters.add("logits", self.export)

    def export(self, model, example_input, path, *, verification, calibration, pm):
        self.calls.append(dict(path=path, pm=pm, example=tuple(example_input.shape), calibration=len(calibration)))
        with torch.no_grad():
            outputs = model(torch.from_numpy(verification.images)).numpy()
        if self.agreement_bar is not None:  # wrong outputs, recorded under a bar of its own instead of raising
            outputs = -outputs
        verification.check("logits export", outputs, "f32", min_agreement=self.agreement_bar)
        np.save(path.with_suffix(".logits.npy"), outputs)
        return [path.with_suffix(".logits.npy")]

    export.time_major = False  # the bound method reads it from the function


def test_run_recipe_uses_the_given_plugin_managers_exporters(tmp_path):
    recipe = write_recipe(tmp_path, """\
        model: {name: linear_digits}
        data: {name: digits, args: {image_size: 8}}
        export: {formats: [logits], verify_samples: 16}
        device: cpu
        """)
    assert "logits" not in registries(get_plugin_manager()).exporters
    pm, plugin = builtins_only(), ExportPlugin()
    pm.register(plugin, name="mine")
    report = run_recipe(recipe, tmp_path / "out", pm=pm, progress=False)
    [call] = plugin.calls
    assert call["pm"] is pm and call["path"].name == "model" and call["path"].suffix == ""
    assert call["example"] == (1, 1, 8, 8) and call["calibration"] == 300
    assert report["exports"] == ["model.logits.npy"] and (tmp_path / "out" / "model.logits.npy").is_file()
    assert report["export_checks"]["logits export"]["agreement"] == 1.0

    cheat = builtins_only()  # a result recorded below the bar fails the run, as a builtin exporter's would
    cheat.register(ExportPlugin(agreement_bar=0.0), name="mine")
    with pytest.raises(ExportError) as error:
        run_recipe(recipe, tmp_path / "cheat", pm=cheat, progress=False)
    assert one_line(error).startswith("export.formats: exporter 'logits': logits export agrees with the PyTorch "
                                      "model on ")
    assert not (tmp_path / "cheat").exists()


# -- the example third-party plugin (examples/primesvt-example-neuron) ------------------------

SMALL = dict(T=2, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10,
             embed_dims=64, num_heads=4, mlp_ratio=4, depths=2)


@pytest.fixture
def example():
    return pytest.importorskip("primesvt_example_neuron.plugin", reason="install examples/primesvt-example-neuron")


def test_example_plugin_loads_through_its_entry_point_and_lists_what_it_registers(example):
    rows = {row.name: row for row in plugin_details(new_plugin_manager())}
    row = rows["example_neuron"]
    assert (row.module, row.distribution) == (
        "primesvt_example_neuron.plugin", f"primesvt-example-neuron {metadata.version('primesvt-example-neuron')}")
    assert row.layer_types == ["primesvt_example_neuron.neuron.ChannelThresholdLIF"]
    assert row.per_module_hooks == ["primesvt_prune_spiking_layer", "primesvt_export_forward"]
    assert row.registries == {"models": ["example_spikformer"], "datasets": ["digits_mirrored"],
                              "quantizers": ["int8_weights_only"], "exporters": ["state_dict_fp16"]}
    assert rows["attention"].per_module_hooks == ["primesvt_attention_layout"] and rows["attention"].registries == {}
    assert rows["neurons"].distribution == "primesvt-plugin (builtin)"
    assert "example_neuron" not in dict((n, m) for n, m, _ in plugin_table(builtins_only()))


def test_example_neuron_prunes_with_its_thresholds_and_keeps_frozen_ones_frozen(example, images):
    torch.manual_seed(0)
    model = example.example_spikformer(**SMALL)
    before_out, before_params = fresh_forward(model.eval(), images), sum(p.numel() for p in model.parameters())
    model.blocks[1].mlp.neuron1.threshold.requires_grad_(False)
    SpikingPruner(model, images, pruning_ratio=0.5, pm=new_plugin_manager()).step()
    assert fresh_forward(model.eval(), images).shape == before_out.shape
    assert sum(p.numel() for p in model.parameters()) < before_params
    for block in model.blocks:
        assert block.mlp.neuron1.threshold.numel() == block.mlp.fc1[0].out_channels == 128
        assert block.attn.num_heads * block.attn.head_dim * 3 == block.attn.qkv_conv_bn[0].out_channels
    assert model.blocks[0].mlp.neuron1.threshold.requires_grad
    assert not model.blocks[1].mlp.neuron1.threshold.requires_grad


def test_without_the_example_plugin_the_error_names_the_layer(example, images):
    torch.manual_seed(0)
    with pytest.raises(UnhandledLayerError, match=r"blocks\.0\.mlp\.neuron1.*ChannelThresholdLIF"):
        SpikingGraph(example.example_spikformer(**SMALL), images, pm=builtins_only())


def test_unknown_stateful_layer_is_refused():
    counter = base.MemoryModule()  # a stateful layer nobody handles
    counter.register_memory("count", 0)
    counter.forward = lambda x: x
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), counter, nn.Conv2d(8, 4, 3))
    with pytest.raises(UnhandledLayerError, match=r"layer '2'.*MemoryModule.*count"):
        SpikingGraph(model, torch.rand(1, 3, 8, 8), pm=builtins_only())


def test_an_exporter_reads_calibration_only_when_it_uses_it_and_its_own_checked_bar_stands():
    """Exporters get the calibration batches lazily (read on first use, once); every recorded result is held to
    the recipe's bar for its precision (an integer one, however the plugin spells it, to the INT8 bar)."""
    import numpy as np

    from primesvt_plugin.deploy.export import ExportError, Verification
    from primesvt_plugin.pipeline.stages import Calibration, _enforce

    reads = []
    calibration = Calibration(lambda: reads.append(1) or [np.zeros((1, 3))] * 4)
    assert reads == []  # nothing read until used
    assert len(calibration) == 4 and len(list(calibration)) == 4 and reads == [1]

    verification = Verification(np.zeros((10, 3), np.float32), np.eye(10, dtype=np.float32))
    verification.results["u8 export"] = {"agreement": 0.96, "precision": "u8"}  # an integer precision: 0.95 bar
    _enforce("plugin", "u8 export", verification)
    verification.results["f32 export"] = {"agreement": 0.96, "precision": "f32"}  # the recipe's 0.995 bar
    with pytest.raises(ExportError, match=r"exporter 'plugin': f32 export agrees .* on 96\.00% at f32 "
                                          r"\(needs 99\.50%\)"):
        _enforce("plugin", "f32 export", verification)

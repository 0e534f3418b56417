"""The plugin contract: entry points, the example third-party plugin, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import base

from primesvt_plugin import SpikingGraph, SpikingPruner, UnhandledLayerError
from primesvt_plugin.plugins import (PluginError, check_hooks, get_plugin_manager, hookimpl, new_plugin_manager,
                                     plugin_table, registries)

from conftest import assert_heads_consistent, param_count, run

example = pytest.importorskip("primesvt_example_neuron", reason="install examples/primesvt-example-neuron")
from primesvt_example_neuron.plugin import example_spikformer  # noqa: E402

SMALL = dict(T=2, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10,
             embed_dims=64, num_heads=4, mlp_ratio=4, depths=2)


def test_builtins_and_example_load_through_entry_points():
    table = {name: (module, dist) for name, module, dist in plugin_table(get_plugin_manager())}
    assert table["neurons"] == ("primesvt_plugin.builtins.neurons", "primesvt-plugin 0.2.0")
    assert table["attention"] == ("primesvt_plugin.builtins.attention", "primesvt-plugin 0.2.0")
    assert table["example_neuron"] == ("primesvt_example_neuron.plugin", "primesvt-example-neuron 0.2.0")
    registrar = registries(get_plugin_manager())
    assert registrar.models.owner("example_spikformer") == "example_neuron"
    assert registrar.models.owner("spikformer") == "models"
    assert {"l2", "taylor", "memory"} <= set(registrar.importances.names("importances"))


def test_example_neuron_model_prunes_with_its_thresholds(images):
    torch.manual_seed(0)
    model = example_spikformer(**SMALL)
    before_out, before_params = run(model, images), param_count(model)
    SpikingPruner(model, images, pruning_ratio=0.5).step()
    out = run(model, torch.rand_like(images))
    assert out.shape == before_out.shape and param_count(model) < before_params
    for block in model.blocks:
        hidden = block.mlp.fc1[0].out_channels
        assert hidden == 128
        assert block.mlp.neuron1.threshold.numel() == hidden
    assert_heads_consistent(model)


def test_without_the_plugin_the_error_names_the_layer(images):
    pm = new_plugin_manager()
    pm.unregister(name="example_neuron")
    torch.manual_seed(0)
    model = example_spikformer(**SMALL)
    with pytest.raises(UnhandledLayerError, match=r"blocks\.0\.mlp\.neuron1.*ChannelThresholdLIF"):
        SpikingGraph(model, images, pm=pm)


class Counter(base.MemoryModule):
    """A stateful layer nobody handles."""

    def __init__(self):
        super().__init__()
        self.register_memory("count", 0)

    def forward(self, x):
        self.count = self.count + 1
        return x


def test_unknown_stateful_layer_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Counter(), nn.Conv2d(8, 4, 3))
    with pytest.raises(UnhandledLayerError, match=r"layer '2'.*Counter.*count"):
        SpikingGraph(model, torch.rand(1, 3, 8, 8))


class Clash:
    @hookimpl
    def primesvt_register(self, registrar):
        registrar.importances.add("l2", lambda **kw: None)


class OldStyle:  # a 0.1 plugin: returns {name: factory}
    @hookimpl
    def primesvt_importances(self):
        return {"l2_again": lambda **kw: None}


class OldStyleClash:
    @hookimpl
    def primesvt_exporters(self):
        return {"onnx": lambda model, example_input, path: []}


def test_duplicate_registry_names_name_both_plugins():
    pm = new_plugin_manager()
    pm.register(Clash(), name="clash")
    with pytest.raises(PluginError, match="importance 'l2' is registered twice, by plugins 'clash' and "
                                          "'importances'; rename one of them"):
        registries(pm)


def test_plugins_written_for_0_1_still_register_and_are_told_to_move():
    pm = new_plugin_manager()
    with pytest.warns(DeprecationWarning, match="primesvt_importances is deprecated.*primesvt_register"):
        pm.register(OldStyle(), name="old")
    registrar = registries(pm)
    assert registrar.importances.owner("l2_again") == "old" and "l2" in registrar.importances
    pm.register(OldStyleClash(), name="old_clash")
    with pytest.raises(PluginError, match="exporter 'onnx' is registered twice, by plugins 'exporters' and "
                                          "'old_clash'"):
        registries(pm)


def test_a_misspelled_hook_fails_loudly_naming_the_plugin():
    class Typo:
        @hookimpl
        def primesvt_register_models(self, registrar):  # no such hook
            pass

    pm = new_plugin_manager()
    pm.register(Typo(), name="typo")
    with pytest.raises(PluginError, match="plugin 'typo'.*primesvt_register_models.*the hooks are: .*primesvt_register"):
        check_hooks(pm)


def test_unknown_names_list_the_choices():
    with pytest.raises(PluginError, match="unknown quantizer 'int2'; available: int8_weights_only, nncf_int4, nncf_int8"):
        registries(get_plugin_manager()).quantizers["int2"]


def test_plugin_model_dataset_and_exporter_work_from_yaml(tmp_path, capsys):
    from primesvt_plugin.pipeline.cli import main

    recipe = tmp_path / "plugin.yaml"
    recipe.write_text(
        "model:\n  name: example_spikformer\n  args: {T: 2, in_channels: 1, img_size_h: 16, img_size_w: 16,"
        " patch_size: 4, num_classes: 10, embed_dims: 32, num_heads: 4, depths: 1}\n"
        "data: {name: digits_mirrored, args: {image_size: 16}}\ntrain: {epochs: 1}\n"
        "prune: {method: uniform, ratio: 0.5}\nexport: {formats: [state_dict_fp16]}\n"
        "quantize: {method: int8_weights_only, calibration_size: 4}\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    exported = torch.load(out / "model.fp16.pt")
    assert exported["blocks.0.mlp.neuron1.threshold"].dtype == torch.float16
    assert exported["blocks.0.mlp.neuron1.threshold"].numel() == 64  # 128 hidden channels, half pruned
    report = json.loads((out / "report.json").read_text())
    int8 = report["stages"][-1]
    assert int8["stage"] == "int8_weights_only" and int8["weight_bytes"] == (out / "model_int8.bin").stat().st_size
    assert int8["weight_bytes"] < report["stages"][1]["weight_bytes"] / 2
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    for registered in ("example_neuron", "example_spikformer", "digits_mirrored", "state_dict_fp16", "int8_weights_only"):
        assert registered in listing


def test_plugin_details_show_layer_types_and_per_module_hooks(capsys):
    from primesvt_plugin.pipeline.cli import main
    from primesvt_plugin.plugins import plugin_details

    rows = {row.name: row for row in plugin_details(get_plugin_manager())}
    example_row = rows["example_neuron"]
    assert example_row.module == "primesvt_example_neuron.plugin"
    assert example_row.distribution == "primesvt-example-neuron 0.2.0"
    assert example_row.layer_types == ["primesvt_example_neuron.neuron.ChannelThresholdLIF"]
    assert example_row.per_module_hooks == ["primesvt_prune_spiking_layer", "primesvt_export_forward"]
    assert example_row.registries == {"models": ["example_spikformer"], "datasets": ["digits_mirrored"],
                                      "quantizers": ["int8_weights_only"], "exporters": ["state_dict_fp16"]}
    assert rows["attention"].per_module_hooks == ["primesvt_attention_layout"]
    assert rows["attention"].layer_types == [] and rows["attention"].registries == {}
    assert "spikingjelly.activation_based.neuron.lif.LIFNode" in rows["neurons"].layer_types

    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    example_block = listing.split("example_neuron = ")[1].split(" = ")[0]
    assert "ChannelThresholdLIF" in example_block and "primesvt_export_forward" in example_block
    attention_block = listing.split("attention = ")[1].split(" = ")[0]
    assert "primesvt_attention_layout" in attention_block


def test_example_neuron_pruning_keeps_frozen_thresholds_frozen(images):
    from primesvt_example_neuron.plugin import primesvt_prune_spiking_layer

    neuron = example.ChannelThresholdLIF(8)
    neuron.threshold.data = torch.arange(8.0)
    neuron.threshold.requires_grad_(False)
    assert primesvt_prune_spiking_layer(layer=neuron, idxs=[1, 4, 5]) is True
    assert neuron.threshold.tolist() == [0.0, 2.0, 3.0, 6.0, 7.0]
    assert not neuron.threshold.requires_grad  # the hook contract: requires_grad is kept

    torch.manual_seed(0)
    model = example_spikformer(**SMALL)
    for block in model.blocks:
        block.mlp.neuron1.threshold.requires_grad_(False)
    model.blocks[0].mlp.neuron1.threshold.requires_grad_(True)
    SpikingPruner(model, images, pruning_ratio=0.5).step()
    assert model.blocks[0].mlp.neuron1.threshold.requires_grad
    assert not model.blocks[1].mlp.neuron1.threshold.requires_grad
    assert model.blocks[1].mlp.neuron1.threshold.numel() == 128

"""NIR export: a convolutional SNN stepped over time is written and read back with the same decisions;
what NIR cannot hold (a model repeating its input over time, a product of two spike tensors) is refused."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron

from primesvt_plugin import ExportError, to_nir
from primesvt_plugin.deploy.nir import run_nir_graph
from primesvt_plugin.pruning.spiking import fresh_forward

from svits import build

nir = pytest.importorskip("nir")


def conv_snn() -> nn.Module:
    """A multi-step convolutional SNN (LIF, IF) whose neurons fire on random input."""
    torch.manual_seed(0)
    model = nn.Sequential(layer.Conv2d(1, 8, 3, padding=1, step_mode="m"), neuron.LIFNode(tau=2.0, step_mode="m"),
                          layer.Flatten(step_mode="m"), layer.Linear(8 * 8 * 8, 10, step_mode="m"),
                          neuron.IFNode(step_mode="m"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def frames(n: int = 16) -> torch.Tensor:
    return torch.rand(4, n, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # [T, N, C, H, W]


def test_conv_snn_round_trips_through_nir_with_the_same_spikes(tmp_path):
    model, x = conv_snn(), frames()
    reference = fresh_forward(model, x).numpy()
    assert reference.sum() > 0  # it fires: agreement means something
    model.train()
    (path,) = to_nir(model, x, tmp_path / "model.nir")
    assert model.training  # the caller's mode is left as it was
    graph = nir.read(str(path))
    assert {type(node).__name__ for node in graph.nodes.values()} >= {"Conv2d", "LIF", "IF", "Affine"}
    np.testing.assert_array_equal(run_nir_graph(graph, x), reference)  # read from the file, stepped through time


@pytest.mark.parametrize("name, blocks", [("spikformer", "blocks.0.attn, blocks.1.attn"),
                                          ("spike_driven_transformer", "blocks.0.attn, blocks.1.attn")])
def test_an_svit_is_refused_naming_its_attention_blocks(name, blocks, tmp_path):
    model = build(name).eval()
    with pytest.raises(ExportError, match=f"spiking self-attention \\({blocks}\\): it multiplies two spike tensors"):
        to_nir(model, torch.rand(1, 3, 32, 32), tmp_path / "m.nir")
    assert list(tmp_path.iterdir()) == []


class RepeatsOverTime(nn.Module):
    """A conv SNN that repeats its image over T inside forward, as the SViTs do."""

    def __init__(self):
        super().__init__()
        self.T, self.body = 4, conv_snn()

    def forward(self, x):
        return self.body(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1))


def test_a_model_repeating_its_image_over_time_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ExportError, match="NIR holds the network of one time step, and RepeatsOverTime takes"):
        to_nir(RepeatsOverTime().eval(), torch.rand(2, 1, 8, 8), tmp_path / "m.nir")
    assert list(tmp_path.iterdir()) == []


class SpikeProduct(nn.Module):
    """Multiplies two spike tensors, as spiking self-attention does: NIR has no node for it."""

    def __init__(self):
        super().__init__()
        self.conv, self.lif = layer.Conv2d(1, 4, 3, padding=1, step_mode="m"), neuron.LIFNode(step_mode="m")
        self.flat, self.fc = layer.Flatten(step_mode="m"), layer.Linear(4 * 8 * 8, 3, step_mode="m")

    def forward(self, x):
        spikes = self.lif(self.conv(x))
        return self.fc(self.flat(spikes * spikes))


def test_a_product_of_spike_tensors_is_refused_naming_what_nir_lacks(tmp_path):
    # nirtorch's own words for the product, with ours: NIR's nodes
    with pytest.raises(ExportError, match="NIR cannot represent SpikeProduct: The only supported function is addition"
                                          r".*\(NIR graphs hold convolution, linear, pooling and neuron nodes\)"):
        to_nir(SpikeProduct().eval(), frames(2), tmp_path / "m.nir")
    assert list(tmp_path.iterdir()) == []


# -- the nir exporter in recipes: models stepped over event frames ------------------------------

SNN_MODULE = '''import torch.nn as nn
from spikingjelly.activation_based import layer, neuron


def build(classes: int = 2):
    """A multi-step convolutional SNN for [T, N, 2, 8, 8] event frames."""
    return nn.Sequential(layer.Conv2d(2, 8, 3, padding=1, step_mode="m"),
                         neuron.LIFNode(tau=2.0, v_threshold=0.2, step_mode="m"),
                         layer.Conv2d(8, 8, 3, padding=1, step_mode="m"),
                         neuron.LIFNode(tau=2.0, v_threshold=0.2, step_mode="m"),
                         layer.Flatten(step_mode="m"), layer.Linear(8 * 8 * 8, classes, step_mode="m"))
'''


def event_recipe(folder, formats: str) -> str:
    """A conv SNN on DVS-style frames (SpikingJelly's frame layout) whose two classes fire on different halves."""
    rng = np.random.default_rng(0)
    frames_folder = folder / "DVS" / "frames_number_4_split_by_number"
    for c in range(2):
        (frames_folder / f"class_{c}").mkdir(parents=True)
        for i in range(20):
            events = (rng.random((4, 2, 8, 8)) < 0.1).astype(np.float32)
            events[:, :, :, c * 4:(c + 1) * 4] += rng.random((4, 2, 8, 4)) < 0.6
            np.savez(frames_folder / f"class_{c}" / f"sample_{i}.npz", frames=events)
    (folder / "snn.py").write_text(SNN_MODULE)
    recipe = folder / "events.yaml"
    recipe.write_text('model: {name: "snn:build", args: {classes: 2}}\n'
                      "data: {name: dvs_frames, args: {root: DVS, val_fraction: 0.2, test_fraction: 0.2}, "
                      "batch_size: 8}\ntrain: {epochs: 30, lr: 0.01}\n"
                      "prune: {memory_saving: 0.2, max_accuracy_drop: 0.5}\n" + f"export: {{formats: [{formats}]}}\n")
    return str(recipe)


def test_a_recipe_on_event_frames_exports_the_pruned_snn_to_nir(tmp_path):
    from primesvt_plugin import load_pruned
    from primesvt_plugin.pipeline.cli import main

    out = tmp_path / "out"
    assert main(["run", event_recipe(tmp_path, "nir"), "--out", str(out), "--allow-code", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["exports"] == ["model.nir"]
    assert report["export_checks"]["NIR export"]["agreement"] == 1.0
    assert report["export_checks"]["NIR export"]["samples"] == 8  # test samples, not time steps
    pruned = load_pruned(out / "model.pt", trust_code=True, search_path=tmp_path)
    widths = [m.out_channels for m in pruned if isinstance(m, nn.Conv2d)]
    assert min(widths) < 8  # pruned
    graph = nir.read(str(out / "model.nir"))
    # the graph written is the pruned model's
    assert sorted(node.weight.shape[0] for node in graph.nodes.values() if type(node).__name__ == "Conv2d") == sorted(widths)
    files = sorted((tmp_path / "DVS").rglob("*.npz"))[::5]  # samples of both classes, as [T, N, 2, 8, 8]
    events = torch.from_numpy(np.stack([np.load(f)["frames"] for f in files], axis=1))
    decisions = fresh_forward(pruned.eval(), events).mean(0).argmax(-1)
    assert len(set(decisions.tolist())) == 2  # the model tells the classes apart: agreement means something
    np.testing.assert_array_equal(run_nir_graph(graph, events).mean(0).argmax(-1), decisions.numpy())


@pytest.mark.parametrize("formats, data, message", [
    ("nir", "digits", "export.formats: nir exports models stepped over time-major event frames"),
    ("onnx, nir", "events", "export.formats: dataset 'dvs_frames' gives time-major event frames .*, and onnx export "
                            "and check .*: remove them"),
])
def test_an_exporter_given_the_wrong_data_layout_is_refused_before_training(formats, data, message, tmp_path, capsys):
    from primesvt_plugin.pipeline.cli import main

    if data == "digits":
        recipe = tmp_path / "digits.yaml"
        recipe.write_text("model: {name: spikformer, args: {T: 2, in_channels: 1, img_size_h: 16, img_size_w: 16, "
                          "patch_size: 4, num_classes: 10, embed_dims: 32, num_heads: 4, depths: 1}}\n"
                          "data: {name: digits, args: {image_size: 16}}\ntrain: {epochs: 1}\n"
                          f"export: {{formats: [{formats}]}}\n")
        recipe = str(recipe)
    else:
        recipe = event_recipe(tmp_path, formats)
    assert main(["run", recipe, "--out", str(tmp_path / "out"), "--allow-code", "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()

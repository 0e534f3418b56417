"""SViTs as their authors write them, pruned with no plugin: attention layouts inferred from structure and
proven, width attributes kept true, tuple outputs read, authors' checkpoints loaded."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import neuron

import primesvt_plugin as ps
from primesvt_plugin.errors import CheckpointError, PruningFailed, UnhandledLayerError
from primesvt_plugin.pruning.spiking import first_tensor, fresh_forward
from primesvt_plugin.pruning.tracing import structure_keeping_passthrough

from authors_shapes import HeadsFromNowhereNet, QKFormerLike, SpikformerLike

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SDT_ARGS = dict(image_size=32, patch_size=4, in_channels=3, num_classes=10, embed_dims=64, num_heads=4, depths=2, T=2)


def ported_sdt(**overrides) -> nn.Module:
    return ps.build_model("ported_sdt:build", {**SDT_ARGS, **overrides}, search_path=RECIPES, trust_code=True)


SHAPES = {"spikformer": SpikformerLike, "qkformer": QKFormerLike, "sdt": ported_sdt}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return SHAPES[name]().eval()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return first_tensor(fresh_forward(model, x))


@pytest.fixture
def x():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_heads_whole(graph: ps.SpikingGraph) -> None:
    for layout in graph.layouts.values():
        assert layout.inner % layout.num_heads == 0 and (not layout.tied or layout.inner == layout.width)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("way", ["MetaPruner + kwargs", "SpikingPruner", "prime"])
def test_authors_shapes_prune_three_ways_with_no_layout_written(name, way, x):
    model = build(name)
    before, shape = params(model), output(model, x).shape
    inputs = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = output(model, inputs).argmax(-1)
    if way == "MetaPruner + kwargs":
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.3, **ps.spiking_pruner_kwargs(model, x))
        ps.verified_step(pruner, x)
    elif way == "SpikingPruner":
        ps.SpikingPruner(model, x, pruning_ratio=0.3).step()
    else:
        model = ps.prime(model, x, lambda m: float((output(m, inputs).argmax(-1) == reference).float().mean()),
                         memory_saving=0.25, max_accuracy_drop=1.0, progress=False).model
    assert params(model) <= 0.85 * before  # at least 15% fewer parameters
    assert output(model, x).shape == shape and torch.isfinite(output(model, x)).all()
    assert_heads_whole(ps.SpikingGraph(model, x))  # the pruned model's blocks are inferred and proven again


def layout_of(graph: ps.SpikingGraph, block: nn.Module) -> dict:
    layout, names = graph.layouts[block], graph.names
    return {"tied": layout.tied, "reads": [names[m] for m in layout.reads], "writes": [names[m] for m in layout.writes],
            "inner_out": sorted((names[m], c) for m, c in layout.inner_out), "inner_in": [names[m] for m in layout.inner_in],
            "width_neurons": [names[m] for m in layout.width_neurons],
            "inner_neurons": sorted((names[m], c) for m, c in layout.inner_neurons)}


def test_inferred_layouts_follow_each_blocks_structure(x):
    spikformer = build("spikformer")
    graph = ps.SpikingGraph(spikformer, x)
    attn = "block.0.attn"
    assert layout_of(graph, spikformer.block[0].attn) == {
        "tied": True,  # heads are reshaped with the input's C // num_heads
        "reads": [f"{attn}.{n}_linear" for n in "qkv"], "writes": [f"{attn}.proj_linear", f"{attn}.proj_bn"],
        "inner_out": sorted([(f"{attn}.{n}_{kind}", 1) for n in "qkv" for kind in ("linear", "bn")]),
        "inner_in": [f"{attn}.proj_linear"], "width_neurons": [f"{attn}.proj_lif"],
        "inner_neurons": sorted([(f"{attn}.{n}_lif", 1) for n in ("q", "k", "v", "attn")])}
    qkformer = build("qkformer")
    graph = ps.SpikingGraph(qkformer, x)
    token = layout_of(graph, qkformer.stage1.attn)
    assert token["reads"] == ["stage1.attn.q_conv", "stage1.attn.k_conv"]  # no v
    assert ("stage1.attn.attn_lif", 0) in token["inner_neurons"]  # fires on a sum over channels: does not shrink
    assert ("stage2.attn.attn_lif", 1) in layout_of(graph, qkformer.stage2.attn)["inner_neurons"]
    sdt = build("sdt")
    graph = ps.SpikingGraph(sdt, x)
    block = layout_of(graph, sdt.block[0].attn)
    assert block["tied"] and block["width_neurons"] == ["block.0.attn.shortcut_lif"]
    assert ("block.0.attn.talking_heads_lif", 1) in block["inner_neurons"]
    assert "block.0.attn.talking_heads" not in str(block["reads"] + block["writes"])  # built, never called


@pytest.mark.parametrize("name", SHAPES)
def test_masking_an_inferred_plan_equals_pruning_it(name, x, masked_equals_pruned):
    """What prime()'s trials rely on: zeroing a plan's channels gives the pruned model's outputs, and the
    memory ledger predicts the pruned footprint (inferred neurons' state included)."""
    masked_equals_pruned(build(name), x, {})


def test_width_attributes_are_rewritten_only_where_a_reshape_reads_them(x):
    model = build("spikformer")
    embed = model.patch_embed
    assert embed.num_patches == 64 == model.head.in_features  # the residual width: the same value, another meaning
    plan = ps.SpikingPruner(model, x, pruning_ratio=0.25).step()
    mlp = model.block[0].mlp
    assert mlp.c_hidden == mlp.fc1_linear.out_features < 256  # read by the MLP's reshape: follows fc1
    assert mlp.c_output == 64 and model.head.in_features == 48  # never read: stays as built
    assert (embed.num_patches, embed.H, embed.W) == (64, 8, 8)
    assert plan and output(model, x).shape == (2, 10)


class SplitHidden(nn.Module):
    """An MLP reshaping its hidden width as ``self.groups x self.group_width``: two attributes, one size."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.fc1, self.fc2, self.lif = nn.Linear(dim, 32), nn.Linear(32, dim), neuron.LIFNode(step_mode="m")
        self.groups, self.group_width = 4, 8

    def forward(self, x):  # [T, B, C]
        T, B, _ = x.shape
        hidden = self.lif(self.fc1(x).reshape(T, B, self.groups, self.group_width)).flatten(2)
        return self.fc2(hidden)


class SplitHiddenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.T, self.embed, self.mlp, self.head = 2, nn.Linear(12, 16), SplitHidden(), nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x.flatten(1)).unsqueeze(0).repeat(self.T, 1, 1)
        return self.head(x + self.mlp(x)).mean(0)


def test_a_width_no_single_attribute_explains_is_refused_naming_them():
    model, x = SplitHiddenNet(), torch.rand(2, 3, 2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningFailed, match=r"sizes from group_width, groups.*primesvt_attention_layout"):
        ps.SpikingPruner(model, x, pruning_ratio=0.5).step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
    assert (model.mlp.groups, model.mlp.group_width) == (4, 8)


def test_a_truly_ambiguous_block_is_refused_naming_it_what_and_the_hook(x):
    model = HeadsFromNowhereNet()
    for make in (ps.SpikingGraph, ps.spiking_pruner_kwargs):
        with pytest.raises(UnhandledLayerError) as error:
            make(model, x)
        message = str(error.value)
        assert message.startswith("attention block 'attn' (authors_shapes.HeadsFromNowhere): its layout could not be "
                                  "inferred: the heads are formed from a width no projection produces: q_conv gives "
                                  "96 channels")
        assert message.endswith("write a plugin implementing primesvt_attention_layout for it (docs/plugins.md)")


def test_a_plugins_layout_wins_over_inference(x):
    from primesvt_plugin.plugins import hookimpl, new_plugin_manager

    model = build("spikformer")

    class Untied:  # a (wrong, but deliberate) layout saying the q/k/v width is free: it must be used as given
        @hookimpl(tryfirst=True)
        def primesvt_attention_layout(self, module):
            if module is model.block[0].attn:
                m = module
                return ps.AttentionLayout(m, m.num_heads, False, [m.q_linear, m.k_linear, m.v_linear],
                                          [m.proj_linear, m.proj_bn], [(m.q_linear, 1)], [m.proj_linear])
            return None

    pm = new_plugin_manager()
    pm.register(Untied(), name="untied")
    graph = ps.SpikingGraph(model, x, pm=pm)
    assert not graph.layouts[model.block[0].attn].tied and graph.layouts[model.block[1].attn].tied


def test_a_block_returning_a_tuple_is_traced_with_its_own_output_structure():
    attn = ported_sdt().block[0].attn.eval()
    x, hook = torch.rand(1, 2, 64, 8, 8), {}
    stand_in = structure_keeping_passthrough(attn)(x, hook)
    real = attn(x, hook)
    assert isinstance(stand_in, tuple) and len(stand_in) == 3 and stand_in[2] is hook
    assert torch.equal(stand_in[0], x) and stand_in[0] is not x  # the input passed through, as a new node
    assert stand_in[1].shape == real[1].shape  # v, [T, B, heads, tokens, head_dim]


class AuxFirst(nn.Module):
    """A model returning ``(aux, logits)``: the class scores are its second tensor."""

    def __init__(self):
        super().__init__()
        self.body = SpikformerLike()

    def forward(self, x):
        logits = self.body(x)
        return logits.detach() * 0 + 1, logits


def test_output_transform_picks_the_output_tensor_for_every_way_to_prune(x):
    second = lambda out: out[1]  # noqa: E731
    model = AuxFirst().eval()
    plan = ps.SpikingPruner(model, x, pruning_ratio=0.3, output_transform=second).step()
    assert plan and fresh_forward(model, x)[1].shape == (2, 10)
    model = AuxFirst().eval()
    kwargs = ps.spiking_pruner_kwargs(model, x, output_transform=second)
    assert kwargs["output_transform"](fresh_forward(model, x)) is not None
    ps.verified_step(tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=0.3, **kwargs), x, output_transform=second)
    result = ps.prime(AuxFirst().eval(), x, lambda m: 1.0, memory_saving=0.2, max_accuracy_drop=0.1, progress=False,
                      output_transform=second)
    assert result.report.pruned.parameter_saving >= 0.2


# -- checkpoints ---------------------------------------------------------------------------


def timm_checkpoint(model: nn.Module, path: Path, key: str = "state_dict", prefix: str = "", **extra) -> Path:
    """What timm's CheckpointSaver (key state_dict) or an MAE-style save_model (key model) writes."""
    state = {f"{prefix}{name}": tensor for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"epoch": 299, "arch": "sdt", key: state, "optimizer": optimizer.state_dict(), "version": 2,
                "args": argparse.Namespace(lr=5e-4, model="sdt", layer=2, dim=64, epochs=300), **extra}, path)
    return path


@pytest.mark.parametrize("form", ["timm", "timm under DDP", "mae", "plain"])
def test_authors_checkpoints_load_strictly(form, tmp_path):
    trained, fresh = ported_sdt(), ported_sdt()
    torch.manual_seed(5)
    for p in trained.parameters():
        p.data.normal_()
    path = tmp_path / "model_best.pth.tar"
    if form == "plain":
        torch.save(trained.state_dict(), path)
    else:
        timm_checkpoint(trained, path, key="model" if form == "mae" else "state_dict",
                        prefix="module." if form == "timm under DDP" else "")
    ps.load_checkpoint(fresh, path)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_a_checkpoint_that_does_not_fit_or_holds_objects_is_one_line(tmp_path):
    model = ported_sdt()
    other = ported_sdt(embed_dims=32, depths=3)
    with pytest.raises(CheckpointError) as error:
        ps.load_checkpoint(model, timm_checkpoint(other, tmp_path / "other.pth"))
    message = str(error.value)
    assert "other.pth does not fit the model:" in message and "missing (block.2" not in message
    assert "unexpected (block.2." in message and ", ...)" in message and "of another shape" in message
    assert len(message.splitlines()) == 1
    with pytest.raises(CheckpointError, match="holds a pathlib.PosixPath object, which loading never creates"):
        ps.load_checkpoint(model, timm_checkpoint(model, tmp_path / "path.pth", output=Path("out")))
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="none.pth holds a dict with keys epoch, optimizer, and no state dict"):
        ps.load_checkpoint(model, tmp_path / "none.pth")

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"state_dict": model.state_dict(), "args": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="posix.system"):
        ps.load_checkpoint(model, tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()

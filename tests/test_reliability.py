"""Hostile inputs and failure paths: nothing half-done, nothing silently wrong."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spikingjelly.activation_based.model import spikformer

from spikingjelly.activation_based.layer.attention import SpikeDrivenSelfAttention, SpikingSelfAttention

from primesvt_plugin import PruningFailed, SpikingGraph, SpikingPruner, footprint, spiking_pruner_kwargs, verified_step
from primesvt_plugin.builtins.attention import _spike_driven_self_attention, _spiking_self_attention
from primesvt_plugin.errors import DataError
from primesvt_plugin.pipeline.readers import npz_splits
from primesvt_plugin.plugins import hookimpl, new_plugin_manager
from primesvt_plugin.pruning.policy import prime
from primesvt_plugin.pruning.spiking import one_sample
from primesvt_plugin.pipeline.recipe import RecipeError, load_recipe
from primesvt_plugin.plugins import build_model
from primesvt_plugin.errors import ArgumentError, UntrustedCodeError
from primesvt_plugin.serialization import CheckpointError, load_pruned, save_pruned

from svits import SMALL_SVIT_ARGS, SMALL_SVITS, BreaksThirdNeuron, assert_heads_consistent, build, param_count, run

SMALL_SPIKFORMER = SMALL_SVIT_ARGS["spikformer"]


def test_failure_mid_pruning_restores_the_model(images):
    pm = new_plugin_manager()
    pm.register(BreaksThirdNeuron(), name="breaker")
    model = build("spikformer")
    before_out = run(model, images)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = SpikingPruner(model, images, pruning_ratio=0.5, pm=pm)
    with pytest.raises(RuntimeError, match="simulated failure"):
        pruner.step()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in before_state.items()}
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert torch.equal(run(model, images), before_out)


def test_spiking_pruner_checks_the_pruned_model_in_one_pass_of_one_sample(images):
    """The graph's own one-sample pass gives the expected output shape: step() runs the model only to check it."""
    model = build("spikformer")
    pruner = SpikingPruner(model, images, pruning_ratio=0.5)
    assert pruner.graph.output_shape == run(model, one_sample(model, images)).shape
    seen = []
    hook = model.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape))
    pruner.step()
    hook.remove()
    assert seen == [one_sample(model, images).shape]
    assert run(model, images).shape == run(build("spikformer"), images).shape


def test_a_pruned_model_whose_output_shape_differs_from_the_recorded_one_is_restored(images):
    model = build("spikformer")
    before_out = run(model, images)
    pruner = SpikingPruner(model, images, pruning_ratio=0.5)
    recorded = pruner.graph.output_shape
    pruner.graph.output_shape = torch.Size([*recorded[:-1], recorded[-1] + 1])  # what a broken head would give
    with pytest.raises(PruningFailed, match=r"output shape changed from .* after pruning \d+ channels of group"):
        pruner.step()
    assert torch.equal(run(model, images), before_out)


class ScoresAsText(torch.nn.Module):
    """A model whose forward returns no tensor at all."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"scores": self.model(x).tolist()}


def test_a_model_returning_no_tensor_is_refused_before_pruning(images):
    """A tuple's first tensor is read (test_inference.py); an output holding no tensor cannot be checked."""
    model = ScoresAsText(build("spikformer"))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ArgumentError, match="returns a dict holding no tensor.*output_transform"):
        SpikingPruner(model, images, pruning_ratio=0.5).step()
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def layout_plugin(attention_class, make_layout, spoil):
    """A plugin overriding the builtin layout of ``attention_class`` with a spoiled one."""

    class Spoiled:
        @hookimpl(tryfirst=True)
        def primesvt_attention_layout(self, module):
            if not isinstance(module, attention_class):
                return None
            layout = make_layout(module)
            spoil(layout)
            return layout

    pm = new_plugin_manager()
    pm.register(Spoiled(), name="spoiled")
    return pm


def forget_v_bn(layout) -> None:
    layout.inner_out = [(layer, chunks) for layer, chunks in layout.inner_out if layer is not layout.module.v_bn]


def test_broken_attention_update_is_caught_and_restored(images):
    # A buggy plugin: prunes Spike-driven attention but forgets v's batch norm (a forgotten head_dim is
    # repaired: the forward's reshape shows it, see test_inference.py)
    pm = layout_plugin(SpikeDrivenSelfAttention, _spike_driven_self_attention, forget_v_bn)
    model = build("spike_driven_transformer")
    before_out = run(model, images)
    # the whole plan fails its check; replayed group by group, the error names the first group that breaks it
    with pytest.raises(PruningFailed, match=r"no longer runs after pruning \d+ channels of group '[\w.]+'"):
        SpikingPruner(model, images, pruning_ratio=0.5, pm=pm).step()
    assert torch.equal(run(model, images), before_out)
    assert_heads_consistent(model)


def test_metapruner_step_through_our_kwargs_is_verified_and_restored(images):
    pm = layout_plugin(SpikeDrivenSelfAttention, _spike_driven_self_attention, forget_v_bn)
    model = build("spike_driven_transformer")
    before_out = run(model, images)
    pruner = tp.pruner.MetaPruner(model, images, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, **spiking_pruner_kwargs(model, images, pm=pm))
    with pytest.raises(PruningFailed, match="no longer runs after a Torch-Pruning step"):
        verified_step(pruner, images)
    assert torch.equal(run(model, images), before_out)
    good = tp.pruner.MetaPruner(model, images, importance=tp.importance.MagnitudeImportance(p=2),
                                pruning_ratio=0.5, **spiking_pruner_kwargs(model, images))
    verified_step(good, images)
    assert_heads_consistent(model)


def test_layout_with_heads_not_dividing_the_width_is_refused(images):
    pm = layout_plugin(SpikingSelfAttention, _spiking_self_attention, lambda layout: setattr(layout, "num_heads", 3))
    with pytest.raises(ValueError, match=r"attention blocks\.0\.attn: inner width 64 is not 3 equal heads"):
        SpikingGraph(build("spikformer"), images, pm=pm)


@pytest.mark.parametrize("name", list(SMALL_SVITS))
def test_save_load_round_trip_is_bitwise(name, images, tmp_path):
    model = build(name)
    plan = SpikingPruner(model, images, pruning_ratio=0.3).step()
    path = save_pruned(model, tmp_path / "m.pt", name, SMALL_SVIT_ARGS[name], tuple(images.shape), plan)
    loaded = load_pruned(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(run(loaded, images), run(model, images))
    assert_heads_consistent(loaded)


def test_foreign_and_truncated_files_are_clear_errors(tmp_path, images):
    plain = tmp_path / "plain.pt"
    torch.save(build("spikformer").state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a primesvt pruned model"):
        load_pruned(plain)
    model = spikformer.Spikformer(**SMALL_SPIKFORMER)
    good = save_pruned(model, tmp_path / "good.pt", "spikformer", SMALL_SPIKFORMER, tuple(images.shape), {})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pruned(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pruned(tmp_path / "missing.pt")


def test_a_saved_model_never_runs_code_unless_trusted(tmp_path, monkeypatch, images):
    monkeypatch.chdir(tmp_path)
    model = spikformer.Spikformer(**SMALL_SPIKFORMER)
    path = save_pruned(model, tmp_path / "evil.pt", "os:system", {"command": "touch pwned"}, tuple(images.shape), {})
    with pytest.raises(UntrustedCodeError, match="trust_code=True"):
        load_pruned(path)
    assert not (tmp_path / "pwned").exists()


def test_a_user_builder_loads_when_trusted(tmp_path, images):
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    args = {"num_classes": 10, "dim": 32, "heads": 4}
    x = torch.rand(2, 1, 16, 16)
    model = build_model("user_svit:build", args, search_path=recipes, trust_code=True)
    plan = SpikingPruner(model, x, pruning_ratio=0.5).step()
    path = save_pruned(model, tmp_path / "user.pt", "user_svit:build", args, tuple(x.shape), plan)
    loaded = load_pruned(path, trust_code=True, search_path=recipes)
    assert torch.equal(run(loaded, x), run(model, x))


@pytest.mark.parametrize("damage", ["empty", "no_plan", "plan_of_strings", "not_a_dict", "huge_example",
                                    "boolean_in_example", "float_in_example", "seven_dimensions"])
def test_damaged_pruned_model_files_are_clear_errors(damage, tmp_path, images):
    path = save_pruned(spikformer.Spikformer(**SMALL_SPIKFORMER), tmp_path / "m.pt", "spikformer",
                       SMALL_SPIKFORMER, tuple(images.shape), {})
    payload = torch.load(path, weights_only=True)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "no_plan":
        del payload["plan"]
        torch.save(payload, path)
    elif damage == "plan_of_strings":
        payload["plan"] = {"blocks.0": ["a"]}
        torch.save(payload, path)
    elif damage in EXAMPLE_SHAPES:  # the loader builds a zero example of this shape: bounded, whole numbers
        payload["example_shape"] = EXAMPLE_SHAPES[damage]
        torch.save(payload, path)
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="m.pt"):
        load_pruned(path)


EXAMPLE_SHAPES = {"huge_example": [100000, 100000, 100000], "boolean_in_example": [True, 1, 16, 16],
                  "float_in_example": [1.0, 3, 32, 32], "seven_dimensions": [1] * 7}


def test_prime_is_deterministic_and_leaves_the_input_alone(images):
    model = build("spikformer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = run(model, images).mean(0).argmax(1)

    def agreement(m):
        return float((run(m, images).mean(0).argmax(1) == target).float().mean())

    reports = [prime(model, images, agreement, memory_saving=0.3, max_accuracy_drop=0.5, progress=False).report
               for _ in range(2)]
    for key in ("plan", "pruned", "groups", "evaluations"):
        assert getattr(reports[0], key) == getattr(reports[1], key)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batch_of_one_and_a_single_time_step(images):
    model = spikformer.Spikformer(**{**SMALL_SPIKFORMER, "T": 1})
    x = images[:1]
    before_out, before_params = run(model, x), param_count(model)
    SpikingPruner(model, x, pruning_ratio=0.5).step()
    assert run(model, x).shape == before_out.shape and param_count(model) < before_params


def test_nothing_prunable_is_reported_not_crashed():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(2, 3, 2, 2)
    result = prime(model, x, lambda m: 1.0, memory_saving=0.2, max_accuracy_drop=0.01, progress=False)
    assert result.report.reason.startswith("nothing to prune")
    assert not result.report.constraints_met and result.report.plan == {}
    assert torch.equal(result.model(x), model(x))


def test_everything_ignored_prunes_nothing(images):
    model = build("spikformer")
    before = run(model, images)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    pruner = SpikingPruner(model, images, pruning_ratio=0.5, ignored_layers=convs + list(model.modules()))
    assert pruner.plan() == {}
    pruner.step()
    assert torch.equal(run(model, images), before)


@pytest.mark.parametrize("saving, drop", [(0.0, 1.0), (0.001, 1.0), (0.99, 1.0), (0.5, 0.0)])
def test_constraint_limits(saving, drop, images):
    model = build("spikformer")
    result = prime(model, images, lambda m: 0.5, memory_saving=saving, max_accuracy_drop=drop, progress=False)  # pruning never costs accuracy
    report = result.report
    before, after = footprint(model, images).param_bytes, footprint(result.model, images).param_bytes
    assert report.pruned.memory_saving == pytest.approx(1 - after / before, abs=1e-12)
    if saving == 0.0:
        assert report.constraints_met and report.plan == {} and after == before
        assert report.evaluations == 1  # the baseline only: nothing to search for
    elif saving < 0.01:
        assert report.constraints_met and report.plan and after < before
    elif saving >= 0.99:  # out of reach even at the highest rates, and the reason says so (not the budget)
        assert not report.constraints_met and "every group is already at the highest rate" in report.reason
        assert all(g.chosen_rate == max(report.rates) for g in report.groups)
    else:  # a zero drop budget is no obstacle when accuracy never moves: the target is reached
        assert report.constraints_met and report.pruned.memory_saving >= 0.5
    run(result.model, images)


@pytest.mark.parametrize("bad", [dict(memory_saving=-0.1), dict(memory_saving=1.0), dict(max_accuracy_drop=-1),
                                 dict(max_accuracy_drop=None), dict(rates=[0.0, 0.5]), dict(rates=[]),
                                 dict(memory="flops")])
def test_invalid_policy_arguments(bad, images):
    args = dict(memory_saving=0.2, max_accuracy_drop=0.01) | bad
    with pytest.raises(ValueError):
        prime(build("spikformer"), images, lambda m: 1.0, progress=False, **args)


def test_tiny_and_malformed_data(tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="0 samples are too few"):
        npz_splits(empty)
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, x=np.zeros((3, 8, 8), np.float32), y=np.arange(3))
    with pytest.raises(DataError, match="too few"):
        npz_splits(tiny)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((30, 8, 8)))
    with pytest.raises(DataError, match="must hold arrays 'x' and 'y'"):
        npz_splits(wrong)
    mismatched = tmp_path / "mismatch.npz"
    np.savez(mismatched, x=np.zeros((30, 1, 8, 8)), y=np.zeros(29))
    with pytest.raises(DataError, match=r"30 images but labels of shape \[29\]: one label per image"):
        npz_splits(mismatched)


recipe_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)
recipe_sections = st.dictionaries(
    st.sampled_from(["model", "data", "train", "prune", "finetune", "quantize", "export", "seed", "out", "extra"]),
    recipe_values | st.dictionaries(st.sampled_from(["name", "args", "epochs", "memory_saving", "rates",
                                                      "method", "formats", "checkpoint", "lr"]), recipe_values),
    max_size=6)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # examples: conftest profile
@given(recipe_sections)
def test_fuzzed_recipes_load_or_fail_cleanly(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_recipe(path)
    except RecipeError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)


PLAIN_TP_SCRIPT = """
import torch, torch.nn as nn, torch_pruning as tp
torch.manual_seed(0)
cnn = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
x = torch.rand(2, 3, 16, 16)
tp.pruner.MetaPruner(cnn, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                     ignored_layers=[cnn[-1]]).step()
print(sum(p.numel() for p in cnn.parameters()), float(cnn(x).detach().sum()))


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        self.block = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.block(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


vit = ViT().eval()
tp.pruner.MetaPruner(vit, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                     ignored_layers=[vit.head], num_heads={vit.block.self_attn: 4}).step()
print(sum(p.numel() for p in vit.parameters()), float(vit(x).detach().sum()))
"""


def test_no_global_patching_plain_torch_pruning_unchanged(images):
    fresh = subprocess.run([sys.executable, "-c", PLAIN_TP_SCRIPT], capture_output=True, text=True, check=True)
    registered = {k: type(v) for k, v in tp.DependencyGraph().REGISTERED_PRUNERS.items()}
    model = build("spikformer")
    SpikingPruner(model, images, pruning_ratio=0.3).step()  # use everything we have in this process
    printed = []
    exec(PLAIN_TP_SCRIPT, {"print": lambda *values: printed.extend(str(v) for v in values)})
    # CNN and ViT: parameter counts exactly; output sums to float32 precision (another process may pick
    # other reduction orders, and no spiking layer here turns that into a flip)
    counts, sums = [int(v) for v in printed[::2]], [float(v) for v in printed[1::2]]
    fresh_values = fresh.stdout.split()
    assert len(printed) == 4 and counts == [int(v) for v in fresh_values[::2]]
    assert sums == pytest.approx([float(v) for v in fresh_values[1::2]], rel=1e-5)
    assert {k: type(v) for k, v in tp.DependencyGraph().REGISTERED_PRUNERS.items()} == registered
    assert tp.DependencyGraph().CUSTOMIZED_PRUNERS == {}
    assert not any("forward" in m.__dict__ for m in model.modules())

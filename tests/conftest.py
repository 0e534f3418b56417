"""Shared fixtures (test helpers that are not fixtures live in svits.py)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Fuzz tests: the same 150 examples on every CI run (derandomized); HYPOTHESIS_PROFILE=dev explores more.
settings.register_profile("ci", max_examples=150, derandomize=True)
settings.register_profile("dev", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from primesvt_plugin.pruning.spiking import first_tensor, fresh_forward


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """The weights of a Spikformer that has learned digits, trained once per test session by the shipped
    ``prune_only`` recipe (16x16 images, embed_dims 64, one block) with pruning switched off: the unpruned model
    of the end-to-end tests that are not about training (77% test accuracy on this machine)."""
    from pathlib import Path

    from primesvt_plugin.pipeline.cli import main

    folder = tmp_path_factory.mktemp("digits_checkpoint")
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "prune_only.yaml"
    assert main(["run", str(recipe), "--out", str(folder / "out"), "--quiet", "--set", "train.epochs=4",
                 "--set", "train.lr=0.01", "--set", "prune=null", "--set", "export={formats: [torch]}"]) == 0
    return folder / "out" / "state_dict.pt"


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def masked_equals_pruned():
    """``check(model, x, rates)``: mask, then prune, every group at its rate (``rates`` by group name, 0.5 for the
    others); the pruned model gives the masked one's outputs and the INT8 ledger predicted its footprint."""
    import torch_pruning as tp

    from primesvt_plugin.pruning.masking import Masks
    from primesvt_plugin.pruning.memory import LedgerState, footprint, layer_outputs
    from primesvt_plugin.targets import INT8
    from primesvt_plugin.pruning.pruner import apply_plan
    from primesvt_plugin.pruning.graph import SpikingGraph

    def check(model, x, rates: dict[str, float]) -> dict[str, list[int]]:
        graph = SpikingGraph(model, x)
        groups = {g.name: g for g in graph.groups()}
        importance = tp.importance.GroupMagnitudeImportance(p=2)
        plan = {name: g.select(importance(g.importance_group), g.removable(rates.get(name, 0.5)))
                for name, g in groups.items()}
        masks, ledger = Masks(), LedgerState(model, graph.state_bytes, layer_outputs(model, x), INT8)
        for name, group in groups.items():
            masks.trial(group.channel_ops(plan[name]))
            masks.commit()
            for op in group.channel_ops(plan[name]):
                ledger.remove(op)
        masked = first_tensor(fresh_forward(model, x))
        masks.clear()
        apply_plan(graph, plan, list(groups.values()))
        torch.testing.assert_close(first_tensor(fresh_forward(model, x)), masked, rtol=1e-5, atol=1e-5)
        assert ledger.footprint() == footprint(model, x, INT8)
        return plan
    return check

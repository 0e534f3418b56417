"""PrimeSVT vs uniform L2, global L2 and random pruning at equal parameter-memory saving, on digits.

    python benchmarks/digits.py [--quick]

Trains the default recipe's Spikformer on scikit-learn's digits, then for each
wanted saving (26.68%, the paper's point, and a 10-60% sweep) runs PrimeSVT on the
validation split, and prunes the same model with each baseline to at least the
parameter saving PrimeSVT reached: Torch-Pruning's MetaPruner with our kwargs
(ratio bisected), and uniform L2 / global L2 / random plans over all our groups,
attention q/k/v included (knob bisected on the memory ledger's prediction).
Reports test accuracy without and with a short fine-tune, the measured memory,
and CPU latency (batch 1). Writes
benchmarks/results/digits.json and docs/benchmarks_digits.png and prints a
markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402

from primesvt_plugin import SpikingGraph, footprint, spiking_pruner_kwargs  # noqa: E402
from primesvt_plugin.building import build_model  # noqa: E402
from primesvt_plugin.data import digits_splits  # noqa: E402
from primesvt_plugin.latency import model_latency_ms  # noqa: E402
from primesvt_plugin.memory import LedgerState  # noqa: E402
from primesvt_plugin.policy import prime  # noqa: E402
from primesvt_plugin.pruner import apply_plan  # noqa: E402
from primesvt_plugin.recipe import load_recipe  # noqa: E402
from primesvt_plugin.training import accuracy, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.2668, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
DROP_BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.4, 1.0)


def predicted_saving(graph, groups, plan, before) -> float:
    ledger = LedgerState(graph.model, graph.state_bytes)
    for group in groups:
        for op in group.channel_ops(plan.get(group.name, [])):
            ledger.remove(op)
    return 1 - ledger.footprint().param_bytes / before.param_bytes


def smallest_plan_reaching(saving_of, make_plan, target: float, high: float = 0.9):
    """Bisect a knob in [0, high] for the smallest plan whose saving >= target."""
    low = 0.0
    if saving_of(make_plan(high)) < target:
        return make_plan(high)
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (low, middle) if saving_of(make_plan(middle)) >= target else (middle, high)
    return make_plan(high)


def metapruner_uniform(model, x, target: float):
    """Torch-Pruning's MetaPruner (L2, our spiking kwargs), ratio bisected to reach ``target``."""
    before = footprint(model, x).param_bytes

    def pruned(ratio):
        candidate = copy.deepcopy(model)
        tp.pruner.MetaPruner(candidate, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                             **spiking_pruner_kwargs(candidate, x)).step()
        return candidate

    def saving(candidate):
        return 1 - footprint(candidate, x).param_bytes / before

    return smallest_plan_reaching(saving, pruned, target)


def baseline_plan(method: str, model, x, target: float, seed: int = 0):
    graph = SpikingGraph(model, x)
    groups = graph.groups()
    before = footprint(model, x)
    l2 = tp.importance.GroupMagnitudeImportance(p=2)  # normalised to mean 1 per group: comparable globally
    scores = {g.name: l2(g.importance_group) for g in groups}
    generator = torch.Generator().manual_seed(seed)
    random_scores = {g.name: torch.rand(g.size, generator=generator) for g in groups}

    def uniform(ratio, table=scores):
        return {g.name: g.select(table[g.name], g.removable(ratio)) for g in groups}

    def global_threshold(knob):
        everything = torch.cat([scores[g.name] for g in groups])
        threshold = torch.quantile(everything, knob)
        return {g.name: g.select(scores[g.name], g.removable(float((scores[g.name] < threshold).float().mean())))
                for g in groups}

    make = {"uniform L2 (all groups)": uniform, "global L2": global_threshold,
            "random": lambda ratio: uniform(ratio, random_scores)}[method]
    plan = smallest_plan_reaching(lambda p: predicted_saving(graph, groups, p, before), make, target)
    apply_plan(model, x, groups, plan)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only the 26.68% point")
    args = parser.parse_args()
    recipe = load_recipe(ROOT / "recipes" / "spikformer_digits.yaml")
    torch.manual_seed(recipe.seed)
    data = digits_splits(image_size=16, seed=recipe.seed)
    base = build_model(recipe.model.name, recipe.model.args)
    train(base, data.loader("train", 64, shuffle=True, seed=recipe.seed), recipe.train.epochs, recipe.train.lr,
          seed=recipe.seed)
    base.eval()
    val = data.loader("val", 256, limit=recipe.data.val_subset)
    test = data.loader("test", 512)
    x = torch.from_numpy(data.x_val[:1])
    base_memory = footprint(base, x).param_bytes
    base_acc = accuracy(base, test)
    rows = [{"method": "unpruned", "target": 0.0, "saving": 0.0, "test": base_acc, "test_finetuned": base_acc,
             "latency_ms": model_latency_ms(base, x)}]

    def finetune(model):
        train(model, data.loader("train", 64, shuffle=True, seed=1), 2, 1e-3, seed=1, progress=False)

    def record(method, model, target, extra=None):
        saving = 1 - footprint(model, x).param_bytes / base_memory
        row = {"method": method, "target": target, "saving": saving, "test": accuracy(model, test),
               "latency_ms": model_latency_ms(model, x), **(extra or {})}
        tuned = copy.deepcopy(model)
        finetune(tuned)
        row["test_finetuned"] = accuracy(tuned, test)
        rows.append(row)
        print(json.dumps(row))
        return saving

    for target in TARGETS[:1] if args.quick else TARGETS:
        for budget in DROP_BUDGETS:  # the smallest accuracy budget that reaches the target
            result = prime(base, x, lambda m: accuracy(m, val), target, budget, progress=False)
            if result.report["constraints_met"]:
                break
        reached = record("PrimeSVT", result.model, target,
                         {"max_accuracy_drop": budget, "evaluations": result.report["evaluations"],
                          "search_in_evaluation_passes": result.report["search_in_evaluation_passes"],
                          "policy_seconds": sum(result.report["timings_s"].values()),
                          "footprint_saving": result.report["pruned"]["footprint_saving"]})
        record("uniform L2 (MetaPruner)", metapruner_uniform(base, x, reached), target)
        for method in ("uniform L2 (all groups)", "global L2", "random"):
            record(method, baseline_plan(method, copy.deepcopy(base), x, reached), target)

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits.json").write_text(json.dumps(rows, indent=2))
    plot(rows, ROOT / "docs" / "benchmarks_digits.png")
    print_table(rows)


def plot(rows, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in zip(axes, ("test", "test_finetuned"), ("one-shot", "after 2 fine-tune epochs")):
        for method in ("PrimeSVT", "uniform L2 (MetaPruner)", "uniform L2 (all groups)", "global L2", "random"):
            points = sorted((r["saving"], r[key]) for r in rows if r["method"] == method)
            if points:
                ax.plot([100 * s for s, _ in points], [100 * a for _, a in points], marker="o", label=method)
        ax.axhline(100 * rows[0]["test"], color="k", linestyle=":", label="unpruned")
        ax.axvline(26.68, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xlabel="parameter-memory saving (%)", title=title)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows) -> None:
    print("| target | method | parameter saving | test acc | after fine-tune | CPU latency (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {100 * r['target']:.2f}% | {r['method']} | {100 * r['saving']:.2f}% | {100 * r['test']:.2f}% "
              f"| {100 * r['test_finetuned']:.2f}% | {r['latency_ms']:.2f} |")


if __name__ == "__main__":
    main()

"""PrimeSVT vs uniform L2, global L2 and random pruning at equal parameter-memory saving, on digits.

    python benchmarks/digits.py [--quick] [--seeds 0 1 2] [--targets 0.1 0.3 0.5]
                                [--model-args '{"depths": 2, ...}'] [--epochs 12] [--drop-budgets 0.02]
                                [--finetune-epochs 2] [--baselines | --no-baselines] [--tag NAME]

Trains the default recipe's Spikformer on scikit-learn's digits, then for each
wanted saving (26.68%, the paper's point, and a 10-60% sweep) runs PrimeSVT on the
validation split, and prunes the same model with each baseline to at least the
parameter saving PrimeSVT reached: Torch-Pruning's MetaPruner with our kwargs
(ratio bisected), and uniform L2 / global L2 / random plans over all our groups,
attention q/k/v included (knob bisected on the memory ledger's prediction).
Reports test accuracy without and with a short fine-tune, the measured memory,
and CPU latency (batch 1). Every seed trains its own model (and data split),
so rows are aggregated over seeds: mean, standard deviation and the worst seed.
Writes benchmarks/results/digits.json (every row, plus the machine: CPU flags
that change numerics, library versions) and docs/benchmarks_digits.png (with
--quick: digits_quick.json, benchmarks_digits_quick.png; with --tag NAME: digits_NAME.json,
benchmarks_digits_NAME.png), and prints a markdown table for docs/benchmarks.md.
``--model-args`` replaces some of the recipe model's arguments (e.g. two blocks), ``--epochs``
its training epochs, ``--drop-budgets`` the validation budgets tried in turn (the first that
reaches the saving is used; with one budget, a saving it cannot reach gives the best feasible plan).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402

from primesvt_plugin import SpikingGraph, footprint, spiking_pruner_kwargs  # noqa: E402
from primesvt_plugin.plugins import build_model  # noqa: E402
from primesvt_plugin.pipeline.readers import digits_splits  # noqa: E402
from primesvt_plugin.deploy.latency import model_latency_ms  # noqa: E402
from primesvt_plugin.pruning.memory import LedgerState  # noqa: E402
from primesvt_plugin.pruning.policy import prime  # noqa: E402
from primesvt_plugin.pruning.pruner import apply_plan  # noqa: E402
from primesvt_plugin.pipeline.recipe import load_recipe  # noqa: E402
from primesvt_plugin.pipeline.evaluation import accuracy  # noqa: E402
from primesvt_plugin.pipeline.training import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.2668, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
DROP_BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.4, 1.0)


def predicted_saving(graph, groups, plan, before) -> float:
    ledger = LedgerState(graph.model, graph.state_bytes, {})  # parameters only: no RAM peak needed
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
    apply_plan(graph, plan, groups)
    return model


def machine() -> dict:
    """What makes numbers differ between machines: CPU, its numeric extensions, library versions."""
    from importlib.metadata import version

    flags = set()
    with contextlib.suppress(OSError):
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":")[1].split())
    numeric = sorted(flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
    return {"cpu": platform.processor() or platform.machine(), "cpu_flags": numeric,
            "versions": {name: version(name) for name in ("torch", "torch-pruning", "spikingjelly", "nncf",
                                                           "openvino", "primesvt-plugin")}}


def run_seed(seed: int, targets, model_args: dict | None = None, epochs: int | None = None,
             drop_budgets=DROP_BUDGETS, finetune_epochs: int = 2, baselines: bool = True) -> list[dict]:
    """Every method at every target, on a model trained (and a split drawn) with ``seed``."""
    recipe = load_recipe(ROOT / "recipes" / "spikformer_digits.yaml")
    torch.manual_seed(seed)
    data = digits_splits(image_size=16, seed=seed)
    base = build_model(recipe.model.name, {**recipe.model.args, **(model_args or {})})
    train(base, data.loader("train", 64, shuffle=True, seed=seed), epochs or recipe.train.epochs, recipe.train.lr,
          seed=seed, progress=False)
    base.eval()
    val = data.loader("val", 256, limit=recipe.data.val_subset)
    test = data.loader("test", 512)
    x = torch.from_numpy(data.x_val[:1])
    base_memory = footprint(base, x).param_bytes
    base_acc = accuracy(base, test)
    rows = [{"seed": seed, "method": "unpruned", "target": 0.0, "saving": 0.0, "test": base_acc,
             "test_finetuned": base_acc, "latency_ms": model_latency_ms(base, x)}]

    def finetune(model):
        train(model, data.loader("train", 64, shuffle=True, seed=seed + 1), finetune_epochs, 1e-3, seed=seed + 1,
              progress=False)

    def record(method, model, target, extra=None):
        saving = 1 - footprint(model, x).param_bytes / base_memory
        row = {"seed": seed, "method": method, "target": target, "saving": saving, "test": accuracy(model, test),
               "latency_ms": model_latency_ms(model, x), **(extra or {})}
        tuned = copy.deepcopy(model)
        finetune(tuned)
        row["test_finetuned"] = accuracy(tuned, test)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return saving

    for target in targets:
        for budget in drop_budgets:  # the smallest accuracy budget that reaches the target
            result = prime(base, x, lambda m: accuracy(m, val), memory_saving=target, max_accuracy_drop=budget, progress=False)
            if result.report.constraints_met:
                break
        reached = record("PrimeSVT", result.model, target,
                         {"max_accuracy_drop": budget, "evaluations": result.report.evaluations,
                          "search_in_evaluation_passes": result.report.search_in_evaluation_passes,
                          "policy_seconds": sum(result.report.timings_s.values()),
                          "footprint_saving": result.report.pruned.footprint_saving,
                          "constraints_met": result.report.constraints_met})
        if not baselines:
            continue
        record("uniform L2 (MetaPruner)", metapruner_uniform(base, x, reached), target)
        for method in ("uniform L2 (all groups)", "global L2", "random"):
            record(method, baseline_plan(method, copy.deepcopy(base), x, reached, seed), target)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (target, method): mean, standard deviation and worst seed of each number."""
    keys = sorted({(r["target"], r["method"]) for r in rows}, key=lambda k: (k[0] != 0.0, k[0], METHODS.index(k[1])))
    summary = []
    for target, method in keys:
        group = [r for r in rows if (r["target"], r["method"]) == (target, method)]
        row = {"target": target, "method": method, "seeds": len(group)}
        for key in ("saving", "test", "test_finetuned", "latency_ms"):
            values = [r[key] for r in group]
            row[key] = statistics.mean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{key}_worst"] = max(values) if key == "latency_ms" else min(values)
        summary.append(row)
    return summary


METHODS = ["unpruned", "PrimeSVT", "uniform L2 (MetaPruner)", "uniform L2 (all groups)", "global L2", "random"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 26.68%% point (the paper's saving)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training / split seeds (default 0 1 2)")
    parser.add_argument("--targets", type=float, nargs="+", help="parameter savings asked (default: all of TARGETS)")
    parser.add_argument("--model-args", type=json.loads, default={}, help="JSON: model arguments to replace")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    parser.add_argument("--drop-budgets", type=float, nargs="+", default=list(DROP_BUDGETS),
                        help="validation budgets tried in turn (default: %(default)s)")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="also prune with the baselines (default: yes)")
    parser.add_argument("--tag", help="name of the result files (digits_TAG.json)")
    args = parser.parse_args()
    targets = TARGETS[:1] if args.quick else tuple(args.targets or TARGETS)
    rows = [row for seed in args.seeds for row in run_seed(seed, targets, args.model_args, args.epochs,
                                                           args.drop_budgets, args.finetune_epochs, args.baselines)]
    summary = summarize(rows)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    # a quick or tagged run never overwrites the full sweep's files
    suffix = f"_{args.tag}" if args.tag else "_quick" if args.quick else ""
    (out / f"digits{suffix}.json").write_text(json.dumps({"machine": machine(), "seeds": args.seeds,
                                                          "arguments": vars(args), "summary": summary,
                                                          "rows": rows}, indent=2))
    plot(summary, ROOT / "docs" / f"benchmarks_digits{suffix}.png")
    print(json.dumps(machine()))
    print_table(summary)


def plot(summary, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in zip(axes, ("test", "test_finetuned"), ("one-shot", "after 2 fine-tune epochs")):
        for method in METHODS[1:]:
            points = sorted((r["saving"], r[key], r[f"{key}_std"]) for r in summary if r["method"] == method)
            if points:
                ax.errorbar([100 * s for s, _, _ in points], [100 * a for _, a, _ in points],
                            yerr=[100 * e for _, _, e in points], marker="o", capsize=3, label=method)
        ax.axhline(100 * summary[0]["test"], color="k", linestyle=":", label="unpruned (mean)")
        ax.axvline(26.68, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xlabel="parameter-memory saving (%)", title=title)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(summary) -> None:
    def cell(r, key):  # mean ± std (worst seed), in percent
        return f"{100 * r[key]:.2f} ± {100 * r[key + '_std']:.2f} ({100 * r[key + '_worst']:.2f})"

    print("| target | method | parameter saving % | test acc % one-shot | after fine-tune % | CPU latency ms |")
    print("|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {100 * r['target']:.2f}% | {r['method']} | {100 * r['saving']:.2f} ± {100 * r['saving_std']:.2f} "
              f"| {cell(r, 'test')} | {cell(r, 'test_finetuned')} | {r['latency_ms']:.2f} |")


if __name__ == "__main__":
    main()

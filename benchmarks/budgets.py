"""Pareto front on the default digits model: test accuracy against the bytes of the written weight file.

    python benchmarks/budgets.py [--seeds 0 1 2] [--budgets 80000 65000 53976 45000 35000]
                                 [--ratios 0.2 0.3 0.4 0.5] [--max-drop 0.15] [--tag NAME]
                                 [--quantizers nncf_int8 nncf_int4]

For each seed, trains the default recipe's Spikformer once (``spikformer_digits`` with
its training section only), then runs recipes from that checkpoint through the real
runner, so every number is what ``primesvt run`` writes:

- unpruned FP32: the OpenVINO export's .bin;
- NNCF INT8 alone: ``model_int8.bin``;
- uniform L2 (Torch-Pruning's MetaPruner through our kwargs, every group at ``ratio``)
  + the flash recipe's fine-tune + INT8;
- PrimeSVT with ``prune.flash_budget`` (the ``spikformer_digits_flash`` recipe, RAM budget
  off) + the same fine-tune + INT8;
- with ``--quantizers nncf_int4``: NNCF's mixed INT4/INT8 weight compression alone, and PrimeSVT
  searching the budget at that precision (``quantize.method: nncf_int4``) + the same fine-tune.

``--max-drop`` overrides the recipe's one-shot validation budget (``prune.max_accuracy_drop``,
0.15: the search's floor before fine-tuning). Writes benchmarks/results/budgets[_TAG].json and
docs/benchmarks_budgets[_TAG].png, and prints a markdown table for docs/benchmarks.md (mean over
seeds, worst seed in brackets; "met" counts the seeds whose written file kept the budget).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from primesvt_plugin.pipeline.recipe import load_recipe, shipped_recipes  # noqa: E402
from primesvt_plugin.pipeline.runner import run_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNPRUNED_FP32_PARAMS = 449_800  # bytes of FP32 parameters of the default model (the 12% = 53,976 B)


def run(recipe_name: str, out: Path, overrides: list[str]) -> dict:
    recipe = load_recipe(shipped_recipes()[recipe_name], overrides)
    return run_recipe(recipe, out=out, progress=False)


def variants(checkpoint: Path, budgets: list[int], ratios: list[float], max_drop: float | None,
             quantizers: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Name -> (shipped recipe, overrides), each starting from the trained checkpoint."""
    start = [f"model.checkpoint={checkpoint}", "train=null", "export=null"]
    found = {}
    for quantizer in quantizers:
        short = quantizer.removeprefix("nncf_")
        quantize = [f"quantize.method={quantizer}"]
        found[f"nncf {short}"] = ("spikformer_digits", start + ["prune=null", "finetune=null"] + quantize)
        if quantizer == "nncf_int8":
            for ratio in ratios:
                found[f"uniform l2 {ratio:g} + int8"] = ("spikformer_digits_flash", start + [
                    "prune.method=uniform", f"prune.ratio={ratio}", "prune.flash_budget=null", "prune.ram_budget=null"])
        for budget in budgets:
            found[f"primesvt {budget} B + {short}"] = ("spikformer_digits_flash", start + quantize + [
                f"prune.flash_budget={budget}", "prune.ram_budget=null"] + (
                [] if max_drop is None else [f"prune.max_accuracy_drop={max_drop}"]))
    return found


def one_seed(seed: int, budgets: list[int], ratios: list[float], max_drop: float | None, folder: Path,
             quantizers: list[str]) -> list[dict]:
    trained = run("spikformer_digits", folder / "trained", [f"seed={seed}", "prune=null", "finetune=null",
                                                             "quantize=null", "export.formats=[openvino]"])
    fp32 = trained["stages"][0]
    rows = [{"seed": seed, "method": "unpruned fp32", "test_accuracy": fp32["test_accuracy"],
             "flash_bytes": (folder / "trained" / "model.bin").stat().st_size}]
    checkpoint = folder / "trained" / "state_dict.pt"
    for name, (recipe, overrides) in variants(checkpoint, budgets, ratios, max_drop, quantizers).items():
        report = run(recipe, folder / name.replace(" ", "_"), [f"seed={seed}", *overrides])
        quantized = report["stages"][-1]
        rows.append({"seed": seed, "method": name, "test_accuracy": quantized["test_accuracy"],
                     "flash_bytes": quantized["weight_bytes"], "ram_bytes": report["stages"][-2].get("memory", {}).get(
                         "ram_bytes"), "checks": {k: v["ok"] for k, v in report["checks"].items()},
                     "reason": report.get("prune", {}).get("reason"),
                     "budget_met": next((v["ok"] for k, v in report["checks"].items() if k.startswith("flash <=")), None)})
        print(f"seed {seed} {name}: {100 * quantized['test_accuracy']:.2f}% at {quantized['weight_bytes']} B", flush=True)
    for row in rows:
        row["drop_points"] = 100 * (fp32["test_accuracy"] - row["test_accuracy"])
    return rows


def summary(rows: list[dict]) -> list[dict]:
    methods = list(dict.fromkeys(row["method"] for row in rows))
    table = []
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        drops = [row["drop_points"] for row in mine]
        flash = [row["flash_bytes"] for row in mine]
        met = [row.get("budget_met") for row in mine if row.get("budget_met") is not None]
        table.append({"method": method, "flash_mean": statistics.mean(flash), "flash_max": max(flash),
                      "met": f"{sum(met)}/{len(met)}" if met else "-",
                      "accuracy_mean": statistics.mean(row["test_accuracy"] for row in mine),
                      "drop_mean": statistics.mean(drops), "drop_worst": max(drops), "seeds": len(mine)})
    return table


def plot(table: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, marker in (("unpruned", "s"), ("nncf", "D"), ("uniform", "o"), ("primesvt", "^")):
        points = [t for t in table if t["method"].startswith(family)]
        ax.plot([t["flash_mean"] / 1000 for t in points], [100 * t["accuracy_mean"] for t in points], marker=marker,
                linestyle="-" if len(points) > 1 else "", label=family)
    ax.axvline(0.12 * UNPRUNED_FP32_PARAMS / 1000, color="k", linestyle="--", label="12% of FP32 params")
    ax.set(xscale="log", xlabel="weight file (kB, log)", ylabel="test accuracy (%)",
           title="digits Spikformer: accuracy vs flash")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[80000, 65000, 53976, 45000, 35000])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--max-drop", type=float, default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--quantizers", nargs="+", default=["nncf_int8"], choices=["nncf_int8", "nncf_int4"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            rows += one_seed(seed, args.budgets, args.ratios, args.max_drop, Path(folder) / f"seed{seed}",
                             args.quantizers)
    table = summary(rows)
    suffix = f"_{args.tag}" if args.tag else ""
    results = ROOT / "benchmarks" / "results" / f"budgets{suffix}.json"
    results.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                   "rows": rows, "summary": table}, indent=2))
    plot(table, ROOT / "docs" / f"benchmarks_budgets{suffix}.png")
    print("\n| method | weight file (mean, largest) | % of FP32 params | budget met | test accuracy | drop (worst seed) |")
    print("|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['method']} | {t['flash_mean']:,.0f} B ({t['flash_max']:,} B) "
              f"| {100 * t['flash_mean'] / UNPRUNED_FP32_PARAMS:.1f}% | {t['met']} | {100 * t['accuracy_mean']:.2f}% "
              f"| {t['drop_mean']:.2f} pt ({t['drop_worst']:.2f}) |")


if __name__ == "__main__":
    main()

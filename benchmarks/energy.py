"""Energy against accuracy on the default digits model, per saving level and ranking.

    python benchmarks/energy.py [--seeds 0 1 2] [--savings 0.1 0.3 0.5] [--rank-by memory energy both]
                                [--max-drop 0.05]

For each seed, trains the default recipe's Spikformer once (``spikformer_digits`` with its
training section only), then runs the same recipe from that checkpoint through the real runner
for every parameter saving and every ``prune.rank_by`` (quantize and export off; the recipe's
two-epoch fine-tune on). Each pruned model (``model.pt``, as written) is then measured on the
seed's first 256 test images with SpikingJelly's op_counter (``estimate_energy``, FP32 costs):
estimated energy, MACs and synaptic operations per image. ``--max-drop`` is the search's
one-shot validation budget (the recipe's 0.02 stops short of 50%).

Writes benchmarks/results/energy.json (every row and the machine) and docs/benchmarks_energy.png,
and prints a markdown table for docs/benchmarks.md (mean over seeds, worst seed in brackets).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from primesvt_plugin import load_pruned  # noqa: E402
from primesvt_plugin.pipeline.readers import digits_splits  # noqa: E402
from primesvt_plugin.pruning.energy import estimate_energy  # noqa: E402

from budgets import run  # noqa: E402  (one recipe through the runner)
from digits import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENERGY_IMAGES = 256


def measured(model_file: Path, images: torch.Tensor) -> dict:
    energy = estimate_energy(load_pruned(model_file).eval(), images)
    return {"energy_uj": energy.energy_pj / 1e6, "macs": energy.macs, "synaptic_ops": energy.synaptic_ops,
            "memory_access_bytes": energy.memory_access_bytes}


def one_seed(seed: int, savings: list[float], rankings: list[str], max_drop: float, folder: Path) -> list[dict]:
    trained = run("spikformer_digits", folder / "trained",
                  [f"seed={seed}", "prune=null", "finetune=null", "quantize=null", "export=null"])
    images = torch.from_numpy(digits_splits(image_size=16, seed=seed).x_test[:ENERGY_IMAGES])
    rows = [{"seed": seed, "rank_by": "unpruned", "saving_asked": 0.0, "saving": 0.0,
             "test_accuracy": trained["stages"][0]["test_accuracy"], **measured(folder / "trained" / "model.pt", images)}]
    start = [f"seed={seed}", f"model.checkpoint={folder / 'trained' / 'state_dict.pt'}", "train=null",
             "quantize=null", "export=null", f"prune.max_accuracy_drop={max_drop}"]
    for saving in savings:
        for rank_by in rankings:
            out = folder / f"{rank_by}_{saving}"
            report = run("spikformer_digits", out, start + [f"prune.memory_saving={saving}", f"prune.rank_by={rank_by}"])
            pruned = report["stages"][1]
            rows.append({"seed": seed, "rank_by": rank_by, "saving_asked": saving, "saving": pruned["parameter_saving"],
                         "test_accuracy": pruned["test_accuracy"], "met": report["prune"]["constraints_met"],
                         "evaluations": report["prune"]["evaluations"], **measured(out / "model.pt", images)})
            row = rows[-1]
            print(f"seed {seed} {rank_by} {saving:.0%}: saved {row['saving']:.1%}, test {row['test_accuracy']:.2%}, "
                  f"{row['energy_uj']:.3f} uJ", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys((row["saving_asked"], row["rank_by"]) for row in rows))
    table = []
    for saving, rank_by in keys:
        mine = [row for row in rows if (row["saving_asked"], row["rank_by"]) == (saving, rank_by)]
        entry = {"saving_asked": saving, "rank_by": rank_by, "seeds": len(mine),
                 "met": f"{sum(row['met'] for row in mine)}/{len(mine)}" if "met" in mine[0] else "-"}
        for key in ("saving", "test_accuracy", "energy_uj", "macs", "synaptic_ops"):
            values = [row[key] for row in mine]
            entry[key] = statistics.mean(values)
            entry[f"{key}_worst"] = min(values) if key in ("saving", "test_accuracy") else max(values)
        table.append(entry)
    return table


def plot(table: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for rank_by, marker in (("memory", "o"), ("energy", "s"), ("both", "^")):
        mine = [row for row in table if row["rank_by"] == rank_by]
        if mine:
            axis.plot([row["energy_uj"] for row in mine], [100 * row["test_accuracy"] for row in mine],
                      marker=marker, label=f"rank_by: {rank_by}")
            for row in mine:
                axis.annotate(f"{row['saving_asked']:.0%}", (row["energy_uj"], 100 * row["test_accuracy"]),
                              fontsize=7, textcoords="offset points", xytext=(4, 3))
    unpruned = next(row for row in table if row["rank_by"] == "unpruned")
    axis.scatter([unpruned["energy_uj"]], [100 * unpruned["test_accuracy"]], color="k", label="unpruned", zorder=3)
    axis.set_xlabel("estimated energy per image (uJ, op_counter, FP32)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Digits Spikformer: energy vs accuracy per parameter saving")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown(table: list[dict]) -> str:
    lines = ["| parameter saving asked | rank_by | met | saved | test accuracy | energy / image | MACs / image "
             "| synaptic ops / image |", "|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['saving_asked']:.0%} | {row['rank_by']} | {row['met']} | {row['saving']:.1%} "
                     f"| {row['test_accuracy']:.2%} ({row['test_accuracy_worst']:.2%}) "
                     f"| {row['energy_uj']:.3f} uJ ({row['energy_uj_worst']:.3f}) | {row['macs'] / 1e3:,.0f} k "
                     f"| {row['synaptic_ops'] / 1e3:,.0f} k |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--savings", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--rank-by", nargs="+", default=["memory", "energy", "both"],
                        choices=["memory", "energy", "both"])
    parser.add_argument("--max-drop", type=float, default=0.05, help="one-shot validation budget (default 0.05)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for seed in args.seeds
                for row in one_seed(seed, args.savings, args.rank_by, args.max_drop, Path(folder) / str(seed))]
    table = summary(rows)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "energy.json").write_text(json.dumps({"machine": machine(), "arguments": vars(args),
                                                     "summary": table, "rows": rows}, indent=2))
    plot(table, ROOT / "docs" / "benchmarks_energy.png")
    print(markdown(table))


if __name__ == "__main__":
    main()

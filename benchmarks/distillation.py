"""Fine-tuning after pruning, with and without knowledge distillation from the unpruned model, on digits.

    python benchmarks/distillation.py [--seeds 0 1 2] [--saving 0.5] [--max-drop 0.3]
                                      [--finetune-epochs N] [--finetune-lr LR] [--out FILE]

Per seed: trains the default recipe's Spikformer (``spikformer_digits``: its model,
data and ``train`` settings, 15 epochs), prunes it with ``prime()`` at a 50%
parameter-memory saving (a budget loose enough to reach it, so there is accuracy to
recover), then fine-tunes two copies of the pruned model for the recipe's 2 epochs
(lr 0.001, cosine, same data order; ``--finetune-epochs``/``--finetune-lr`` change both arms): cross-entropy only, and cross-entropy +
distillation from the frozen unpruned model (``finetune.distill: {weight: 0.5,
temperature: 4.0}``). Reports test accuracy (and top-1 agreement with the unpruned
model) per seed and as mean / standard deviation over seeds; writes every row and
the machine to ``--out`` (default benchmarks/results/distillation.json) and prints
a markdown table. About 65 s per seed on one CPU core.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from primesvt_plugin.pipeline.readers import digits_splits
from primesvt_plugin.pipeline.recipe import find_recipe, load_recipe
from primesvt_plugin.pipeline.runner import seed_everything
from primesvt_plugin.pipeline.distillation import Distillation, frozen_copy, teacher_scores
from primesvt_plugin.pipeline.evaluation import accuracy
from primesvt_plugin.pipeline.training import train
from primesvt_plugin.plugins import build_model
from primesvt_plugin.pruning.policy import prime

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("cross-entropy", "distillation")


def agreement(model, teacher, loader) -> float:
    """Top-1 agreement of ``model`` with ``teacher`` over ``loader``."""
    same = total = 0
    for x, _ in loader:
        same += int((teacher_scores(model, x).argmax(1) == teacher_scores(teacher, x).argmax(1)).sum())
        total += len(x)
    return same / total


def one_seed(recipe, seed: int, saving: float, max_drop: float, weight: float, temperature: float) -> dict:
    """Train, prune, then fine-tune both ways from the same pruned model; the accuracies."""
    clock = time.perf_counter()
    seed_everything(seed)
    data = digits_splits(**recipe.data.args, seed=seed)
    model = build_model(recipe.model.name, recipe.model.args)
    t, f = recipe.train, recipe.finetune
    train(model, data.loader("train", t.batch_size, shuffle=True, seed=seed), t.epochs, t.lr, t.weight_decay,
          seed=seed, progress=False)
    teacher = frozen_copy(model)  # what the runner keeps when finetune.distill is set
    val = data.loader("val", recipe.data.batch_size, limit=recipe.data.val_subset)
    test = data.loader("test", recipe.data.batch_size)
    example = torch.from_numpy(data.x_val[:1])
    result = prime(model, example, lambda m: accuracy(m, val), memory_saving=saving, max_accuracy_drop=max_drop,
                   progress=False)
    pruned = result.model
    row = {"seed": seed, "unpruned_test": accuracy(teacher, test), "pruned_test": accuracy(pruned, test),
           "memory_saving": result.report.pruned.memory_saving,
           "parameters": sum(p.numel() for p in pruned.parameters()),
           "unpruned_parameters": sum(p.numel() for p in teacher.parameters())}
    for arm in ARMS:
        student = copy.deepcopy(pruned)
        distill = Distillation(teacher, weight, temperature) if arm == "distillation" else None
        losses = train(student, data.loader("train", f.batch_size, shuffle=True, seed=seed + 1), f.epochs, f.lr,
                       seed=seed + 1, progress=False, schedule=f.schedule, warmup_epochs=f.warmup_epochs,
                       distill=distill)
        row[arm] = {"test": accuracy(student, test), "agreement": agreement(student, teacher, test),
                    "losses": losses}
    row["seconds"] = time.perf_counter() - clock
    return row


def summary(rows: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each arm's test accuracy and agreement."""
    def stats(values):
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    out = {"pruned_test": stats([r["pruned_test"] for r in rows]),
           "unpruned_test": stats([r["unpruned_test"] for r in rows]),
           "memory_saving": stats([r["memory_saving"] for r in rows])}
    for arm in ARMS:
        out[arm] = {key: stats([r[arm][key] for r in rows]) for key in ("test", "agreement")}
    return out


def table(result: dict) -> str:
    s, n = result["summary"], len(result["rows"])

    def cell(stat):
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"

    lines = [f"| fine-tuning ({result['epochs']} epochs) | test accuracy % (mean ± std, {n} seeds) | "
             "agreement with the unpruned model % |", "|---|---|---|",
             f"| none (unpruned model) | {cell(s['unpruned_test'])} | 100 |",
             f"| none (pruned: {cell(s['memory_saving'])}% parameter saving) | {cell(s['pruned_test'])} | |"]
    lines += [f"| {arm} | {cell(s[arm]['test'])} | {cell(s[arm]['agreement'])} |" for arm in ARMS]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--saving", type=float, default=0.5, help="prime()'s memory_saving")
    parser.add_argument("--max-drop", type=float, default=0.3,
                        help="prime()'s max_accuracy_drop: loose, so that the saving is reached")
    parser.add_argument("--weight", type=float, default=0.5, help="finetune.distill.weight")
    parser.add_argument("--temperature", type=float, default=4.0, help="finetune.distill.temperature")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tune epochs of both arms (default: the recipe's)")
    parser.add_argument("--finetune-lr", type=float, help="fine-tune learning rate of both arms (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: these small models run fastest on one core of a shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/distillation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(find_recipe("spikformer_digits"))
    changes = {"epochs": args.finetune_epochs, "lr": args.finetune_lr}
    recipe.finetune = recipe.finetune.model_copy(update={k: v for k, v in changes.items() if v is not None})
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(recipe, seed, args.saving, args.max_drop, args.weight, args.temperature))
        row = rows[-1]
        print(f"seed {seed}: unpruned {row['unpruned_test']:.4f}, pruned {row['pruned_test']:.4f} "
              f"({row['memory_saving']:.2%} saved), "
              + ", ".join(f"{arm} {row[arm]['test']:.4f}" for arm in ARMS) + f" ({row['seconds']:.0f} s)", flush=True)
    result = {"saving": args.saving, "max_accuracy_drop": args.max_drop, "epochs": recipe.finetune.epochs, "lr": recipe.finetune.lr,
              "distill": {"weight": args.weight, "temperature": args.temperature}, "rows": rows,
              "summary": summary(rows),
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

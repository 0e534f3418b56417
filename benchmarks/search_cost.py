"""How many evaluations the PrimeSVT search costs on a full-size SViT: sweep vs bisection.

    python benchmarks/search_cost.py [--inputs 16]

SpikingJelly's ``spikformer_cifar10`` (9.3M parameters, random weights, seed 0) on random
32x32 inputs; ``evaluate`` is the top-1 agreement with the unpruned model on the inputs,
with a 30-point budget, for the paper's 26.68% parameter saving. Prints, for each
(objective, search) pair: evaluations in all and per group reached, groups measured,
the saving reached and the search time. Results go into docs/benchmarks.md by hand.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from primesvt_plugin import build_model, prime
from primesvt_plugin.pruning.spiking import class_scores, fresh_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model("spikformer_cifar10", {})
    images = torch.rand(args.inputs, 3, 32, 32)
    reference = class_scores(fresh_forward(model, images)).argmax(-1)

    def agreement(m) -> float:
        return float((class_scores(m(images)).argmax(-1) == reference).float().mean())

    rows = []
    for objective, search in (("max_saving", "sweep"), ("max_saving", "bisect"), ("target", "bisect")):
        clock = time.perf_counter()
        report = prime(model, images[:2], agreement, memory_saving=0.2668, max_accuracy_drop=0.30,
                       objective=objective, search=search, progress=False).report
        reached = [g for g in report.groups if g.evaluations]
        rows.append({"objective": objective, "search": search, "evaluations": report.evaluations,
                     "groups": len(report.groups), "groups_measured": len(reached),
                     "trials_per_group_measured": round(sum(g.evaluations for g in reached) / max(len(reached), 1), 2),
                     "trials_per_group": round(sum(g.evaluations for g in report.groups) / len(report.groups), 2),
                     "saving": round(report.pruned.memory_saving, 4), "agreement": report.pruned.accuracy,
                     "search_s": report.timings_s["search"], "wall_s": round(time.perf_counter() - clock, 1)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

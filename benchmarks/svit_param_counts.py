"""Parameter counts of SpikingJelly's SViTs before/after pruning (docs/svit-pruning.md).

    python benchmarks/svit_param_counts.py > docs/svit-pruning-table.md

Models are the CPU-test configurations of tests/conftest.py plus spikformer_cifar10
at full size; pruning uses our kwargs with Torch-Pruning's MetaPruner (L2) and our
SpikingPruner (L2, attention q/k/v width included).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SMALL_SVITS, build, param_count, run  # noqa: E402

from primesvt_plugin import SpikingPruner, spiking_pruner_kwargs  # noqa: E402

RATIOS = (0.1, 0.3, 0.5)


def pruned_count(name: str, ratio: float, how: str) -> int:
    model, x = build(name), torch.rand(2, 3, 32, 32)
    if how == "metapruner":
        tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                             **spiking_pruner_kwargs(model, x)).step()
    else:
        SpikingPruner(model, x, pruning_ratio=ratio).step()
    run(model, x)
    return param_count(model)


def main() -> None:
    print("| model | unpruned | " + " | ".join(f"MetaPruner {r} | SpikingPruner {r}" for r in RATIOS) + " |")
    print("|---|---|" + "---|---|" * len(RATIOS))
    for name in SMALL_SVITS + ["spikformer_cifar10"]:
        cells = [f"{param_count(build(name)):,}"]
        for ratio in RATIOS:
            cells += [f"{pruned_count(name, ratio, how):,}" for how in ("metapruner", "spiking")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

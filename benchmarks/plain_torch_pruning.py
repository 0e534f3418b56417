"""What plain Torch-Pruning (no primesvt kwargs) does to SpikingJelly's SViTs.

    python benchmarks/plain_torch_pruning.py

MetaPruner, MagnitudeImportance(p=2), pruning_ratio=0.25, classifier ignored; then a
multi-step forward pass on a new batch after reset_net. Each model runs in its own
process with a time limit (plain tracing of QKFormer does not finish). Prints one line
per model.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SMALL_SVITS, build, run  # noqa: E402


LIMIT_S = 180


def prune_plainly(name: str) -> None:
    model, x = build(name), torch.rand(4, 3, 32, 32)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    try:
        tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.25,
                             ignored_layers=[head]).step()
        out = run(model, torch.rand(4, 3, 32, 32))
        print(f"{name}: ran, output {tuple(out.shape)}")
    except Exception as error:  # the point of this script is to show the failure
        print(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")


def main() -> None:
    for name in SMALL_SVITS + ["spikformer_cifar10"]:
        try:
            result = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=LIMIT_S)
            print(result.stdout.strip() or f"{name}: crashed: {result.stderr.strip().splitlines()[-1]}")
        except subprocess.TimeoutExpired:
            print(f"{name}: did not finish in {LIMIT_S} s (killed)")


if __name__ == "__main__":
    prune_plainly(sys.argv[1]) if len(sys.argv) > 1 else main()

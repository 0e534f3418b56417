"""The authors' SViT shapes trained briefly on digits at 32x32, pruned by prime() with no layout written.

    python benchmarks/authors_shapes_digits.py [--shapes spikformer sdt qkformer] [--seeds 0 1 2]
                                               [--epochs 6] [--out benchmarks/results/authors_shapes_digits.json]

For each shape (tests/authors_shapes.py: Spikformer's and QKFormer's; recipes/ported_sdt.py: the
Spike-Driven Transformer's) and seed: train ``--epochs`` epochs on scikit-learn's digits resized to
32x32 (AdamW 3e-3, cosine), then ``prime()`` at 25% parameter saving with validation accuracy as
``evaluate`` and a 3-point budget. Reported: the classes the unpruned model predicts on the test
split, its test accuracy, the saving reached, and the top-1 agreement of the pruned model with the
unpruned one on the held-out test images (the goal: >= 90%).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import primesvt_plugin as ps
from primesvt_plugin.pipeline.readers import digits_splits
from primesvt_plugin.pipeline.evaluation import accuracy, logits
from primesvt_plugin.pipeline.training import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from authors_shapes import QKFormerLike, SpikformerLike  # noqa: E402


def build(shape: str) -> torch.nn.Module:
    if shape == "spikformer":
        return SpikformerLike(in_channels=1, embed_dims=64, num_heads=4, depths=2, T=2)
    if shape == "qkformer":
        return QKFormerLike(in_channels=1, embed_dims=64, T=2)
    return ps.build_model("ported_sdt:build", dict(image_size=32, patch_size=4, in_channels=1, num_classes=10,
                                                   embed_dims=64, num_heads=4, depths=2, T=2),
                          search_path=ROOT / "recipes", trust_code=True)


def predictions(model, loader) -> torch.Tensor:
    return torch.cat([logits(model, images).argmax(1) for images, _ in loader])


def one(shape: str, seed: int, epochs: int) -> dict:
    torch.manual_seed(seed)
    data = digits_splits(image_size=32, seed=seed).datasets()
    model = build(shape)
    clock = time.perf_counter()
    train(model, data.loader("train", 64, shuffle=True, seed=seed), epochs, lr=0.003, seed=seed, progress=False)
    trained_s = time.perf_counter() - clock
    val, test = data.loader("val", 128), data.loader("test", 128)
    unpruned = predictions(model, test)
    example = torch.from_numpy(data.images("val", 2))
    clock = time.perf_counter()
    result = ps.prime(model, example, lambda m: accuracy(m, val), memory_saving=0.25, max_accuracy_drop=0.03,
                      progress=False)
    pruned = predictions(result.model, test)
    row = {"shape": shape, "seed": seed, "classes_predicted": len(set(unpruned.tolist())),
           "test_accuracy": accuracy(model, test), "pruned_test_accuracy": accuracy(result.model, test),
           "parameter_saving": result.report.pruned.parameter_saving, "constraints_met": result.report.constraints_met,
           "agreement": float((pruned == unpruned).float().mean()), "evaluations": result.report.evaluations,
           "train_s": trained_s, "prime_s": time.perf_counter() - clock}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["spikformer", "sdt", "qkformer"],
                        choices=("spikformer", "sdt", "qkformer"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/authors_shapes_digits.json"))
    args = parser.parse_args()
    rows = [one(shape, seed, args.epochs) for shape in args.shapes for seed in args.seeds]
    for shape in args.shapes:
        agreements = [r["agreement"] for r in rows if r["shape"] == shape]
        print(f"{shape}: agreement {statistics.mean(agreements):.1%} mean, {min(agreements):.1%} worst")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "epochs": args.epochs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

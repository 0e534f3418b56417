"""SpikingPruner's step against Torch-Pruning's MetaPruner with our kwargs, for one version of the package.

    python benchmarks/pruner_steps.py [--models NAME ...] [--repeats 5] [--out FILE]
    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old python benchmarks/pruner_steps.py --out FILE

Times, as scale.py does, each pruner from its construction to the end of its step at
ratio 0.3 on a fresh copy of each model (random weights, seed 0), median of
``--repeats`` runs taken in turns. The package timed is whichever ``primesvt_plugin``
Python imports (printed first): with ``PYTHONPATH`` set to a worktree of an older
commit, two runs in one session compare versions on the same machine state. ``--out``
writes the package path, the machine and every row as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import primesvt_plugin
from primesvt_plugin import build_model
from primesvt_plugin.deploy.export import cpu_description
from scale import MODELS, pruner_step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["spikformer_cifar10", "maxformer_cifar", "spikformer_ti", "sdt_8_384",
                                 "qkformer_10_384", "spikformer_cifar10 depth 8"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="JSON file for the rows (printed either way)")
    args = parser.parse_args()
    result = {"package": primesvt_plugin.__file__, "machine": {"cpu": cpu_description(), "torch": torch.__version__,
                                                                "threads": torch.get_num_threads()},
              "repeats": args.repeats, "rows": []}
    print(json.dumps({"package": result["package"]}), flush=True)
    for name in args.models:
        builder, model_args, shape = MODELS[name]
        torch.manual_seed(0)
        model = build_model(builder, model_args).eval()
        steps = pruner_step_seconds(model, torch.rand(2, *shape), args.repeats)
        ratio = steps["spikingpruner_s"] / steps["metapruner_s"]
        result["rows"].append({"model": name, **{k: round(v, 3) for k, v in steps.items()}, "ratio": round(ratio, 2)})
        print(json.dumps(result["rows"][-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Does aligning pruned widths pay in latency? Unpruned vs ``prime()`` at ``round_to`` 1 and 16.

    python benchmarks/alignment.py [--models maxformer_cifar spikformer_ti] [--round-to 1 16]
                                   [--batch 1] [--rounds 5] [--out benchmarks/results/alignment.json]

For each model (random weights, seed 0, as in scale.py): ``prime()`` at the paper's
26.68% parameter saving with each ``round_to`` (kept widths multiples of it; same
``evaluate`` as scale.py), then OpenVINO FP32 and NNCF INT8 builds of the unpruned and
each pruned model. The builds are timed in turns, ``--rounds`` times (median of 10 runs
each time), so a slow spell of this shared machine hits every build alike: the table
gives each build's median over rounds and its ratio to the unpruned build, the ratio
taken within each round, then the median. Prints a markdown table for
docs/benchmarks.md and writes every round to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from primesvt_plugin import build_model
from primesvt_plugin.deploy.export import cpu_description
from scale import MODELS, compiled, latency_ms, params, prime_at_paper_saving

ROOT = Path(__file__).resolve().parents[1]


def pruned_models(name: str, round_tos) -> tuple[dict, dict, tuple]:
    """The unpruned model and one ``prime()``-pruned copy of it per ``round_to`` (as scale.py prunes);
    what each ``prime()`` reached; the input shape."""
    builder, args, shape = MODELS[name]
    torch.manual_seed(0)
    unpruned = build_model(builder, args).eval()
    x = torch.rand(2, *shape)
    models, reached = {"unpruned": unpruned}, {}
    for round_to in round_tos:
        result, _ = prime_at_paper_saving(unpruned, x, shape, round_to)  # prime() prunes a copy
        report = result.report
        models[f"round_to {round_to}"] = result.model
        reached[f"round_to {round_to}"] = {"parameter_saving": report.pruned.parameter_saving,
                                           "constraints_met": report.constraints_met}
    return models, reached, shape


def rounds_of(models: dict, shape, batch: int, rounds: int) -> list[dict]:
    """``rounds`` timings of every build, taken in turns."""
    x = torch.rand(batch, *shape)
    calibration = [torch.rand(1, *shape) for _ in range(4)]
    builds = {(name, precision): run for name, model in models.items()
              for precision, run in compiled(model, x, calibration).items()}
    return [{f"{name}/{precision}": latency_ms(run, x) for (name, precision), run in builds.items()}
            for _ in range(rounds)]


def summary(models: dict, reached: dict, timings: list[dict]) -> list[dict]:
    """Per build: parameters, what prime() reached, median latency and median ratio to the unpruned build."""
    rows = []
    for key in timings[0]:
        name, precision = key.split("/")
        base = f"unpruned/{precision}"
        rows.append({"build": key, "params": params(models[name]), **reached.get(name, {}),
                     "median_ms": statistics.median(t[key] for t in timings),
                     "ratio_to_unpruned": statistics.median(t[key] / t[base] for t in timings),
                     "ratio_range": [min(t[key] / t[base] for t in timings), max(t[key] / t[base] for t in timings)]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["maxformer_cifar", "spikformer_ti"], choices=list(MODELS))
    parser.add_argument("--round-to", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/alignment.json")
    args = parser.parse_args()
    result = {"machine": {"cpu": cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "batch": args.batch, "models": {}}
    print("| model | build | params | saved | median ms | ratio to unpruned (min-max over rounds) |\n"
          "|---|---|---|---|---|---|")
    for name in args.models:
        models, reached, shape = pruned_models(name, args.round_to)
        timings = rounds_of(models, shape, args.batch, args.rounds)
        rows = summary(models, reached, timings)
        result["models"][name] = {"rounds": timings, "rows": rows}
        for r in rows:
            low, high = r["ratio_range"]
            saved = f"{100 * r['parameter_saving']:.1f}%" if "parameter_saving" in r else "-"
            print(f"| {name} | {r['build']} | {r['params'] / 1e6:.2f}M | {saved} | {r['median_ms']:.1f} | "
                  f"{r['ratio_to_unpruned']:.2f} ({low:.2f}-{high:.2f}) |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

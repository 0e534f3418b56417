"""Search wall time with 1 and 2 processes (one thread each) on the same recipe.

    python benchmarks/distributed.py [--processes 1 2] [--val 1000]

A search-only recipe (the digits Spikformer of the default recipe, trained once here,
then ``prune`` alone from its checkpoint, ``data.val_subset`` validation images) run by
``torchrun --nproc_per_node N -m primesvt_plugin run``; prints the wall time of each
and the ratio. The plan must be the same for every N (checked).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from primesvt_plugin.pipeline.recipe import find_recipe


def run(command: list[str], threads: int = 1) -> float:
    clock = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--val", type=int, default=None, help="data.val_subset (default: the whole split)")
    args = parser.parse_args()
    default = yaml.safe_load(find_recipe("spikformer_digits").read_text())
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        train = {**default, "prune": None, "finetune": None, "quantize": None, "export": None}
        (folder / "train.yaml").write_text(yaml.safe_dump(train))
        run([sys.executable, "-m", "primesvt_plugin", "run", str(folder / "train.yaml"), "--out",
             str(folder / "trained"), "--quiet"], threads=2)
        search = {**default, "train": None, "finetune": None, "quantize": None, "export": None,
                  "model": {**default["model"], "checkpoint": str(folder / "trained" / "state_dict.pt")},
                  "data": {**default["data"], "val_subset": args.val}}
        (folder / "search.yaml").write_text(yaml.safe_dump(search))
        rows, plans = [], {}
        for n in args.processes:
            out = folder / f"out{n}"
            seconds = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           "-m", "primesvt_plugin", "run", str(folder / "search.yaml"), "--out", str(out), "--quiet"])
            report = json.loads((out / "report.json").read_text())
            plans[n] = report["prune"]["plan"]
            rows.append({"processes": n, "wall_s": round(seconds, 1), "search_s": report["prune"]["timings_s"]["search"],
                         "evaluations": report["prune"]["evaluations"]})
            print(json.dumps(rows[-1]), flush=True)
        assert all(plan == plans[args.processes[0]] for plan in plans.values()), "plans differ between runs"
        base = rows[0]
        for row in rows[1:]:
            print(f"{row['processes']} processes: search {base['search_s'] / row['search_s']:.2f}x faster, "
                  f"wall {base['wall_s'] / row['wall_s']:.2f}x")


if __name__ == "__main__":
    main()

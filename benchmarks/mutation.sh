#!/usr/bin/env bash
# Mutation testing of the core modules against the fast core tests (docs/testing.md).
#
#   benchmarks/mutation.sh                    # policy importance memory masking channels graph accounting search
#   benchmarks/mutation.sh policy graph       # some modules only (a staged run)
#   MUTMUT_CHILDREN=1 benchmarks/mutation.sh  # parallel test runs (default 2)
#
# mutmut (>= 3.8, `pip install -e ".[dev]"`) reads [tool.mutmut] in pyproject.toml: it
# copies primesvt_plugin/ into mutants/ (git-ignored), mutates only the core modules of primesvt_plugin/pruning/
# there and runs tests/test_core.py, test_ledger.py and test_channels.py against each mutant (only the tests that reach the
# mutated function). The working tree is never changed; never run `mutmut apply`.
# Results are cached in mutants/: a second run only re-tests mutants whose function or
# tests changed. Prints mutants / killed / survived / timeout / other and the score per
# module, then the surviving mutants (`mutmut show NAME` shows one's diff).
set -euo pipefail
cd "$(dirname "$0")/.."
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=(policy importance memory masking channels graph accounting search)
patterns=()
for m in "${modules[@]}"; do patterns+=("primesvt_plugin.pruning.$m.*"); done
mkdir -p mutants
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${patterns[@]}" > mutants/run.log 2>&1 || {
    echo "mutmut run failed, see mutants/run.log" >&2; tail -20 mutants/run.log >&2; exit 1; }
mutmut results --all true > mutants/results.txt
python - "${modules[@]}" <<'PY'
import collections, sys

modules = sys.argv[1:]
status = collections.defaultdict(collections.Counter)
survivors = []
for line in open("mutants/results.txt"):
    name, _, result = line.strip().partition(": ")
    module = name.split(".")[2] if name.count(".") >= 3 else ""
    if module in modules:
        status[module][result] += 1
        if result != "killed":
            survivors.append(f"{name}: {result}")
print(f"{'module':12} {'mutants':>7} {'killed':>7} {'survived':>8} {'timeout':>7} {'other':>5} {'score':>6}")
total = collections.Counter()
for module in modules:
    c = status[module]
    total.update(c)
    n = sum(c.values())
    other = n - c["killed"] - c["survived"] - c["timeout"]
    print(f"{module:12} {n:7} {c['killed']:7} {c['survived']:8} {c['timeout']:7} {other:5} "
          f"{c['killed'] / max(n, 1):6.1%}")
n = sum(total.values())
print(f"{'all':12} {n:7} {total['killed']:7} {total['survived']:8} {total['timeout']:7} "
      f"{n - total['killed'] - total['survived'] - total['timeout']:5} {total['killed'] / max(n, 1):6.1%}")
print("\nnot killed:")
print("\n".join(survivors) or "none")
PY

"""``primesvt``: run and validate recipes, list plugins."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .data import DataError
from .plugins import PluginError, get_plugin_manager, plugin_table
from .serialization import CheckpointError
from .recipe import RecipeError, load_recipe

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="primesvt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a recipe: train, prune, quantize, export")
    run.add_argument("recipe", type=Path)
    run.add_argument("--out", type=Path, help="output folder (default: the recipe's 'out')")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. --set prune.memory_saving=0.3 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    validate = commands.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    commands.add_parser("plugins", help="list loaded plugins and what they register")
    return parser


def _plugins() -> None:
    from .plugins import merged_registry

    pm = get_plugin_manager()
    for name, module, dist in plugin_table(pm):
        print(f"{name:16s} {module:40s} from {dist}")
    for hook, what in [("primesvt_model_builders", "models"), ("primesvt_datasets", "datasets"),
                       ("primesvt_importances", "importances"), ("primesvt_quantizers", "quantizers"),
                       ("primesvt_exporters", "exporters")]:
        print(f"{what}: {', '.join(sorted(merged_registry(pm, hook)))}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "plugins":
            _plugins()
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        from .runner import preflight, run_recipe

        if args.command == "validate":
            preflight(recipe, get_plugin_manager())
            print(f"{args.recipe}: ok")
            return 0
        report = run_recipe(recipe, out=args.out, progress=not args.quiet)
    except (RecipeError, PluginError, DataError, CheckpointError) as error:
        print(f"primesvt: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for stage in report["stages"]:
        acc = stage.get("test_accuracy")
        print(f"{stage['stage']:>22s}: test accuracy {100 * acc:.2f}%" + (
            f", weights {stage['weight_bytes']} B" if stage.get("weight_bytes") else ""))
    for name, check in report["checks"].items():
        print(f"{'PASS' if check['ok'] else 'FAIL'} {name}: {check['detail']}")
    print(f"wrote {report['out']} in {report['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

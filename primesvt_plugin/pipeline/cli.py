"""``primesvt``: run and validate recipes, list plugins.

Exit codes: 0 done, every check passed; 1 the run failed (nothing written);
2 bad input (recipe, --set, file, --out; found before the run: nothing ran, or in the
data while it ran: nothing written); 3 the run finished and
wrote its outputs but some of its checks failed; 130 / 143 interrupted
(Ctrl-C / SIGTERM; nothing written).
"""
from __future__ import annotations

import argparse
import json
import os
import contextlib
import ctypes
import logging
import signal
import sys
import threading
from pathlib import Path

from .. import distributed
from ..errors import Interrupted, PrimeSVTError, first_line
from ..plugins import get_plugin_manager
from .output import resume_folder
from .recipe import find_recipe, load_recipe

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CHECKS_FAILED = 3
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="primesvt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a recipe: train, prune, quantize, export")
    validate = commands.add_parser("validate", help="check a recipe: names, files, arguments, the model on one sample")
    for command in (run, validate):
        command.add_argument("recipe", help="a recipe file, or the name of a recipe shipped with primesvt "
                                            "(e.g. spikformer_digits)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a recipe field, e.g. --set prune.memory_saving=0.3 (repeatable)")
        command.add_argument("--allow-code", action="store_true",
                             help="let a 'module:function' model name import and run that Python code")
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    run.add_argument("--out", type=Path, help="output folder (default: the recipe's 'out'); only a previous "
                                              "run's output is ever replaced")
    run.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    run.add_argument("--nproc", type=_process_count, metavar="N",
                     help="run in N processes on this machine (PyTorch's elastic agent, as torchrun --standalone --nproc_per_node N) "
                          "(docs/distributed.md)")
    run.add_argument("--resume", action="store_true",
                     help="continue the fine-tuning of an interrupted run into the same output folder from its "
                          "last finished epoch (the checkpoint in .OUT.resume/ beside it); without one, start over")
    commands.add_parser("plugins", help="list loaded plugins and what they register")
    commands.add_parser("schema", help="print the recipe schema (JSON Schema, for editors and YAML language "
                                       "servers): every field, its type, default and meaning")
    return parser


def _plugins() -> None:
    import textwrap

    from ..plugins import plugin_details, registries

    def show(label: str, names: list[str], indent: int = 4) -> None:
        if names:
            print(textwrap.fill(", ".join(names), width=100, initial_indent=f"{' ' * indent}{label}: ",
                                subsequent_indent=" " * (indent + 4), break_on_hyphens=False))

    pm = get_plugin_manager()
    for row in plugin_details(pm):
        print(f"{row.name} = {row.module}  ({row.distribution})")
        by_module: dict[str, list[str]] = {}
        for qualified in row.layer_types:
            module, _, cls = qualified.rpartition(".")
            by_module.setdefault(module, []).append(cls)
        if by_module:
            print("    neuron types:")
        for module, classes in by_module.items():
            show(module, classes, indent=6)
        show("per-module hooks", row.per_module_hooks)
        for what, names in row.registries.items():
            show(what, names)
    print("registries (all plugins):")
    for what, registry in registries(pm).all().items():
        show(what, registry.names())


def _stop_on_sigterm(signum, frame) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def _resumable(args) -> str:
    """A note for a run that stopped and left a fine-tuning checkpoint (or found one and left it)."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is None or not checkpoint.is_file():
        return ""
    return f"; rerun with --resume to continue fine-tuning from {checkpoint.parent}"


def _stop_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM an error was raised while handling, if any: a stop that lands in a
    C extension's import or in a plugin's loader comes back as an ImportError or a DataError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _interrupted(stop: KeyboardInterrupt, args) -> int:
    _stop_was_handled()
    signum = signal.SIGTERM if isinstance(stop, Interrupted) else signal.SIGINT
    if distributed.prefix():  # torchrun stopped this rank (another failed, or Ctrl-C): torchrun says why
        return EXIT_INTERRUPTED[signum]
    _error(f"{str(stop) or 'interrupted (Ctrl-C)'}; nothing was written, a previous output is unchanged"
           f"{_resumable(args)}")
    return EXIT_INTERRUPTED[signum]


def _stop_was_handled() -> None:
    """Tell CPython the KeyboardInterrupt (or ``Interrupted``) was handled.

    CPython 3.11 sets a flag when a KeyboardInterrupt leaves code run through ``PyRun_*``,
    which C extensions call, even when Python code catches it afterwards; ``python -m``
    then ends by killing itself with SIGINT instead of exiting with our 130 / 143 (seen
    in about one Ctrl-C of six during training). Elsewhere the flag is absent: nothing to do.
    """
    with contextlib.suppress(AttributeError, ValueError, OSError):  # not CPython 3.11, or no such symbol
        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0


def _error(message: str) -> None:
    print(f"primesvt: error: {distributed.prefix()}{message}", file=sys.stderr)


def _process_count(text: str) -> int:
    """``--nproc``'s value: a whole number of processes, at least 1."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"the number of processes must be a whole number >= 1, got {text!r}")
    return count


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N``: what each of the N processes runs."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return rest


def _run_processes(args, recipe) -> int:
    """``primesvt run ... --nproc N``: the recipe checked here, once, then run in N processes."""
    from .launcher import run_processes
    from .output import check_output
    from .runner import preflight

    preflight(recipe, get_plugin_manager(), args.allow_code)
    out = check_output(args.out or recipe.out)
    outcome = run_processes(_without_nproc(args.argv), args.nproc, out)
    if outcome.message:
        if outcome.exit_code:
            _error(outcome.message)
        else:
            print(f"primesvt: {outcome.message}", file=sys.stderr)
    return outcome.exit_code


def _run(args) -> int:
    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    if getattr(args, "nproc", None) is not None:
        return _run_processes(args, recipe)
    distributed.init_from_environment()  # under torchrun: join its process group (a no-op otherwise)
    from .runner import failed_checks, preflight, probe, run_recipe  # heavy imports only when running

    if args.command == "run":  # for _resumable's note
        args.checkpoint = resume_folder(args.out or recipe.out) / "finetune.pt"

    pm = get_plugin_manager()
    if args.command == "validate":
        preflight(recipe, pm, args.allow_code)
        probe(recipe, pm, args.allow_code)
        print(f"{args.recipe}: ok")
        return 0
    report = run_recipe(recipe, out=args.out, progress=not args.quiet and distributed.is_main(),
                        allow_code=args.allow_code, resume=args.resume)
    if not distributed.is_main():
        return 0  # rank 0 reports for everyone
    for stage in report["stages"]:
        acc = stage.get("test_accuracy")
        print(f"{stage['stage']:>22s}: test accuracy {100 * acc:.2f}%" + (
            f", weights {stage['weight_bytes']} B" if stage.get("weight_bytes") else "") + (
            f", runs at {stage['inference_precision']}" if stage.get("inference_precision") else ""))
    for name, check in report["checks"].items():
        print(f"{'PASS' if check['ok'] else 'FAIL'} {name}: {check['detail']}")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"wrote {report['out']} in {report['seconds']:.1f} s")
    failed = failed_checks(report)
    if failed:
        _error(f"{len(failed)} check(s) failed ({'; '.join(failed)}); the outputs were written to {report['out']}")
        return EXIT_CHECKS_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    # SpikingJelly registers its kernels as torch custom ops; on CPU-only installs torch then warns
    # "Triton not available" on stderr, which says nothing about the run and breaks one-line errors.
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
    if args.command == "schema":
        from .recipe import Recipe

        print(json.dumps(Recipe.model_json_schema(), indent=2))
        return 0
    if args.command == "plugins":
        try:
            _plugins()
        except PrimeSVTError as error:  # a plugin that fails to import or answers wrongly: one line naming it
            _error(first_line(error))
            return error.exit_code
        return 0
    args.argv = sys.argv[1:] if argv is None else argv
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal() works there only
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if in_main_thread else None
    try:
        return _run(args)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as Interrupted
        return _interrupted(stop, args)
    except PrimeSVTError as error:
        if _stop_behind(error):
            return _interrupted(_stop_behind(error), args)
        if args.debug:
            raise
        before_running = error.exit_code == EXIT_BAD_INPUT and not error.while_running
        kept = "" if before_running else "; the output folder was left as it was"
        _error(f"{first_line(error)}{kept}{_resumable(args) if kept else ''}")
        return error.exit_code
    except Exception as error:
        if _stop_behind(error):
            return _interrupted(_stop_behind(error), args)
        if args.debug:
            raise
        if distributed.lost_peer(error):  # the process that stopped first says why (or its launcher does)
            _error("stopped: another process of this run stopped first (its connection closed); nothing was "
                   f"written{_resumable(args)}")
            return EXIT_FAILED
        _error(f"unexpected {type(error).__name__}: {first_line(error)}; nothing was written (rerun with --debug for the "
               f"traceback, and please report it){_resumable(args)}")
        return EXIT_FAILED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()


def entry() -> None:
    """The ``primesvt`` command: ``main``'s exit code. After a stop (130 / 143) the process ends at once, its
    output already cleaned up: a thread a library left running (an idle ``ThreadPoolExecutor`` worker, seen
    once in a SIGTERM mid-training under load) must not keep a stopped run alive at interpreter shutdown."""
    code = main()
    if code in EXIT_INTERRUPTED.values():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

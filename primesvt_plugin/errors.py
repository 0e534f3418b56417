"""Every exception primesvt raises on purpose, under one base: catch ``PrimeSVTError``.

Two families, told apart by what the user should do:

* ``InputError``: what the user gave is wrong (a recipe field, a file, an
  argument, a model no plugin can handle). Nothing ran or nothing was written;
  fix the input and run again. The CLI exits with 2.
* ``RunFailed``: the input was fine but the work could not be done safely (an
  export computes something else, a structural change broke the model). The
  model or output was left as it was. The CLI exits with 1.

Each class also derives from the builtin exception it used to be, so code
catching ``ValueError`` / ``RuntimeError`` / ``TypeError`` keeps working.
"""
from __future__ import annotations

import re


MAX_MESSAGE = 1000  # characters of an error message shown: input echoed in a message is never unbounded

# torch re-raises an error of a DataLoader worker process with the worker's traceback as its message
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback")


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line reports.

    An error raised in a DataLoader worker process says what the worker's error said."""
    text = str(error).strip()
    if _WORKER_ERROR.match(text):
        original = text.splitlines()[-1]  # "package.module.ErrorType: message"
        text = original.split(": ", 1)[1] if ": " in original else original
    return shorten((text.splitlines() or [type(error).__name__])[0])


class PrimeSVTError(Exception):
    """Base of every error primesvt raises on purpose."""

    exit_code = 1
    # set by the runner when the error came after the run had started (bad input found deep in the data):
    # the exit code stays the error's, and the user is told the output folder was left as it was
    while_running = False


class InputError(PrimeSVTError):
    """The user's input is wrong; the message names it and says what to do."""

    exit_code = 2


class RunFailed(PrimeSVTError):
    """The work could not be done safely; nothing broken was kept or written."""

    exit_code = 1


# -- input --------------------------------------------------------------------


class ArgumentError(InputError, ValueError):
    """An argument of a public function is out of range or of the wrong type."""


class RecipeError(InputError, ValueError):
    """A recipe file is missing, not YAML, or does not fit the schema; the message names the field."""


class DataError(InputError, ValueError):
    """A dataset file or folder is missing or malformed, or its arguments are wrong."""


class CheckpointError(InputError, ValueError):
    """A file is not a readable primesvt model (pruned checkpoint, state dict or OpenVINO IR)."""


class OutputError(InputError, OSError):
    """The output folder cannot be written safely (not ours to replace, locked, read-only)."""


class PluginError(InputError, RuntimeError):
    """A plugin is missing, clashes with another, or returned something unusable."""


class UntrustedCodeError(PluginError):
    """A recipe or file names Python code to import, and the user did not allow running code."""


class LayoutError(PluginError, ValueError):
    """An attention layout is inconsistent with its module (heads not dividing the width)."""


class UnhandledLayerError(InputError, TypeError):
    """The model holds a layer that no plugin knows how to prune; the message names it and the hook."""


class EvaluationError(InputError, ValueError):
    """``evaluate`` returned something that is not a finite number."""


# -- failed work ----------------------------------------------------------------


class PruningFailed(RunFailed, RuntimeError):
    """A structural change broke the model; the model was restored to its state before pruning."""


class ExportError(RunFailed, RuntimeError):
    """The model cannot be exported, or the export disagrees with the model; nothing was written."""


# -- stop requests ----------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGTERM; nothing was written.

    Like Ctrl-C's ``KeyboardInterrupt`` (and unlike ``PrimeSVTError``) it is not an
    ``Exception``, so no ``except Exception`` in our code or a library's swallows a
    stop request on its way out.
    """

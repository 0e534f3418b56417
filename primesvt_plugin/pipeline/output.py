"""The run's output folder: written all at once or not at all, and never anyone else's folder.

Rules (docs/reliability.md):

* a run only replaces a folder that a previous run wrote (it holds a run's
  ``report.json``) or an empty one; the working folder, a folder above it, a
  file or a mount point are refused before anything runs;
* one run at a time per output path: a lock next to it names the holder;
* files appear at the end, in one rename; a failed or interrupted run removes
  its scratch folder and the parent folders it created, and leaves a previous
  output as it was;
* files get the user's umask, like any other file they create;
* the one thing a run keeps beside ``out`` is the fine-tuning checkpoint in
  ``.NAME.resume/`` (``resume_folder``), for ``--resume`` after an interruption;
  a successful run removes it (docs/training.md).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputError

REPORT = "report.json"
RUN_FORMAT = "primesvt-run/1"  # report.json's "format": how a run's output folder is recognised


def umask_mode(directory: bool) -> int:
    """The mode the user's umask gives a new folder (``directory``) or file."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def is_previous_run(folder: Path) -> bool:
    """Whether ``folder`` is the output of a primesvt run (its report.json says so)."""
    try:
        report = json.loads((folder / REPORT).read_text())
    except (OSError, ValueError):
        return False
    # 0.1.0 wrote no format field; its reports are recognised by their sections.
    return isinstance(report, dict) and (report.get("format") == RUN_FORMAT or {"stages", "recipe_data"} <= set(report))


def check_output(out: Path) -> Path:
    """``out`` resolved, if a run may write it; otherwise ``OutputError`` saying why and what to do."""
    given = str(out)
    out = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or cwd.is_relative_to(out):
        raise OutputError(f"out {given!r} is the working folder or one above it; name a new folder, "
                          "e.g. --out runs/mine")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"out {given!r} is a file; name a folder")
        if os.path.ismount(out):
            raise OutputError(f"out {given!r} is a mount point; name a folder inside it")
        if any(out.iterdir()) and not is_previous_run(out):
            raise OutputError(f"out {given!r} exists and is not the output of a primesvt run (no run's "
                              f"{REPORT} in it); name a new folder, or move it away yourself")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        raise OutputError(f"out {given!r}: {existing} is a file, not a folder")
    if existing == out:
        existing = out.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"out {given!r}: {existing} is not writable (read-only or no permission)")
    return out


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the lock on ``out`` (a ``.NAME.lock`` file beside it); refuse if another run holds it."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # os.open applies the umask itself
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"out {str(out)!r} is being written by another primesvt run (pid {holder}); "
                              "wait for it to finish or choose another --out") from None
        # The holder before us may have removed the file after we opened it: lock the current one.
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.unlink(lock)  # while still holding it: a waiting run then locks a new file
        os.close(fd)


def resume_folder(out: Path) -> Path:
    """``.NAME.resume`` beside ``out``: where a run into ``out`` keeps its checkpoint for ``--resume``."""
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.resume"


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return the ones created, innermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A scratch folder that becomes ``out`` only if the block succeeds (then replacing a previous run).

    ``out`` is checked and locked first, before the block runs anything.
    """
    out = check_output(out)
    created = _make_parents(out.parent)
    try:
        with locked(out):
            check_output(out)  # again under the lock: another run may have written it meanwhile
            stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
            try:
                os.chmod(stage, umask_mode(True))
                yield stage
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            _replace(stage, out)
    except BaseException:
        _remove_empty(created)
        raise


def _replace(stage: Path, out: Path) -> None:
    """Move ``stage`` to ``out``, replacing a previous run; on failure say where the finished output is."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
    except OSError as error:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise OutputError(f"the run finished but could not be moved to {out} ({error.strerror}); "
                          f"the finished output is in {stage}") from None
    shutil.rmtree(old, ignore_errors=True)

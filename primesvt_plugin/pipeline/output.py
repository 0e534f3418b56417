"""The run's output folder: written all at once or not at all, and never anyone else's folder.

Rules (docs/reliability.md):

* a run only replaces an empty folder or one holding nothing but the files a
  previous run wrote (its ``report.json`` lists them); the working folder, a
  folder above it, a file or a mount point are refused before anything runs,
  and what is at ``out`` is judged again, after being renamed aside, at the end;
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
from ..files import umask_mode

REPORT = "report.json"
RUN_FORMAT = "primesvt-run/1"  # report.json's "format": how a run's output folder is recognised


def _manifest(folder: Path) -> set[str] | None:
    """The files a run wrote into ``folder`` (its report.json's ``files``), or None when no run's report is there."""
    try:
        report = json.loads((folder / REPORT).read_text())
    except (OSError, ValueError):
        return None
    files = report.get("files") if isinstance(report, dict) and report.get("format") == RUN_FORMAT else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def foreign_entry(folder: Path) -> str | None:
    """What in ``folder`` a run did not write, in words (None: the folder is empty, or holds only the
    files its run's report.json lists, so a new run may replace it)."""
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder} is {'a link' if folder.is_symlink() else 'not a folder'}"
    entries = []
    for parent, folders, files in os.walk(folder):  # links are entries, never followed
        entries += [Path(parent, name).relative_to(folder) for name in folders + files]
    if not entries:
        return None
    manifest = _manifest(folder)
    why = f"no run's {REPORT} lists its files" if manifest is None else f"not one of the files its run's {REPORT} lists"
    manifest = manifest or set()
    listed_folders = {str(parent) for name in manifest for parent in Path(name).parents}
    for entry in sorted(entries):
        is_folder = Path(folder, entry).is_dir() and not Path(folder, entry).is_symlink()
        if str(entry) not in (listed_folders if is_folder else manifest):
            return f"{entry}: {why}"
    return None


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
        foreign = foreign_entry(out)
        if foreign:
            raise OutputError(f"out {given!r} exists and is not only a previous run's output ({foreign}); "
                              "name a new folder, or move it away yourself")
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
    """Move ``stage`` to ``out``, replacing a previous run's output; refuse anything else that is there now.

    Whatever sits at ``out`` is first renamed aside (atomically) and judged there, so what is
    judged is what gets removed: a folder created or filled while the run worked is put back and
    the run refused, never deleted. Every refusal says where the finished output is.
    """
    kept = f"; the finished output is in {stage}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        os.rename(out, old)
    except FileNotFoundError:
        old = None
    except OSError as error:
        raise OutputError(f"out {str(out)!r} could not be moved aside ({error.strerror}){kept}") from None
    if old is not None:
        foreign = foreign_entry(old)
        if foreign:
            _put_back(old, out)
            raise OutputError(f"out {str(out)!r} changed while the run worked and is not only a previous run's "
                              f"output now ({foreign}); it was left as it is{kept}")
    try:
        os.rename(stage, out)  # fails when a non-empty folder appeared at out meanwhile
    except OSError as error:
        where = "" if old is None or _put_back(old, out) else f"; the previous output is in {old}"
        raise OutputError(f"the run finished but could not be moved to {out} ({error.strerror}){where}{kept}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _put_back(old: Path, out: Path) -> bool:
    """Rename ``old`` back to ``out``; whether that worked (not when something took ``out`` meanwhile)."""
    try:
        os.rename(old, out)
        return True
    except OSError:
        return False

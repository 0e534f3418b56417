"""Writing files as the user expects them: whole or not at all, with the user's umask."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask_mode(directory: bool) -> int:
    """The mode the user's umask gives a new folder (``directory``) or file."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move it to ``path``: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, umask_mode(False))  # mkstemp makes 0600; the user's umask decides
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

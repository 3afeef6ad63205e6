"""Writing output folders so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError


@contextlib.contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder; on success it becomes ``output`` in one rename."""
    if output.exists() and any(output.iterdir()):
        raise OutputExistsError(f"{output}: exists and is not empty; choose a new folder")
    temporary = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    honour_umask(temporary)
    if output.exists():
        output.rmdir()
    os.replace(temporary, output)


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no getter elsewhere: set and restore at once
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode the user's umask asks for.

    Libraries that write through a private temporary file (safetensors'
    save_pretrained) leave it 0600 while everything beside it is 0644; a shared
    model folder must not depend on which library wrote which file.
    """
    mask = current_umask()
    for directory, _, files in os.walk(folder):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o100
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)

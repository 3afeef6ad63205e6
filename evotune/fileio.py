"""Writing output folders so that a crash never leaves a half-written one behind."""

from __future__ import annotations

from .errors import OutputExistsError

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path




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
    if output.exists():
        output.rmdir()
    os.replace(temporary, output)

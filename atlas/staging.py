"""Folders and files that appear whole or not at all (an atlas artifact, a mapping output, a download)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Write into a hidden folder beside ``output``; when the block succeeds it replaces
    ``output`` by a rename, when it fails it is removed — a reader never sees half a result."""
    staging = output.parent / f".{output.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Write to a hidden file beside ``path``; when the block succeeds it replaces ``path``
    atomically, when it fails it is removed."""
    part = path.with_name(f".{path.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield part
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)

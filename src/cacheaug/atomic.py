"""Atomic writes: a file or folder is written under a temporary name beside its target and renamed into place, so
an interrupted write (Ctrl-C, SIGTERM, a full disk, a crash) never leaves something that looks complete. Every
module that persists anything (checkpoints, trainer states, the adapted decoder, the converted model, token and
corpus files, compile artifacts, the serving store) writes through these helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def write_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` writes the content to a temporary path; it is synced to disk and renamed to ``path``."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text))


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Put the finished folder ``tmp`` in place of ``final`` (an older ``final`` is removed first)."""
    final = Path(final)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def write_dir(final: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``final``, which then replaces ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def move_into(staged: str | Path, folder: str | Path, last: str = "config.json") -> None:
    """Move the files of ``staged`` into ``folder`` one by one, ``last`` after all others: a folder that has
    ``last`` is complete (how Hugging Face model folders are read)."""
    staged, folder = Path(staged), Path(folder)
    for f in sorted(staged.iterdir(), key=lambda f: f.name == last):
        os.replace(f, folder / f.name)

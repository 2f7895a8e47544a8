"""Atomic artifact writes (temp file + rename) and checked reads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from comp.errors import CompError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes private files; artifacts get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it into place only if the block succeeds. A folder already at
    `path` leaves only then (the caller decides whether one may be replaced); with `replace` False it stays, and
    what the block wrote is discarded (another process wrote the same folder first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    old = None
    try:
        yield work
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            path.rename(old / path.name)
        try:
            work.rename(path)
        except OSError:
            if old is not None:
                (old / path.name).rename(path)  # the folder that was there goes back
            if replace or not path.is_dir():
                raise
            shutil.rmtree(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: object) -> None:
    """Write JSON atomically, pretty-printed."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def seal(obj: dict) -> str:
    """The sha256 of a record's own content (every key but "check")."""
    body = {k: v for k, v in obj.items() if k != "check"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_sealed_json(path: str | Path, obj: dict) -> None:
    """Write a record with the sha256 of its own content, which read_sealed_json checks."""
    write_json(path, {**obj, "check": seal(obj)})


def read_sealed_json(path: str | Path, fix: str) -> dict:
    """A record written by write_sealed_json, refused in one line when its content no longer matches its seal."""
    record = read_json(path)
    if isinstance(record, dict) and "check" not in record:
        raise CompError(f"{path} was written by an older comp, without a checksum: {fix}")
    if not isinstance(record, dict) or record.get("check") != seal(record):
        raise CompError(f"{path} does not match the checksum it was written with (altered): {fix}")
    return record


def read_json(path: str | Path) -> dict:
    """Read a JSON artifact comp wrote; a broken one is a CompError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompError(f"{path} is unreadable ({exc.__class__.__name__}); delete it and rerun the step that wrote it") from None


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Save an array atomically (never with pickled objects)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def read_npy(path: str | Path) -> np.ndarray:
    """Load an array comp wrote, refusing pickles; a broken file is a CompError."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CompError(f"{path} is unreadable ({exc}); retrain that fold with --force") from None


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

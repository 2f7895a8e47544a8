"""What a trained fold was made from, by content: fingerprints of the columns comp reads from the training and
test tables and of the pretrained model's files. The stage checks compare these, not path strings, so moving
the project, a table or the model folder keeps trained folds valid, while a changed table or model is caught."""

from __future__ import annotations

import contextlib
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import pandas as pd

from comp import images
from comp.artifacts import write_json
from comp.config import Config, image_path, resolve_model_path, user_cache

# the files of a model folder that decide what it computes: config, weights, tokenizer
MODEL_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.gguf", "*.model", "tokenizer*", "vocab*", "merges.txt",
                  "special_tokens_map.json", "added_tokens.json")
FULL = "sha256:"  # model fingerprints over every byte; folds recorded before them hold a sampled one (no prefix)
WHOLE = 8 << 20  # the sampled fingerprint: files up to this size whole, larger ones by size and sampled blocks
BLOCK, BLOCKS = 1 << 16, 64


def digest_cache() -> Path:
    """Where the sha256 of large model files is kept by (path, size, modification time), so each is read once."""
    return user_cache() / "file-digests.json"


def used_columns(cfg: Config, with_label: bool) -> list[str]:
    d = cfg.data
    shown = [c for c in d.template_columns if c not in (d.id, *d.text_columns, *d.categorical, *d.numeric)]
    return [d.id, *d.text_columns, *d.categorical, *d.numeric, *shown] + (list(d.labels) if with_label else [])


def table_digest(frame: pd.DataFrame, columns: list[str]) -> str:
    """A hash of these columns' names and values, row by row in table order."""
    rows = pd.util.hash_pandas_object(frame[columns], index=False).to_numpy()
    return hashlib.sha256(json.dumps(columns).encode() + rows.tobytes()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of every byte of a file. A large file's is kept in digest_cache() under its path, size and
    modification time, so a model is read once, not by every command."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = digest_cache()
    known = _read_cache(cache) if stat.st_size > WHOLE else {}
    if key not in known:
        known[key] = images.sha256_of(path)
        if stat.st_size > WHOLE:
            with contextlib.suppress(OSError):  # a read-only home: the digest is computed again next time
                write_json(cache, {**_read_cache(cache), key: known[key]})
    return known[key]


def _read_cache(path: Path) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def sampled_digest(path: Path) -> str:
    """The fingerprint folds recorded before FULL ones: sha256 of a file, or for a large one of its size and
    BLOCKS evenly spaced blocks (which can miss a changed layer)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= WHOLE:
            h.update(f.read())
        else:
            for i in range(BLOCKS):
                f.seek((size - BLOCK) * i // (BLOCKS - 1))
                h.update(f.read(BLOCK))
    return h.hexdigest()


@lru_cache(maxsize=16)
def _folder_digest(folder: str, stamp: tuple, full: bool) -> str:
    h = hashlib.sha256()
    for p in _model_files(Path(folder)):
        h.update(f"{p.name}|{file_digest(p) if full else sampled_digest(p)}|".encode())
    return (FULL if full else "") + h.hexdigest()[:16]


def _model_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in MODEL_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def folder_digest(folder: Path, full: bool = True) -> str:
    """The fingerprint of a model folder's files (config, weights, tokenizer), wherever the folder is: over
    every byte (FULL), or `full` off the sampled one that older folds and bundles recorded."""
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _model_files(folder))
    return _folder_digest(str(folder.resolve()), stamp, full)


def folder_matches(folder: Path, recorded: str) -> bool:
    """Whether a model folder is the one a fingerprint was recorded of, in the scheme it was recorded in."""
    return folder.is_dir() and folder_digest(folder, recorded.startswith(FULL)) == recorded


def model_digest(cfg: Config, full: bool = True) -> str | None:
    """The pretrained model's fingerprint (None for runs without one; `full` off: the older sampled one). A name
    that is no local folder (a hub id) is its own identity."""
    if cfg.model.kind != "encoder":
        return None
    image = image_path(cfg.model.name_or_path)
    if image is not None and not (cfg.root / cfg.model.name_or_path).is_dir():  # the image, not its rebuilt folder
        return f"image:{images.image_digest(image)[:16]}"
    folder = Path(resolve_model_path(cfg.model.name_or_path, cfg.root))
    if not folder.is_dir():
        return f"name:{cfg.model.name_or_path}"
    return folder_digest(folder, full)


def tables(cfg: Config, comp) -> dict:
    """The training rows' (with labels) and the test rows' fingerprints, computed once per loaded competition
    and set of columns."""
    train, test = used_columns(cfg, True), used_columns(cfg, False)
    key = (tuple(train), tuple(test))
    if key not in comp.digests:
        comp.digests[key] = {"train": table_digest(comp.train, train), "test": table_digest(comp.test, test)}
    return dict(comp.digests[key])


def content(cfg: Config, comp) -> dict:
    """What a fold records of its inputs: the tables and the model."""
    return {**tables(cfg, comp), "model": model_digest(cfg)}



WHAT = {"train": "the training table's content", "test": "the test table's content",
        "model": "the model's files (model.name_or_path)"}


def changed(recorded: dict | None, now: dict, cfg: Config | None = None) -> str | None:
    """What, of the parts in `now`, differs from a fold's recorded content, in words (None when nothing does,
    or when the fold predates content records). `cfg`: where the fold recorded the older sampled model
    fingerprint, cfg's model is fingerprinted that way to compare."""
    if recorded is None:
        return None
    old = recorded.get("model")
    if cfg is not None and "model" in now and isinstance(old, str) and not old.startswith((FULL, "name:", "image:")):
        now = {**now, "model": model_digest(cfg, full=False)}
    diff = [WHAT[k] for k, v in now.items() if recorded.get(k) != v]
    return " and ".join(diff) or None
